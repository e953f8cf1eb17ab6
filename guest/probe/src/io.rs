//! Port I/O, MMIO, TSC and CPUID for ring 3.
//!
//! Port I/O works from ring 3 because the TSS carries an all-zero I/O
//! permission bitmap (see asm/ring0.S). All functions here are plain
//! instructions; none of them needs ring 0.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must be one whose write side effects the caller intends.
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port; `out` touches no memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As for [`outb`]: some ports have read side effects.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the port; `in` touches no memory.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be mapped (the identity map covers RAM and the MMIO hole) and
/// name a register whose read has no unwanted side effect.
#[inline(always)]
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees `addr` is mapped and 4-byte aligned.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
///
/// # Safety
/// As for [`mmio_read32`], for writes.
#[inline(always)]
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: the caller guarantees `addr` is mapped and 4-byte aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Reads a 16-bit MMIO register.
///
/// # Safety
/// As for [`mmio_read32`], 2-byte aligned.
#[inline(always)]
pub unsafe fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: the caller guarantees `addr` is mapped and 2-byte aligned.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// Reads an 8-bit MMIO register.
///
/// # Safety
/// As for [`mmio_read32`].
#[inline(always)]
pub unsafe fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: the caller guarantees `addr` is mapped.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Writes a 16-bit MMIO register.
///
/// # Safety
/// As for [`mmio_write32`], 2-byte aligned.
#[inline(always)]
pub unsafe fn mmio_write16(addr: u64, value: u16) {
    // SAFETY: the caller guarantees `addr` is mapped and 2-byte aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

/// Writes an 8-bit MMIO register.
///
/// # Safety
/// As for [`mmio_write32`].
#[inline(always)]
pub unsafe fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: the caller guarantees `addr` is mapped.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// Writes a 32-bit I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline(always)]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller vouches for the port; `out` touches no memory.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a 32-bit I/O port.
///
/// # Safety
/// As for [`inb`].
#[inline(always)]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: the caller vouches for the port; `in` touches no memory.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Writes a 16-bit I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline(always)]
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: the caller vouches for the port; `out` touches no memory.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a 16-bit I/O port.
///
/// # Safety
/// As for [`inb`].
#[inline(always)]
pub unsafe fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: the caller vouches for the port; `in` touches no memory.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads the time-stamp counter (CR4.TSD is clear, so ring 3 may).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the TSC into edx:eax.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The four registers CPUID returns.
#[derive(Clone, Copy, Debug)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes CPUID for `leaf`/`subleaf` as the VM defines it.
///
/// Goes through ring 0: on the nested KVM we test on, CPUID executed in ring 3
/// is not intercepted and reports the host CPU (its APIC id, its leaves).
#[inline]
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx) = crate::ring0::cpuid(leaf, subleaf);
    Cpuid { eax, ebx, ecx, edx }
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}
