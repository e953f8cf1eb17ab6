//! COM1 output: one `outb` per byte, no LSR polling (virtual UARTs never
//! back-pressure, and every poll would be one more VM exit).

use core::fmt;

#[cfg(not(test))]
const COM1: u16 = 0x3f8;

/// Writer for `core::fmt` that sends bytes to COM1.
pub struct Com1;

impl Com1 {
    /// Sends raw bytes.
    #[cfg(not(test))]
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            // SAFETY: COM1's data register; writing it only transmits a byte.
            unsafe { crate::io::outb(COM1, b) };
        }
    }

    /// Host unit tests: stdout instead of the port.
    #[cfg(test)]
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        use std::io::Write as _;
        let _ = std::io::stdout().write_all(bytes);
    }
}

impl fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints one output line (a `\n` is appended).
#[macro_export]
macro_rules! emit {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Com1, $($arg)*);
    }};
}
