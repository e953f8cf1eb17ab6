//! TSC frequency: from a hypervisor/CPUID leaf when one says it, otherwise
//! measured against PIT channel 2 (gate via port 0x61, as Linux's PIT
//! calibration does). All of it runs in ring 3.

use crate::io::{cpuid, inb, outb, rdtsc};

/// PIT input clock in Hz.
const PIT_HZ: u64 = 1_193_182;
/// Calibration window.
const CAL_MS: u64 = 20;

#[derive(Clone, Copy, Debug)]
pub struct Tsc {
    pub khz: u64,
}

impl Tsc {
    /// TSC ticks per millisecond (the frequency in kHz).
    pub fn ticks_per_ms(&self) -> u64 {
        self.khz
    }

    /// Converts TSC ticks to nanoseconds.
    pub fn ns(&self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1_000_000 / u128::from(self.khz.max(1))) as u64
    }
}

/// CPUID 0x40000010 (hypervisor timing leaf: eax = TSC kHz).
fn from_hypervisor_leaf() -> Option<u64> {
    let max = cpuid(0x4000_0000, 0).eax;
    if !(0x4000_0010..0x4000_0100).contains(&max) {
        return None;
    }
    let khz = u64::from(cpuid(0x4000_0010, 0).eax);
    (khz != 0).then_some(khz)
}

/// CPUID 0x15: TSC = crystal * ebx / eax, when the crystal frequency is given.
fn from_leaf_15() -> Option<u64> {
    if cpuid(0, 0).eax < 0x15 {
        return None;
    }
    let r = cpuid(0x15, 0);
    if r.eax == 0 || r.ebx == 0 || r.ecx == 0 {
        return None;
    }
    Some(u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax) / 1000)
}

/// Latches and reads the count of PIT channel `ch`. Returns the count and
/// the TSC at the latch (midpoint of the `out`).
fn pit_read(ch: u8) -> (u16, u64) {
    let t0 = rdtsc();
    // SAFETY: a counter-latch command for channel `ch` has no other effect.
    unsafe { outb(0x43, ch << 6) };
    let t1 = rdtsc();
    // SAFETY: reading the latched count (low byte, then high byte).
    let (lo, hi) = unsafe { (inb(0x40 + u16::from(ch)), inb(0x40 + u16::from(ch))) };
    (u16::from_le_bytes([lo, hi]), t0 + (t1.wrapping_sub(t0) / 2))
}

/// Measures TSC ticks against PIT channel `ch` counting CAL_MS milliseconds in
/// mode 2 (rate generator, period 65536 counts = 55 ms, well above the poll
/// interval). Reading the latched count instead of waiting for OUT keeps the
/// error to the latch's own exit time at both ends.
fn measure(ch: u8) -> Option<u64> {
    // SAFETY: programs channel `ch` of the PIT, which nothing else uses: the
    // 8259s are masked and the IOAPIC pins are masked since reset.
    unsafe {
        outb(0x43, (ch << 6) | 0x34); // lobyte/hibyte, mode 2, binary
        outb(0x40 + u16::from(ch), 0);
        outb(0x40 + u16::from(ch), 0); // reload value 0 = 65536
    }
    let want = PIT_HZ * CAL_MS / 1000;
    let (mut prev, start_tsc) = pit_read(ch);
    let mut counted = 0u64;
    let mut last_tsc = start_tsc;
    loop {
        let (c, t) = pit_read(ch);
        counted += u64::from(prev.wrapping_sub(c));
        prev = c;
        last_tsc = if counted == 0 { last_tsc } else { t };
        if counted >= want {
            break;
        }
        // Not counting for ~50 ms of a >= 1 GHz TSC: no PIT (or no gate).
        if counted == 0 && t.wrapping_sub(start_tsc) > 50_000_000 {
            return None;
        }
        if t.wrapping_sub(start_tsc) > 20_000_000_000 {
            return None;
        }
    }
    let ticks = u128::from(last_tsc.wrapping_sub(start_tsc));
    let khz = (ticks * u128::from(PIT_HZ) / (u128::from(counted) * 1000)) as u64;
    (khz >= 10_000).then_some(khz)
}

/// PIT calibration: channel 2 with its gate opened through port 0x61 (as
/// Linux does), or channel 0 where there is no port 0x61 (QEMU microvm).
fn from_pit() -> Option<u64> {
    // SAFETY: port 0x61 bit 0 is the channel 2 gate, bit 1 the speaker data.
    let ctrl = unsafe { inb(0x61) };
    if ctrl != 0xff {
        // SAFETY: as above: gate on, speaker off.
        unsafe { outb(0x61, (ctrl & !0x02) | 0x01) };
        if let Some(khz) = measure(2) {
            return Some(khz);
        }
    }
    measure(0)
}

pub fn calibrate() -> Option<Tsc> {
    if let Some(khz) = from_hypervisor_leaf() {
        return Some(Tsc { khz });
    }
    if let Some(khz) = from_leaf_15() {
        return Some(Tsc { khz });
    }
    from_pit().map(|khz| Tsc { khz })
}
