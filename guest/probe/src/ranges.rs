//! Physical address ranges the probe must not touch (its image, the VMM's boot
//! data, ACPI tables, page tables, the AP trampoline) and a page allocator
//! that hands out RAM avoiding them.

use crate::bootinfo::{E820Entry, E820_RAM};

pub const PAGE: u64 = 4096;
const MAX_RANGES: usize = 128;

/// A half-open physical range `[start, end)`.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// Ranges in use; the allocator and the memory test stay out of them.
pub struct Reserved {
    ranges: [Range; MAX_RANGES],
    len: usize,
    /// Set when an `add` did not fit; the memory test then refuses to run.
    pub overflowed: bool,
}

pub const fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}

pub const fn align_up(x: u64, a: u64) -> u64 {
    x.saturating_add(a - 1) & !(a - 1)
}

impl Default for Reserved {
    fn default() -> Self {
        Self::new()
    }
}

impl Reserved {
    pub const fn new() -> Self {
        Reserved { ranges: [Range { start: 0, end: 0 }; MAX_RANGES], len: 0, overflowed: false }
    }

    /// Reserves the whole pages covering `[start, start + size)`.
    pub fn add(&mut self, start: u64, size: u64) {
        if size == 0 {
            return;
        }
        let r = Range { start: align_down(start, PAGE), end: align_up(start.saturating_add(size), PAGE) };
        if self.len == MAX_RANGES {
            self.overflowed = true;
            return;
        }
        self.ranges[self.len] = r;
        self.len += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range> {
        self.ranges[..self.len].iter()
    }

    /// The first reserved range overlapping `[start, end)`, if any.
    pub fn overlap(&self, start: u64, end: u64) -> Option<&Range> {
        self.iter().find(|r| r.start < end && start < r.end)
    }

    /// Finds `size` bytes (page multiple) of RAM in `[lo, hi)`, page aligned,
    /// outside every reserved range, and reserves it.
    pub fn alloc(&mut self, e820: &[E820Entry], size: u64, lo: u64, hi: u64) -> Option<u64> {
        if self.len == MAX_RANGES {
            return None;
        }
        for e in e820.iter().filter(|e| e.kind == E820_RAM) {
            let mut start = align_up(e.addr.max(lo), PAGE);
            let end = align_down(e.end().min(hi), PAGE);
            while start.checked_add(size).is_some_and(|x| x <= end) {
                match self.overlap(start, start + size) {
                    Some(r) => start = align_up(r.end, PAGE),
                    None => {
                        self.add(start, size);
                        return Some(start);
                    }
                }
            }
        }
        None
    }
}

impl Reserved {
    /// Like [`Reserved::alloc`], but the highest fit: the last free `size`
    /// bytes of the highest RAM entry in `[lo, hi)` that has them.
    pub fn alloc_top(&mut self, e820: &[E820Entry], size: u64, lo: u64, hi: u64) -> Option<u64> {
        if self.len == MAX_RANGES {
            return None;
        }
        let mut best = None;
        for e in e820.iter().filter(|e| e.kind == E820_RAM) {
            let start = align_up(e.addr.max(lo), PAGE);
            let mut end = align_down(e.end().min(hi), PAGE);
            while end >= start.saturating_add(size) {
                let cand = end - size;
                match self.overlap(cand, end) {
                    Some(r) => end = align_down(r.start, PAGE),
                    None => {
                        best = best.max(Some(cand));
                        break;
                    }
                }
            }
        }
        let at = best?;
        self.add(at, size);
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry { addr, size, kind: E820_RAM }
    }

    #[test]
    fn alloc_skips_reserved_ranges_and_non_ram() {
        let e820 = [ram(0, 0x9fc00), E820Entry { addr: 0x9fc00, size: 0x400, kind: 2 }, ram(0x10_0000, 0x100_0000)];
        let mut r = Reserved::new();
        r.add(0x10_0000, 0x3_0000); // image
        r.add(0x13_1234, 10); // boot data, not page aligned
        assert_eq!(r.alloc(&e820, 2 * PAGE, 1 << 20, 1 << 32), Some(0x13_2000));
        assert_eq!(r.alloc(&e820, PAGE, 1 << 20, 1 << 32), Some(0x13_0000));
        assert_eq!(r.alloc(&e820, PAGE, 0x1000, 0xa0000), Some(0x1000));
        assert!(r.overlap(0x13_2000, 0x13_3000).is_some());
    }

    #[test]
    fn alloc_top_takes_the_highest_free_pages() {
        let e820 = [ram(0, 0x9fc00), ram(0x10_0000, 0x100_0000), ram(0x1_0000_0000, 0x1000_0000)];
        let mut r = Reserved::new();
        r.add(0x10f_f000, 0x1000);
        assert_eq!(r.alloc_top(&e820, PAGE, 1 << 20, 1 << 32), Some(0x10f_e000));
        assert_eq!(r.alloc_top(&e820, PAGE, 1 << 20, 1 << 32), Some(0x10f_d000));
        assert_eq!(r.alloc_top(&e820, 2 * PAGE, 0, 0x9f000), Some(0x9d000));
        assert_eq!(r.alloc_top(&e820, 0x200_0000, 0, 1 << 32), None);
    }

    #[test]
    fn alloc_fails_when_nothing_fits() {
        let e820 = [ram(0x10_0000, 0x10_0000)];
        let mut r = Reserved::new();
        assert_eq!(r.alloc(&e820, 0x20_0000, 0, u64::MAX), None);
        assert_eq!(r.alloc(&e820, PAGE, 0, 0x10_0000), None);
    }
}
