//! Page-aligned I/O buffers.
//!
//! The kernel copies between the page cache and user memory with `rep movsb`, which on some
//! CPUs (AMD Zen measured here) runs several times slower when the user buffer is not
//! aligned like the page it copies to or from. A plain `Vec<u8>` from malloc starts 16 bytes
//! into a page; qemu-img uses page-aligned buffers, and so do we.

/// Alignment of [`PageBuf`] data.
const ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose data starts on a page boundary.
#[derive(Default)]
pub(crate) struct PageBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    /// A buffer of `len` zero bytes.
    pub(crate) fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        // align_offset on a u8 pointer always succeeds; the fallback keeps it total.
        let start = storage.as_ptr().align_offset(ALIGN).min(ALIGN);
        PageBuf {
            storage,
            start,
            len,
        }
    }

    /// Usable length.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_buf_starts_on_a_page_and_is_zeroed() {
        for len in [0, 1, 4096, 2 << 20] {
            let b = PageBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }
}
