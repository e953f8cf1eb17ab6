//! MC146818 CMOS RTC and NVRAM at ports 0x70 (index) and 0x71 (data).
//!
//! The clock is the host's UTC time plus an offset the guest sets by writing the time
//! registers (with status B's SET bit), so guest time survives snapshots as an offset.
//! The memory-size registers firmware normally fills in are set from the VM's RAM.
//! Periodic, alarm and update interrupts are not generated.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::BusDevice;

const NVRAM_SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

/// The RTC's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// Selected register (port 0x70, without the NMI bit).
    pub index: u8,
    /// NMI disabled (bit 7 of the last index write).
    pub nmi_disabled: bool,
    /// The 128 bytes of NVRAM, including the time registers as last latched.
    pub nvram: Vec<u8>,
    /// Guest time minus host time, in seconds.
    pub offset_secs: i64,
}

/// Where the RTC reads the host's time.
pub type Clock = fn() -> i64;

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The CMOS RTC.
pub struct Cmos {
    index: u8,
    nmi_disabled: bool,
    nvram: [u8; NVRAM_SIZE],
    offset_secs: i64,
    clock: Clock,
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Cmos {
    /// An RTC for a VM with `mem_below_4g` and `mem_above_4g` bytes of RAM.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, host_now)
    }

    /// As [`Cmos::new`], reading time from `clock`.
    pub fn with_clock(mem_below_4g: u64, mem_above_4g: u64, clock: Clock) -> Self {
        let mut nvram = [0u8; NVRAM_SIZE];
        nvram[usize::from(REG_A)] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        nvram[usize::from(REG_B)] = B_24H;
        nvram[usize::from(REG_D)] = D_VRT;
        let put16 = |nvram: &mut [u8; NVRAM_SIZE], reg: usize, v: u64| {
            let v = u16::try_from(v).unwrap_or(u16::MAX).to_le_bytes();
            nvram[reg] = v[0];
            nvram[reg + 1] = v[1];
        };
        // Base memory in KiB; extended memory 1 MiB..64 MiB in KiB.
        put16(&mut nvram, 0x15, 640);
        let ext_kib = (mem_below_4g.saturating_sub(1 << 20) >> 10).min(0xfc00);
        put16(&mut nvram, 0x17, ext_kib);
        put16(&mut nvram, 0x30, ext_kib);
        // Memory above 16 MiB (below 4 GiB) and above 4 GiB, in 64 KiB blocks.
        put16(
            &mut nvram,
            0x34,
            mem_below_4g.saturating_sub(16 << 20) >> 16,
        );
        let high = (mem_above_4g >> 16).min(0xff_ffff).to_le_bytes();
        nvram[0x5b..0x5e].copy_from_slice(&high[..3]);
        Self {
            index: 0,
            nmi_disabled: false,
            nvram,
            offset_secs: 0,
            clock,
        }
    }

    /// Rebuilds an RTC from `state`; the NVRAM is padded or cut to 128 bytes.
    pub fn from_state(state: &CmosState) -> Self {
        let mut nvram = [0u8; NVRAM_SIZE];
        for (d, s) in nvram.iter_mut().zip(&state.nvram) {
            *d = *s;
        }
        Self {
            index: state.index & 0x7f,
            nmi_disabled: state.nmi_disabled,
            nvram,
            offset_secs: state.offset_secs,
            clock: host_now,
        }
    }

    /// The RTC's state.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            nvram: self.nvram.to_vec(),
            offset_secs: self.offset_secs,
        }
    }

    fn binary(&self) -> bool {
        self.nvram[usize::from(REG_B)] & B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        let v = u8::try_from(v % 100).unwrap_or(0);
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary() {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    /// Latches the guest's current time into the time registers.
    fn latch_time(&mut self) {
        let t = (self.clock)() + self.offset_secs;
        let days = t.div_euclid(86_400);
        let secs = u32::try_from(t.rem_euclid(86_400)).unwrap_or(0);
        let (year, month, day) = civil_from_days(days);
        let weekday = u32::try_from((days + 4).rem_euclid(7)).unwrap_or(0) + 1; // 1970-01-01 was a Thursday
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        let hour = if self.nvram[usize::from(REG_B)] & B_24H != 0 {
            self.encode(h)
        } else {
            let h12 = if h % 12 == 0 { 12 } else { h % 12 };
            self.encode(h12) | if h >= 12 { HOUR_PM } else { 0 }
        };
        let year = u32::try_from(year.clamp(0, 9999)).unwrap_or(0);
        let regs = [
            (REG_SECONDS, self.encode(s)),
            (REG_MINUTES, self.encode(m)),
            (REG_HOURS, hour),
            (REG_WEEKDAY, self.encode(weekday)),
            (REG_DAY, self.encode(day)),
            (REG_MONTH, self.encode(month)),
            (REG_YEAR, self.encode(year % 100)),
            (REG_CENTURY, self.encode(year / 100)),
        ];
        for (reg, v) in regs {
            self.nvram[usize::from(reg)] = v;
        }
    }

    /// The guest finished setting the clock: keep its time as an offset from the host's.
    fn commit_time(&mut self) {
        let reg = |r: u8| self.nvram[usize::from(r)];
        let hour_raw = reg(REG_HOURS);
        let mut hour = self.decode(hour_raw & 0x7f);
        if self.nvram[usize::from(REG_B)] & B_24H == 0 {
            hour %= 12;
            if hour_raw & HOUR_PM != 0 {
                hour += 12;
            }
        }
        let year =
            i64::from(self.decode(reg(REG_CENTURY))) * 100 + i64::from(self.decode(reg(REG_YEAR)));
        let (month, day) = (
            self.decode(reg(REG_MONTH)).clamp(1, 12),
            self.decode(reg(REG_DAY)).clamp(1, 31),
        );
        let secs = i64::from(hour) * 3600
            + i64::from(self.decode(reg(REG_MINUTES))) * 60
            + i64::from(self.decode(reg(REG_SECONDS)));
        let guest = days_from_civil(year, month, day) * 86_400 + secs;
        self.offset_secs = guest - (self.clock)();
    }

    fn read_data(&mut self) -> u8 {
        match self.index {
            REG_SECONDS..=REG_YEAR | REG_CENTURY => {
                if self.nvram[usize::from(REG_B)] & B_SET == 0 {
                    self.latch_time();
                }
                self.nvram[usize::from(self.index)]
            }
            REG_C => std::mem::take(&mut self.nvram[usize::from(REG_C)]),
            i => self.nvram[usize::from(i)],
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.index {
            REG_C | REG_D => {}                                 // read-only
            REG_A => self.nvram[usize::from(REG_A)] = v & 0x7f, // UIP is read-only
            REG_B => {
                let was_set = self.nvram[usize::from(REG_B)] & B_SET != 0;
                if !was_set && v & B_SET != 0 {
                    self.latch_time();
                }
                self.nvram[usize::from(REG_B)] = v;
                if was_set && v & B_SET == 0 {
                    self.commit_time();
                }
            }
            i => self.nvram[usize::from(i)] = v,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = if offset == 1 { self.read_data() } else { 0xff };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => {
                self.index = v & 0x7f;
                self.nmi_disabled = v & 0x80 != 0;
            }
            1 => self.write_data(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-26T16:07:09Z, a Thursday.
    const T: i64 = 1_795_709_229;

    fn rtc() -> Cmos {
        Cmos::with_clock(256 << 20, 0, || T)
    }

    fn reg(c: &mut Cmos, r: u8) -> u8 {
        c.write(0x70, 0, &[r]);
        let mut b = [0u8];
        c.read(0x70, 1, &mut b);
        b[0]
    }

    fn set(c: &mut Cmos, r: u8, v: u8) {
        c.write(0x70, 0, &[r]);
        c.write(0x70, 1, &[v]);
    }

    #[test]
    fn reads_host_time_in_bcd() {
        let mut c = rtc();
        assert_eq!(civil_from_days(T / 86_400), (2026, 11, 26));
        assert_eq!(reg(&mut c, REG_HOURS), 0x16);
        assert_eq!(reg(&mut c, REG_MINUTES), 0x07);
        assert_eq!(reg(&mut c, REG_SECONDS), 0x09);
        assert_eq!(reg(&mut c, REG_DAY), 0x26);
        assert_eq!(reg(&mut c, REG_MONTH), 0x11);
        assert_eq!(reg(&mut c, REG_YEAR), 0x26);
        assert_eq!(reg(&mut c, REG_CENTURY), 0x20);
        assert_eq!(reg(&mut c, REG_WEEKDAY), 5);
        assert_eq!(reg(&mut c, REG_D), D_VRT);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut c = rtc();
        set(&mut c, REG_B, B_BINARY);
        assert_eq!(reg(&mut c, REG_HOURS), 4 | HOUR_PM);
        assert_eq!(reg(&mut c, REG_YEAR), 26);
    }

    #[test]
    fn guest_set_time_becomes_an_offset() {
        let mut c = rtc();
        set(&mut c, REG_B, B_24H | B_SET);
        set(&mut c, REG_YEAR, 0x27); // one year later
        set(&mut c, REG_B, B_24H);
        assert_eq!(c.state().offset_secs, 365 * 86_400);
        assert_eq!(reg(&mut c, REG_YEAR), 0x27);
        assert_eq!(reg(&mut c, REG_MINUTES), 0x07);
    }

    #[test]
    fn memory_size_registers() {
        let mut c = Cmos::with_clock(3 << 30, 5 << 30, || T);
        let lo = u64::from(reg(&mut c, 0x34)) | u64::from(reg(&mut c, 0x35)) << 8;
        assert_eq!(lo, ((3u64 << 30) - (16 << 20)) >> 16);
        let hi = u64::from(reg(&mut c, 0x5b))
            | u64::from(reg(&mut c, 0x5c)) << 8
            | u64::from(reg(&mut c, 0x5d)) << 16;
        assert_eq!(hi, (5u64 << 30) >> 16);
        assert_eq!(
            u64::from(reg(&mut c, 0x30)) | u64::from(reg(&mut c, 0x31)) << 8,
            0xfc00
        );
    }

    #[test]
    fn day_conversion_round_trips() {
        for d in [-1_000_000i64, -1, 0, 59, 11_016, 20_000, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn state_round_trips() {
        let mut c = rtc();
        set(&mut c, 0x40, 0xab);
        let s = c.state();
        let d = Cmos::from_state(&s);
        assert_eq!(d.state(), s);
    }
}
