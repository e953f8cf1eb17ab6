//! The host side of the serial console: raw terminal mode for stdin, and writers that send
//! guest output straight to a file descriptor.

use std::io::Write;
use std::os::fd::RawFd;

/// A terminal switched to raw input mode; restored on drop.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts `fd` in raw input mode if it is a terminal. Output processing stays on, so a
    /// guest's bare `\n` still starts a new line.
    pub fn enter(fd: RawFd) -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd is a terminal; raw is a valid termios derived from its current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from this terminal in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Writes straight to a file descriptor, unbuffered: guest output appears as the guest
/// writes it.
pub struct FdWriter(pub RawFd);

impl Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            // SAFETY: buf is a valid readable slice of buf.len() bytes.
            let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(usize::try_from(n).unwrap_or(0));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Ctrl-A: the escape prefix on a raw terminal (Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A).
pub const ESCAPE: u8 = 0x01;

/// Splits terminal input into bytes for the guest and a quit request.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending_escape: bool,
}

impl EscapeFilter {
    /// Appends to `out` what the guest should get from `input`; returns true on Ctrl-A x.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.pending_escape {
                self.pending_escape = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending_escape = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        let mut out = vec![];
        assert!(!f.feed(b"ab\x01\x01c\x01", &mut out));
        assert_eq!(out, b"ab\x01c");
        assert!(!f.feed(b"q", &mut out));
        assert_eq!(out, b"ab\x01c\x01q");
        assert!(f.feed(b"\x01x", &mut out));
    }
}
