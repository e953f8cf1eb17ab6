//! Memory the virtio devices read and write: one reserved arena of RAM below
//! 4 GiB (identity mapped, so a pointer is a guest-physical address), handed
//! out bump-style and never freed. One reservation, however many rings and
//! buffers, so the memory test skips all of it and the reservation table
//! does not fill up.

use crate::bootinfo::E820Entry;
use crate::ranges::{align_up, Reserved, PAGE};

pub struct Dma {
    next: u64,
    end: u64,
}

impl Dma {
    /// Reserves up to `size` bytes (halving down to 1 MiB if RAM is short).
    pub fn new(e820: &[E820Entry], reserved: &mut Reserved, size: u64) -> Option<Dma> {
        let mut size = align_up(size.max(1 << 20), PAGE);
        loop {
            if let Some(base) = reserved.alloc(e820, size, 1 << 20, 1 << 32) {
                return Some(Dma { next: base, end: base + size });
            }
            if size <= 1 << 20 {
                return None;
            }
            size /= 2;
        }
    }

    /// A host-test arena over memory the caller owns.
    #[cfg(test)]
    pub fn over(base: u64, size: u64) -> Dma {
        Dma { next: base, end: base + size }
    }

    /// `size` zeroed bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let a = align_up(self.next, align);
        let end = a.checked_add(size)?;
        if end > self.end {
            return None;
        }
        // SAFETY: [a, end) lies in the arena (reserved RAM, identity mapped, or
        // the caller's buffer in host tests) and was never handed out.
        unsafe { core::ptr::write_bytes(a as *mut u8, 0, usize::try_from(size).ok()?) };
        self.next = end;
        Some(a)
    }

    /// Bytes left.
    pub fn left(&self) -> u64 {
        self.end - self.next
    }
}
