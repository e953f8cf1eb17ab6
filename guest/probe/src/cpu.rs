//! The `cpu` check: time [`cpuloop::cpu_loop`] with the TSC.
//!
//! The iterations are split into [`RUNS`] equal runs and the fastest run is
//! reported (per iteration), so that a host preemption in one run does not
//! skew the figure; a native benchmark should likewise take its best run.

use crate::cpuloop;
use crate::emit;
use crate::io::rdtsc;
use crate::tsc::Tsc;
use crate::util::Milli;

/// About 0.2 s on a ~2.5 GHz core (the loop takes ~5 cycles per iteration).
pub const DEFAULT_ITERS: u64 = 100_000_000;
/// Runs the iterations are split into; the fastest counts.
pub const RUNS: u64 = 5;

pub fn check(iters: u64, tsc: Option<Tsc>) -> bool {
    let Some(tsc) = tsc else {
        emit!("PROBE cpu fail no TSC frequency (no CPUID leaf, PIT did not count)");
        return false;
    };
    let per_run = (iters / RUNS).max(1);
    let mut best = u64::MAX;
    for _ in 0..RUNS.min(iters) {
        let t0 = rdtsc();
        let r = cpuloop::cpu_loop(core::hint::black_box(per_run));
        let t1 = rdtsc();
        core::hint::black_box(r);
        best = best.min(t1.wrapping_sub(t0));
    }
    let ticks = u128::from(best);
    let iters128 = u128::from(per_run);
    let tsc_milli = (ticks * 1000 / iters128) as u64;
    // ns = ticks * 1e6 / khz; in thousandths of a ns per iteration:
    let ns_milli = (ticks * 1_000_000_000 / (u128::from(tsc.khz) * iters128)) as u64;
    emit!(
        "PROBE cpu ok iters={} tsc_per_iter={} ns_per_iter={} tsc_khz={}",
        iters,
        Milli(tsc_milli),
        Milli(ns_milli),
        tsc.khz
    );
    true
}
