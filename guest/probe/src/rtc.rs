//! The `rtc` check: the CMOS clock (ports 0x70/0x71) and the memory size
//! the VMM wrote into CMOS (0x30/0x31, 0x34/0x35, 0x5b-0x5d, as QEMU and
//! SeaBIOS use them).

use crate::emit;
use crate::io::{inb, outb, rdtsc};
use crate::reason;
use crate::util::Reason;

fn cmos(reg: u8) -> u8 {
    // SAFETY: selecting a CMOS register (keeping NMIs enabled, bit 7 clear)
    // and reading it has no side effects on the registers read here.
    unsafe {
        outb(0x70, reg & 0x7f);
        inb(0x71)
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct Time {
    sec: u8,
    min: u8,
    hour: u8,
    day: u8,
    mon: u8,
    year: u8,
    century: u8,
}

fn read_raw() -> Time {
    Time {
        sec: cmos(0x00),
        min: cmos(0x02),
        hour: cmos(0x04),
        day: cmos(0x07),
        mon: cmos(0x08),
        year: cmos(0x09),
        century: cmos(0x32),
    }
}

/// Waits while the update-in-progress flag (register A bit 7) is set.
fn wait_uip(limit_ticks: u64) -> bool {
    let t0 = rdtsc();
    while cmos(0x0a) & 0x80 != 0 {
        if rdtsc().wrapping_sub(t0) > limit_ticks {
            return false;
        }
    }
    true
}

fn bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

fn read_time() -> Result<(u16, u8, u8, u8, u8, u8), Reason> {
    let a = cmos(0x0a);
    let b = cmos(0x0b);
    if a == 0xff && b == 0xff {
        return Err(reason!("no CMOS RTC (ports 0x70/0x71 read 0xff)"));
    }
    // Read until two consecutive reads agree, outside update cycles.
    let mut t = read_raw();
    for _ in 0..10 {
        if !wait_uip(10_000_000_000) {
            return Err(reason!("RTC update-in-progress never clears"));
        }
        let u = read_raw();
        if u == t {
            break;
        }
        t = u;
    }
    let binary = b & 0x04 != 0;
    let h24 = b & 0x02 != 0;
    let conv = |v: u8| if binary { v } else { bcd(v) };
    let pm = t.hour & 0x80 != 0;
    let mut hour = conv(t.hour & 0x7f);
    if !h24 {
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let century = match conv(t.century) {
        c @ 19..=21 => u16::from(c),
        _ => 20,
    };
    let (year, mon, day, min, sec) = (conv(t.year), conv(t.mon), conv(t.day), conv(t.min), conv(t.sec));
    if year > 99 || !(1..=12).contains(&mon) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 59 {
        return Err(reason!(
            "implausible RTC time (raw {:02x}-{:02x}-{:02x} {:02x}:{:02x}:{:02x}, status B {:#04x})",
            t.year,
            t.mon,
            t.day,
            t.hour,
            t.min,
            t.sec,
            b
        ));
    }
    Ok((century * 100 + u16::from(year), mon, day, hour, min, sec))
}

/// RAM size from the CMOS memory registers, in bytes.
fn cmos_mem() -> u64 {
    let ext_kib = u64::from(cmos(0x30)) | (u64::from(cmos(0x31)) << 8);
    let above16m = u64::from(cmos(0x34)) | (u64::from(cmos(0x35)) << 8);
    let above4g = u64::from(cmos(0x5b)) | (u64::from(cmos(0x5c)) << 8) | (u64::from(cmos(0x5d)) << 16);
    let below4g = if above16m != 0 { (16 << 20) + (above16m << 16) } else { (1 << 20) + (ext_kib << 10) };
    below4g + (above4g << 16)
}

pub fn check() -> bool {
    match read_time() {
        Ok((y, mo, d, h, mi, s)) => {
            emit!("PROBE rtc ok time={:04}-{:02}-{:02}T{:02}:{:02}:{:02} cmos_mem={}", y, mo, d, h, mi, s, cmos_mem());
            true
        }
        Err(r) => {
            emit!("PROBE rtc fail {}", r);
            false
        }
    }
}
