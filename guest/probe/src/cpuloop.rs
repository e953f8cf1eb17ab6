//! The fixed compute loop of the `cpu` check.
//!
//! This file has NO dependencies on the rest of the probe: a host-side
//! benchmark compiles the very same file natively (`#[path = ...] mod
//! cpuloop;`) and compares TSC ticks per iteration. Integer work only (no
//! popcnt, no floating point, no memory traffic), with a loop-carried
//! dependency so that the compiler can neither vectorise nor fold it.

/// Runs `iters` rounds of xorshift64 mixed into a multiply-rotate chain and
/// returns the final state (so that the work cannot be optimised away).
#[inline(never)]
pub fn cpu_loop(iters: u64) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = 0x2545_f491_4f6c_dd1d;
    let mut i = 0;
    while i < iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        h = h.wrapping_mul(0x5851_f42d_4c95_7f2d).wrapping_add(x);
        h ^= h.rotate_left(23) ^ (h >> 11);
        i += 1;
    }
    x ^ h
}
