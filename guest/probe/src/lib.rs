//! kiln's probe guest: a tiny kernel that checks a VM from inside.
//!
//! Ring 0 is a few hundred instructions of assembly (asm/ring0.S): it prints
//! `PROBE hello`, enters long mode and drops to ring 3, where this Rust code
//! runs natively even on a nested KVM that emulates ring 0. See README.md for
//! the boot flow, the command line and the output contract.
//!
//! The checks live in this library; `main.rs` only sequences them. Built for
//! the host target without std; `cargo test --lib` runs the pure-logic unit
//! tests on the host (with std, without the assembly and the C intrinsics).

#![cfg_attr(not(test), no_std)]

// Ring 0 never enables AVX state (XCR0 needs xsetbv, which the nested KVM's
// emulator may lack), so code built for AVX would fault with #UD in ring 3.
// Catch a stray `-C target-cpu=native` in RUSTFLAGS or a .cargo/config.
#[cfg(all(not(test), target_feature = "avx"))]
compile_error!("the probe must be built without AVX (no -C target-cpu=native): ring 0 does not enable AVX state");

pub mod acpi;
pub mod boot;
pub mod bootinfo;
pub mod clock;
pub mod cmdline;
pub mod cpu;
pub mod cpuloop;
pub mod devopts;
pub mod dma;
pub mod fault;
pub mod hostile;
#[cfg(not(test))]
mod intrinsics;
pub mod io;
pub mod lapic;
pub mod mem;
pub mod netpkt;
pub mod paging;
pub mod pci;
pub mod pcihost;
pub mod ranges;
pub mod ring0;
pub mod rtc;
pub mod serial;
pub mod smp;
pub mod tsc;
pub mod util;
pub mod virtio;
