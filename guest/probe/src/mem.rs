//! The `mem` check: write an address-dependent pattern over RAM, then read
//! it all back.
//!
//! `full` covers every usable e820 RAM page that the probe does not use
//! itself (image, page tables, trampoline) and that does not hold the VMM's
//! boot data or ACPI tables. `sample` covers the first and last page of each
//! RAM entry plus the page at each GiB boundary (for huge guests).
//! All writes happen before any verification, so aliasing is caught too.
//! `mbps` is bytes verified divided by the time of both passes (10^6 B/s).

use crate::bootinfo::{E820Entry, E820_RAM};
use crate::cmdline::MemMode;
use crate::emit;
use crate::io::rdtsc;
use crate::ranges::{align_down, align_up, Reserved, PAGE};
use crate::reason;
use crate::tsc::Tsc;
use crate::util::Reason;

const GIB: u64 = 1 << 30;
const SALT: u64 = 0xa5c3_5a3c_0ff0_f00f;

#[inline(always)]
fn pattern(addr: u64) -> u64 {
    addr ^ SALT ^ (addr << 29)
}

/// Fills `[start, end)` with the pattern.
#[inline(never)]
fn fill(start: u64, end: u64) {
    let start = core::hint::black_box(start);
    // SAFETY: [start, end) is mapped RAM that nothing else uses (see `for_each_piece`).
    let words = unsafe { core::slice::from_raw_parts_mut(start as *mut u64, ((end - start) / 8) as usize) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = pattern(start + (i as u64) * 8);
    }
}

/// Verifies `[start, end)`; returns the first bad address and its content.
#[inline(never)]
fn verify(start: u64, end: u64) -> Option<(u64, u64)> {
    let start = core::hint::black_box(start);
    // SAFETY: as for `fill`.
    let words = unsafe { core::slice::from_raw_parts(start as *const u64, ((end - start) / 8) as usize) };
    let bad = words.iter().enumerate().position(|(i, &w)| w != pattern(start + (i as u64) * 8))?;
    Some((start + bad as u64 * 8, words[bad]))
}

/// Calls `f` on every page-aligned piece of `[start, end)` outside the
/// reserved ranges, in address order.
fn free_pieces(
    start: u64,
    end: u64,
    reserved: &Reserved,
    f: &mut impl FnMut(u64, u64) -> Result<(), Reason>,
) -> Result<(), Reason> {
    let mut cur = start;
    while cur < end {
        let next = reserved.iter().filter(|r| r.start < end && cur < r.end).min_by_key(|r| r.start);
        match next {
            None => return f(cur, end),
            Some(r) => {
                if r.start > cur {
                    f(cur, r.start)?;
                }
                cur = cur.max(r.end);
            }
        }
    }
    Ok(())
}

/// Calls `f` on every piece the given mode covers.
fn for_each_piece(
    e820: &[E820Entry],
    reserved: &Reserved,
    mode: MemMode,
    mapped_top: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), Reason>,
) -> Result<(), Reason> {
    for e in e820.iter().filter(|e| e.kind == E820_RAM) {
        let start = align_up(e.addr, PAGE);
        let end = align_down(e.end().min(mapped_top), PAGE);
        if start >= end {
            continue;
        }
        match mode {
            MemMode::Full => free_pieces(start, end, reserved, &mut f)?,
            MemMode::Sample => {
                let mut g = align_up(start + PAGE, GIB);
                let gib_pages = core::iter::from_fn(|| {
                    let p = g;
                    g += GIB;
                    (p + PAGE < end).then_some(p)
                });
                let mut last = None;
                for p in core::iter::once(start).chain(gib_pages).chain(core::iter::once(end - PAGE)) {
                    if last.is_some_and(|l| p <= l) {
                        continue;
                    }
                    last = Some(p);
                    if reserved.overlap(p, p + PAGE).is_none() {
                        f(p, p + PAGE)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn run(e820: &[E820Entry], reserved: &Reserved, mode: MemMode, mapped_top: u64) -> Result<u64, Reason> {
    if reserved.overflowed {
        return Err(reason!("too many reserved ranges to know what is free"));
    }
    for_each_piece(e820, reserved, mode, mapped_top, |s, e| {
        fill(s, e);
        Ok(())
    })?;
    let mut bytes = 0;
    for_each_piece(e820, reserved, mode, mapped_top, |s, e| match verify(s, e) {
        None => {
            bytes += e - s;
            Ok(())
        }
        Some((addr, got)) => Err(reason!("mismatch at {:#x}: wrote {:#x}, read {:#x}", addr, pattern(addr), got)),
    })?;
    Ok(bytes)
}

pub fn check(
    e820: &[E820Entry],
    reserved: &Reserved,
    mode: MemMode,
    mapped: Result<u64, Reason>,
    tsc: Option<Tsc>,
) -> bool {
    let mapped_top = match mapped {
        Ok(top) => top,
        Err(r) => {
            emit!("PROBE mem fail cannot map RAM: {}", r);
            return false;
        }
    };
    let t0 = rdtsc();
    let result = run(e820, reserved, mode, mapped_top);
    let ticks = rdtsc().wrapping_sub(t0);
    match result {
        Ok(0) => {
            emit!("PROBE mem fail no usable RAM to test (empty or missing e820 map)");
            false
        }
        Ok(bytes) => {
            let mbps = match tsc {
                Some(t) if t.ns(ticks) > 0 => (u128::from(bytes) * 1000 / u128::from(t.ns(ticks))) as u64,
                _ => 0,
            };
            emit!("PROBE mem ok mode={} bytes={} mbps={}", mode.name(), bytes, mbps);
            true
        }
        Err(r) => {
            emit!("PROBE mem fail {}", r);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(e820: &[E820Entry], reserved: &Reserved, mode: MemMode, top: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for_each_piece(e820, reserved, mode, top, |s, e| {
            v.push((s, e));
            Ok(())
        })
        .unwrap();
        v
    }

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry { addr, size, kind: E820_RAM }
    }

    #[test]
    fn full_mode_covers_ram_minus_reserved_pages() {
        let e820 = [ram(0, 0x9fc00), E820Entry { addr: 0x9fc00, size: 0x400, kind: 2 }, ram(0x10_0000, 0x10_0000)];
        let mut r = Reserved::new();
        r.add(0x10_0000, 0x2_0000);
        r.add(0x15_0010, 0x10);
        r.add(0x7000, 0x1000);
        let p = pieces(&e820, &r, MemMode::Full, 1 << 32);
        assert_eq!(p, vec![(0, 0x7000), (0x8000, 0x9f000), (0x12_0000, 0x15_0000), (0x15_1000, 0x20_0000)]);
    }

    #[test]
    fn sample_mode_takes_ends_and_one_page_per_gib() {
        let e820 = [ram(0x10_0000, 0xbff0_0000), ram(0x1_0000_0000, 0x1_4000_0000)];
        let r = Reserved::new();
        let p = pieces(&e820, &r, MemMode::Sample, 1 << 40);
        let starts: Vec<u64> = p.iter().map(|&(s, _)| s).collect();
        assert_eq!(
            starts,
            vec![
                0x10_0000,
                0x4000_0000,
                0x8000_0000,
                0xbfff_f000,
                0x1_0000_0000,
                0x1_4000_0000,
                0x1_8000_0000,
                0x1_c000_0000,
                0x2_0000_0000,
                0x2_3fff_f000
            ]
        );
        assert!(p.iter().all(|&(s, e)| e - s == PAGE));
    }

    #[test]
    fn sample_mode_skips_reserved_pages_and_respects_the_map_top() {
        let e820 = [ram(0x10_0000, 0x10_0000), ram(0x1_0000_0000, 0x1_0000_0000)];
        let mut r = Reserved::new();
        r.add(0x10_0000, 0x1000);
        let p = pieces(&e820, &r, MemMode::Sample, 1 << 32);
        assert_eq!(p, vec![(0x1f_f000, 0x20_0000)]);
    }

    #[test]
    fn pattern_differs_between_addresses() {
        assert_ne!(pattern(0x1000), pattern(0x1008));
        assert_ne!(pattern(0x1000), pattern(0x1000 + (1 << 35)));
    }
}
