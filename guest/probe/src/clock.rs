//! Timeouts and rates from the TSC. Without a calibrated frequency the
//! timeouts assume a 4 GHz TSC (so they only get longer on a slower one) and
//! rates are reported as 0.

use crate::io::{pause, rdtsc};
use crate::tsc::Tsc;

/// Assumed TSC kHz when calibration failed.
const FALLBACK_KHZ: u64 = 4_000_000;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    khz: u64,
    pub calibrated: bool,
}

/// A point in time, in TSC ticks.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64, u64);

impl Deadline {
    pub fn expired(&self) -> bool {
        rdtsc().wrapping_sub(self.0) >= self.1
    }
}

impl Clock {
    pub fn new(tsc: Option<Tsc>) -> Clock {
        match tsc {
            Some(t) if t.khz > 0 => Clock { khz: t.khz, calibrated: true },
            _ => Clock { khz: FALLBACK_KHZ, calibrated: false },
        }
    }

    pub fn now(&self) -> u64 {
        rdtsc()
    }

    pub fn deadline_ms(&self, ms: u64) -> Deadline {
        Deadline(rdtsc(), ms.saturating_mul(self.khz))
    }

    /// Nanoseconds in `ticks` (0 without calibration).
    pub fn ns(&self, ticks: u64) -> u64 {
        if !self.calibrated {
            return 0;
        }
        u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(self.khz)).unwrap_or(u64::MAX)
    }

    /// `count` per second over `ticks` (0 without calibration).
    pub fn per_sec(&self, count: u64, ticks: u64) -> u64 {
        let ns = self.ns(ticks);
        if ns == 0 {
            return 0;
        }
        u64::try_from(u128::from(count) * 1_000_000_000 / u128::from(ns)).unwrap_or(u64::MAX)
    }

    pub fn sleep_us(&self, us: u64) {
        let t0 = rdtsc();
        let ticks = us.saturating_mul(self.khz) / 1000;
        while rdtsc().wrapping_sub(t0) < ticks {
            pause();
        }
    }
}
