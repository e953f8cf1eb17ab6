//! Aligned bounce buffers (O_DIRECT needs aligned memory) and copies between iovecs and a
//! buffer.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// A zeroed heap buffer whose start is aligned to a power of two.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory; nothing in it is tied to a thread.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least 1) aligned to `align`; `None` if `align` is not
    /// a power of two, the size overflows, or memory is exhausted.
    pub fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(Self { ptr, layout })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Whether the buffer is empty (never: the length is at least 1).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of layout.size() initialised (zeroed) bytes owned
        // by self; the borrow of self keeps it alive and unaliased by &mut.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The contents, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// Start of the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this exact layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.layout.size())
            .field("align", &self.layout.align())
            .finish()
    }
}

/// Whether every iovec starts and ends on `align` (a power of two).
pub(crate) fn iovecs_aligned(iovecs: &[libc::iovec], align: usize) -> bool {
    let mask = align - 1;
    iovecs
        .iter()
        .all(|v| (v.iov_base as usize) & mask == 0 && v.iov_len & mask == 0)
}

/// Copies `src` into the memory `iovecs` describe, in order, until either runs out.
///
/// # Safety
///
/// Every iovec must describe writable memory that does not overlap `src`.
pub(crate) unsafe fn copy_to_iovecs(iovecs: &[libc::iovec], src: &[u8]) {
    let mut done = 0;
    for v in iovecs {
        if done >= src.len() {
            break;
        }
        let n = v.iov_len.min(src.len() - done);
        // SAFETY: the caller guarantees the iovec is writable for iov_len >= n bytes and does
        // not overlap src; src has n bytes left at `done`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), v.iov_base.cast(), n) };
        done += n;
    }
}

/// Copies the memory `iovecs` describe, in order, into `dst` until either runs out.
///
/// # Safety
///
/// Every iovec must describe readable memory that does not overlap `dst`.
pub(crate) unsafe fn copy_from_iovecs(iovecs: &[libc::iovec], dst: &mut [u8]) {
    let mut done = 0;
    for v in iovecs {
        if done >= dst.len() {
            break;
        }
        let n = v.iov_len.min(dst.len() - done);
        // SAFETY: the caller guarantees the iovec is readable for iov_len >= n bytes and does
        // not overlap dst; dst has n bytes left at `done`.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), dst.as_mut_ptr().add(done), n)
        };
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(8192, 4096).unwrap();
        assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        assert!(AlignedBuf::new(10, 3).is_none());
    }

    #[test]
    fn copies_through_iovecs_in_order() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs point at the local arrays above, which outlive the calls.
        unsafe { copy_to_iovecs(&iov, &[1, 2, 3, 4, 5, 6, 7]) };
        let mut back = [0u8; 8];
        // SAFETY: as above.
        unsafe { copy_from_iovecs(&iov, &mut back) };
        assert_eq!(a, [1, 2, 3]);
        assert_eq!(b, [4, 5, 6, 7, 0]);
        assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 0]);
    }

    #[test]
    fn alignment_check_looks_at_base_and_length() {
        let mut buf = AlignedBuf::new(8192, 4096).unwrap();
        let p = buf.as_mut_ptr();
        let ok = [libc::iovec {
            iov_base: p.cast(),
            iov_len: 4096,
        }];
        let short = [libc::iovec {
            iov_base: p.cast(),
            iov_len: 100,
        }];
        assert!(iovecs_aligned(&ok, 512));
        assert!(!iovecs_aligned(&short, 512));
    }
}
