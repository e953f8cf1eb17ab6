//! Rate-limited logging for messages a guest can trigger: a guest must not be able to fill
//! the host's disk with our log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Messages allowed per window, per call site.
pub const BURST: u64 = 10;
/// Window length in seconds.
pub const WINDOW_SECS: u64 = 10;

/// Per-call-site state: the window start (seconds) and the count in it, packed.
#[derive(Debug, Default)]
pub struct RateLimiter {
    state: AtomicU64,
}

impl RateLimiter {
    /// A limiter with an empty window.
    pub const fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
        }
    }

    /// Whether a message may be logged now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> bool {
        let cur = self.state.load(Ordering::Relaxed);
        let (start, count) = (cur >> 16, cur & 0xffff);
        let (start, count) = if now >= start + WINDOW_SECS {
            (now, 0)
        } else {
            (start, count)
        };
        let next = (start << 16) | (count + 1).min(0xffff);
        self.state.store(next, Ordering::Relaxed);
        count < BURST
    }
}

/// `log::warn!`, at most [`BURST`] times per [`WINDOW_SECS`] from each call site.
#[macro_export]
macro_rules! warn_ratelimited {
    ($($arg:tt)*) => {{
        static LIMITER: $crate::ratelimit::RateLimiter = $crate::ratelimit::RateLimiter::new();
        if LIMITER.allow() {
            log::warn!($($arg)*);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_drops_until_the_window_passes() {
        let l = RateLimiter::new();
        let allowed = (0..100).filter(|_| l.allow_at(1000)).count() as u64;
        assert_eq!(allowed, BURST);
        assert!(!l.allow_at(1000 + WINDOW_SECS - 1));
        assert!(l.allow_at(1000 + WINDOW_SECS));
    }
}
