//! The interface to the ring-0 assembly: symbols it defines, data it reads,
//! and the ud2 service gate.
//!
//! Ring 3 cannot use `int $n` on the nested KVM we test on, so a service call
//! is `ud2` with `rax = SVC_MAGIC`; the #UD handler recognises the marker, does
//! the work and resumes after the ud2.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(not(test))]
core::arch::global_asm!(include_str!("asm/ring0.S"), options(att_syntax));

const SVC_MAGIC: u64 = 0x6b69_6c6e;
const SVC_POWEROFF: u64 = 0;
const SVC_RDMSR: u64 = 1;
const SVC_WRMSR: u64 = 2;
const SVC_CPUID: u64 = 3;
const SVC_TRIPLE_FAULT: u64 = 4;

extern "C" {
    /// First byte of the image (link.ld).
    static __image_start: u8;
    /// End of the image, stacks included, page aligned (link.ld).
    static __image_end: u8;
    /// The static top-level page table (asm/ring0.S).
    static pml4: u8;
    /// The static PDPT for the first 512 GiB (asm/ring0.S).
    static pdpt0: u8;
    /// AP real-mode trampoline, copied below 1 MiB by smp.rs (asm/ring0.S).
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

/// Physical range `[start, end)` occupied by the probe image and its stacks.
pub fn image_range() -> (u64, u64) {
    (core::ptr::addr_of!(__image_start) as u64, core::ptr::addr_of!(__image_end) as u64)
}

/// Physical address of the live PML4.
pub fn pml4_addr() -> u64 {
    core::ptr::addr_of!(pml4) as u64
}

/// Physical address of the static PDPT that maps the first 4 GiB.
pub fn pdpt0_addr() -> u64 {
    core::ptr::addr_of!(pdpt0) as u64
}

/// The AP trampoline's code bytes.
pub fn ap_trampoline() -> &'static [u8] {
    // SAFETY: both symbols delimit bytes in the (always mapped) image; end >= start.
    unsafe {
        let start = core::ptr::addr_of!(ap_tramp_start);
        let end = core::ptr::addr_of!(ap_tramp_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// How to power off, found by acpi.rs and read by the ring-0 power-off path
/// (also used when reporting a CPU exception). Layout shared with asm.
#[repr(C)]
pub struct PowerOff {
    /// 0 unknown, 1 16-bit port, 2 8-bit port, 3 16-bit MMIO, 4 8-bit MMIO.
    pub kind: AtomicU32,
    pub addr: AtomicU64,
    pub value: AtomicU32,
}

/// Power-off method read by asm/ring0.S (`r0_poweroff`).
#[no_mangle]
pub static PROBE_POWEROFF: PowerOff =
    PowerOff { kind: AtomicU32::new(0), addr: AtomicU64::new(0), value: AtomicU32::new(0) };

/// Maximum number of AP APIC ids recorded (matches AP_IDS_MAX in asm).
pub const AP_IDS_MAX: usize = 4096;

/// Next free slot in [`PROBE_AP_IDS`] (lock xadd by each AP).
#[no_mangle]
pub static PROBE_AP_SLOT: AtomicU32 = AtomicU32::new(0);
/// Number of APs that reached long mode and recorded their id.
#[no_mangle]
pub static PROBE_AP_STARTED: AtomicU32 = AtomicU32::new(0);
/// x2APIC ids of the started APs, in start order.
#[no_mangle]
pub static PROBE_AP_IDS: [AtomicU32; AP_IDS_MAX] = [const { AtomicU32::new(0) }; AP_IDS_MAX];
/// APs in the first this many slots of [`PROBE_AP_IDS`] get a ring-0 stack for
/// NMIs, so [`PROBE_APIC_CALL`] reaches them (matches AP_NMI_STACKS in asm).
pub const AP_NMI_STACKS: usize = 256;

/// An access to another CPU's local APIC, done by that CPU's NMI handler.
#[repr(C)]
pub struct ApicCall {
    /// 0 none (the handler stores 0 when done), 1 read, 2 write.
    pub op: AtomicU32,
    /// xAPIC register offset (x2APIC MSR 0x800 + reg / 16 in x2APIC mode).
    pub reg: AtomicU32,
    /// The value to write; the result when done.
    pub value: AtomicU32,
}

pub const APIC_CALL_READ: u32 = 1;
pub const APIC_CALL_WRITE: u32 = 2;

#[no_mangle]
pub static PROBE_APIC_CALL: ApicCall =
    ApicCall { op: AtomicU32::new(0), reg: AtomicU32::new(0), value: AtomicU32::new(0) };

/// Records the power-off method for both ring 3 and the fault handler.
pub fn set_poweroff(kind: u32, addr: u64, value: u32) {
    PROBE_POWEROFF.addr.store(addr, Ordering::SeqCst);
    PROBE_POWEROFF.value.store(value, Ordering::SeqCst);
    PROBE_POWEROFF.kind.store(kind, Ordering::SeqCst);
}

/// Powers off with the recorded method; halts forever if that did not work.
pub fn poweroff() -> ! {
    // SAFETY: the service never returns; ring 0 powers off or halts.
    unsafe {
        asm!("ud2", in("rax") SVC_MAGIC, in("rdi") SVC_POWEROFF, options(noreturn));
    }
}

/// Makes the CPU triple-fault (the VMM sees a shutdown).
pub fn triple_fault() -> ! {
    // SAFETY: the service never returns: ring 0 loads an empty IDT and faults.
    unsafe {
        asm!("ud2", in("rax") SVC_MAGIC, in("rdi") SVC_TRIPLE_FAULT, options(noreturn));
    }
}

/// Reads an MSR through ring 0.
pub fn rdmsr(msr: u32) -> u64 {
    let value: u64;
    // SAFETY: the #UD handler performs rdmsr(esi) and returns edx:eax in rax,
    // clobbering rcx and rdx. Reading an MSR has no side effects for the MSRs we use.
    unsafe {
        asm!("ud2", inout("rax") SVC_MAGIC => value, in("rdi") SVC_RDMSR, in("rsi") u64::from(msr),
             out("rcx") _, out("rdx") _, options(nostack));
    }
    value
}

/// Writes an MSR through ring 0.
///
/// # Safety
/// Writing an MSR can change anything about the CPU; the caller must know
/// this write is harmless to the probe.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the #UD handler performs wrmsr(esi, edx:eax), clobbering rax, rcx
    // and rdx; the caller vouches for the write.
    unsafe {
        asm!("ud2", inout("rax") SVC_MAGIC => _, in("rdi") SVC_WRMSR, in("rsi") u64::from(msr),
             inout("rdx") value => _, out("rcx") _, options(nostack));
    }
}

/// Executes CPUID in ring 0, where KVM intercepts it and returns the VM's
/// view. Returns (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u64, u64, u64, u64);
    // SAFETY: the #UD handler runs cpuid(leaf, subleaf) and returns eax in rax,
    // ebx in rsi, ecx in rcx, edx in rdx; it preserves rbx. No memory is touched.
    unsafe {
        asm!("ud2", inout("rax") SVC_MAGIC => a, in("rdi") SVC_CPUID, inout("rsi") u64::from(leaf) => b,
             inout("rdx") u64::from(subleaf) => d, out("rcx") c, options(nostack, nomem));
    }
    (a as u32, b as u32, c as u32, d as u32)
}
