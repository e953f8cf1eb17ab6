//! x86_64 boot for kiln: the guest-physical layout, the e820 map, CPUID and register setup,
//! boot page tables and GDT, the Linux zero page and PVH start info, and ACPI tables.
//!
//! Nothing here talks to KVM: functions produce the structures (`kvm_regs`, `CpuId`, ...)
//! and write into guest memory; the VMM applies them to vCPUs.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod layout;
pub mod regs;
