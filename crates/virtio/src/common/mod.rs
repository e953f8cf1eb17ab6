//! What the devices share: descriptor-chain checks, guest buffers as iovecs, interrupt
//! suppression, and the worker-thread lifecycle.

pub(crate) mod chain;
pub(crate) mod fuzzing;
pub(crate) mod worker;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kiln_devices::virtio::{GuestMemory, InterruptKind, VirtioError, VirtioInterrupt};
use kiln_devices::warn_ratelimited;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// The driver does not want interrupts (avail ring flags, without EVENT_IDX).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// A guest range that is not entirely guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest buffer at {addr:#x} ({len} bytes) is not in guest RAM")]
pub struct BadGuestRange {
    /// Start of the range.
    pub addr: u64,
    /// Its length.
    pub len: usize,
}

/// Appends iovecs covering `len` bytes of guest memory at `addr` (several when the range
/// spans memory regions). Nothing is appended when the range is not all RAM.
pub(crate) fn push_iovecs(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: usize,
    out: &mut Vec<libc::iovec>,
) -> Result<(), BadGuestRange> {
    if len == 0 {
        return Ok(());
    }
    // Nearly every buffer lies in one region: one lookup instead of the general iterator
    // (which showed up in the receive thread's profile).
    if let Ok(slice) = GuestMemoryBackend::get_slice(mem, addr, len) {
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
        return Ok(());
    }
    let bad = BadGuestRange { addr: addr.0, len };
    let start = out.len();
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let Ok(slice) = slice else {
            out.truncate(start);
            return Err(bad);
        };
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    Ok(())
}

/// Tells the driver about new used buffers on `queue` unless it asked not to be told
/// (EVENT_IDX `used_event`, or VRING_AVAIL_F_NO_INTERRUPT without EVENT_IDX). Returns
/// whether it sent an interrupt.
pub(crate) fn signal_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &Arc<dyn VirtioInterrupt>,
    index: u16,
) -> bool {
    let wanted = if queue.event_idx_enabled() {
        queue.needs_notification(mem).unwrap_or(true)
    } else {
        std::sync::atomic::fence(Ordering::SeqCst);
        let flags: u16 = mem
            .read_obj(GuestAddress(queue.avail_ring()))
            .map(u16::from_le)
            .unwrap_or(0);
        flags & VRING_AVAIL_F_NO_INTERRUPT == 0
    };
    if wanted {
        if let Err(e) = interrupt.trigger(InterruptKind::Queue(index)) {
            warn_ratelimited!("virtio: cannot signal queue {index}: {e}");
        }
    }
    wanted
}

/// Whether the driver made buffers available that the device has not taken yet.
pub(crate) fn has_avail(queue: &Queue, mem: &GuestMemory) -> bool {
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Queue progress kept by a device across pause/save/restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueProgress {
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

impl QueueProgress {
    /// The progress of `queue`.
    pub(crate) fn of(queue: &Queue) -> Self {
        QueueProgress {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }

    /// Puts `queue` back where it was.
    pub(crate) fn apply(&self, queue: &mut Queue) {
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
    }
}

/// Copies the part of `space` at `offset` into `data`; bytes past its end read as zero.
pub(crate) fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off >= space.len() {
        return;
    }
    let n = data.len().min(space.len() - off);
    data[..n].copy_from_slice(&space[off..off + n]);
}

/// A device's saved state as JSON (`save_state`).
pub(crate) fn state_to_json<T: serde::Serialize>(
    device: &'static str,
    state: &T,
) -> Result<serde_json::Value, VirtioError> {
    serde_json::to_value(state).map_err(|e| state_error(device, e.to_string()))
}

/// A device's saved state read back from JSON (`restore_state`).
pub(crate) fn state_from_json<T: serde::de::DeserializeOwned>(
    device: &'static str,
    state: serde_json::Value,
) -> Result<T, VirtioError> {
    serde_json::from_value(state).map_err(|e| state_error(device, e.to_string()))
}

/// A state error of `device`.
pub(crate) fn state_error(device: &'static str, reason: impl Into<String>) -> VirtioError {
    VirtioError::State {
        device,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ranges_become_one_iovec_per_region_and_ranges_outside_ram_none() {
        // Two adjacent regions, then a hole.
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap();
        let base = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap();
        let mut out = Vec::new();
        push_iovecs(&mem, GuestAddress(0x100), 0x200, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].iov_base.cast::<u8>(), out[0].iov_len),
            (base(0x100), 0x200)
        );
        out.clear();
        push_iovecs(&mem, GuestAddress(0xf00), 0x200, &mut out).unwrap();
        let got: Vec<_> = out
            .iter()
            .map(|v| (v.iov_base.cast::<u8>(), v.iov_len))
            .collect();
        assert_eq!(got, [(base(0xf00), 0x100), (base(0x1000), 0x100)]);
        // Past the end of RAM: nothing appended, what was there stays.
        let e = push_iovecs(&mem, GuestAddress(0x1f00), 0x200, &mut out).unwrap_err();
        assert_eq!(
            e,
            BadGuestRange {
                addr: 0x1f00,
                len: 0x200
            }
        );
        assert_eq!(out.len(), 2);
        assert!(push_iovecs(&mem, GuestAddress(0x9000), 1, &mut out).is_err());
        push_iovecs(&mem, GuestAddress(0x9000), 0, &mut out).unwrap();
        assert_eq!(out.len(), 2);
    }
}
