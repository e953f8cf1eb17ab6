//! Small formatting helpers (there is no allocator).

use core::fmt;

/// A fixed-capacity string for messages built at run time (truncates).
#[derive(Clone, Copy)]
pub struct StrBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for StrBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> StrBuf<N> {
    pub const fn new() -> Self {
        StrBuf { buf: [0; N], len: 0 }
    }

    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are appended, but truncation may split a UTF-8
        // sequence; fall back to the valid prefix.
        match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl<const N: usize> fmt::Write for StrBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl<const N: usize> fmt::Debug for StrBuf<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> fmt::Display for StrBuf<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A short failure reason (kept under clippy's 128-byte `result_large_err` limit).
pub type Reason = StrBuf<112>;

/// Builds a [`Reason`] with `format!`-like syntax.
#[macro_export]
macro_rules! reason {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut r = $crate::util::Reason::new();
        let _ = write!(r, $($arg)*);
        r
    }};
}

/// Displays `value / 1000` with three decimals, e.g. `1.234`.
pub struct Milli(pub u64);

impl fmt::Display for Milli {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// Displays a sorted list of ids compactly: `0-3,8,10-11`.
pub struct IdList<'a>(pub &'a [u32]);

impl fmt::Display for IdList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = self.0;
        let mut i = 0;
        let mut first = true;
        while i < ids.len() {
            let mut j = i;
            while j + 1 < ids.len() && ids[j + 1] == ids[j].wrapping_add(1) {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j > i {
                write!(f, "{}-{}", ids[i], ids[j])?;
            } else {
                write!(f, "{}", ids[i])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// Displays bytes as text, replacing control and non-ASCII bytes with `?`
/// so that a line stays one line.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = if (0x20..0x7f).contains(&b) { b } else { b'?' };
            fmt::Write::write_char(f, char::from(c))?;
        }
        Ok(())
    }
}

/// Reads a little-endian value of type `T` from physical memory.
///
/// # Safety
/// `addr..addr + size_of::<T>()` must be mapped and readable.
#[inline]
pub unsafe fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: the caller guarantees the bytes are mapped; unaligned reads are fine.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_list_compacts_runs() {
        assert_eq!(format!("{}", IdList(&[0, 1, 2, 3, 8, 10, 11])), "0-3,8,10-11");
        assert_eq!(format!("{}", IdList(&[5])), "5");
        assert_eq!(format!("{}", IdList(&[])), "");
    }

    #[test]
    fn milli_prints_three_decimals() {
        assert_eq!(format!("{}", Milli(5074)), "5.074");
        assert_eq!(format!("{}", Milli(7)), "0.007");
    }

    #[test]
    fn strbuf_truncates_without_splitting_utf8() {
        use core::fmt::Write as _;
        let mut b = StrBuf::<4>::new();
        let _ = write!(b, "ab\u{e9}\u{e9}");
        assert_eq!(b.as_str(), "ab\u{e9}");
    }

    #[test]
    fn printable_masks_control_bytes() {
        assert_eq!(format!("{}", Printable(b"a\nb\x80")), "a?b?");
    }
}
