//! Initial vCPU state for the two ways kiln enters a kernel.
//!
//! - **PVH**: 32-bit protected mode, paging off, flat segments, `ebx` = start info.
//! - **Linux 64-bit boot protocol**: long mode on identity page tables, `__BOOT_CS` (0x10) and
//!   `__BOOT_DS` (0x18) flat, `rsi` = zero page.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{BOOT_STACK_TOP, GDT_ADDR, PML4_ADDR};

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit entry at `addr`, `ebx` = PVH start info address.
    Pvh {
        /// Entry address.
        addr: u64,
        /// Address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: 64-bit entry at `addr`, `rsi` = zero page address.
    Linux64 {
        /// Entry address.
        addr: u64,
        /// Address of `boot_params`.
        zero_page: u64,
    },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;
const GDT_ENTRIES: usize = 5;

/// A GDT descriptor from the classic (flags, base, limit) triple.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment described by a GDT descriptor.
fn segment(selector: u16, desc: u64) -> kvm_segment {
    let field =
        |shift: u32, bits: u32| u8::try_from((desc >> shift) & ((1 << bits) - 1)).unwrap_or(0);
    let base = ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24);
    let raw_limit = u32::try_from((desc & 0xffff) | (((desc >> 48) & 0xf) << 16)).unwrap_or(0);
    let g = field(55, 1);
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: field(40, 4),
        present: field(47, 1),
        dpl: field(45, 2),
        db: field(54, 1),
        s: field(44, 1),
        l: field(53, 1),
        g,
        avl: field(52, 1),
        unusable: 0,
        padding: 0,
    }
}

fn boot_gdt(long_mode: bool) -> [u64; GDT_ENTRIES] {
    let code = if long_mode { 0xa09b } else { 0xc09b };
    [
        0,
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the boot {what} at {addr:#x} into guest memory")]
pub struct BootWriteError {
    /// Which structure.
    pub what: &'static str,
    /// Where.
    pub addr: u64,
    /// Why.
    #[source]
    pub source: vm_memory::GuestMemoryError,
}

fn write_u64s<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    addr: u64,
    words: impl IntoIterator<Item = u64>,
) -> Result<(), BootWriteError> {
    let bytes: Vec<u8> = words.into_iter().flat_map(u64::to_le_bytes).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|source| BootWriteError { what, addr, source })
}

/// Identity page tables for the first 4 GiB (2 MiB pages) at [`PML4_ADDR`]: PML4, one PDPT,
/// four page directories.
fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootWriteError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let pdpt = PML4_ADDR + 0x1000;
    let pd = PML4_ADDR + 0x2000;
    write_u64s(mem, "PML4", PML4_ADDR, [pdpt | PRESENT_RW])?;
    write_u64s(
        mem,
        "PDPT",
        pdpt,
        (0..4).map(|i| (pd + i * 0x1000) | PRESENT_RW),
    )?;
    write_u64s(
        mem,
        "page directories",
        pd,
        (0..2048u64).map(|i| (i << 21) | PRESENT_RW | HUGE),
    )
}

/// Writes the boot GDT (and, for the 64-bit entry, the page tables) and returns the special
/// registers for `entry`, starting from the vCPU's current `sregs`.
pub fn boot_sregs<M: GuestMemoryBackend>(
    mem: &M,
    entry: EntryPoint,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, BootWriteError> {
    let long_mode = matches!(entry, EntryPoint::Linux64 { .. });
    let gdt = boot_gdt(long_mode);
    write_u64s(mem, "GDT", GDT_ADDR, gdt)?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&gdt) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;

    let code = segment(BOOT_CS, gdt[2]);
    let data = segment(BOOT_DS, gdt[3]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_TSS, gdt[4]);

    if long_mode {
        write_page_tables(mem)?;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.cr3 = 0;
        sregs.efer = 0;
    }
    Ok(sregs)
}

/// General registers for `entry`.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh { addr, start_info } => {
            regs.rip = addr;
            regs.rbx = start_info;
        }
        EntryPoint::Linux64 { addr, zero_page } => {
            regs.rip = addr;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
        }
    }
    regs
}

/// x87 and SSE control words as after reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Routes LINT0 to ExtINT (the 8259) and LINT1 to NMI, as firmware leaves a PC.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let patch = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, v) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *v as std::os::raw::c_char;
        }
    };
    patch(&mut lapic.regs, APIC_LVT0, MODE_EXTINT);
    patch(&mut lapic.regs, APIC_LVT1, MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_code_segment_is_64_bit_flat() {
        let s = boot_sregs(
            &mem(),
            EntryPoint::Linux64 {
                addr: 0x100000,
                zero_page: 0x7000,
            },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.db, s.cs.type_, s.cs.present),
            (0x10, 1, 0, 0xb, 1)
        );
        assert_eq!((s.ds.selector, s.ds.limit, s.ds.db), (0x18, 0xffff_ffff, 1));
        assert_eq!(s.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn pvh_starts_in_flat_protected_mode_without_paging() {
        let s = boot_sregs(
            &mem(),
            EntryPoint::Pvh {
                addr: 0x100000,
                start_info: 0x6000,
            },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(
            (s.cs.l, s.cs.db, s.cs.limit, s.cs.base),
            (0, 1, 0xffff_ffff, 0)
        );
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(s.efer, 0);
        assert_eq!((s.tr.type_, s.tr.limit), (0xb, 0x67));
        let r = boot_regs(EntryPoint::Pvh {
            addr: 0x100000,
            start_info: 0x6000,
        });
        assert_eq!((r.rip, r.rbx), (0x100000, 0x6000));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let m = mem();
        boot_sregs(
            &m,
            EntryPoint::Linux64 {
                addr: 0,
                zero_page: 0,
            },
            kvm_sregs::default(),
        )
        .unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PML4_ADDR + 0x1000);
        let last_pd = PML4_ADDR + 0x2000 + 2047 * 8;
        let pde: u64 = m.read_obj(GuestAddress(last_pd)).unwrap();
        assert_eq!(pde & !0xfff, (4u64 << 30) - (2 << 20));
        assert_ne!(pde & 0x80, 0);
    }
}
