//! Pieces the devices' fuzzing entry points share: an interrupt sink that records a reset
//! request, and the queue a transport would hand over for a fuzzer-chosen layout.

use std::sync::atomic::{AtomicBool, Ordering};

use kiln_devices::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Records whether the device asked for a reset; interrupts go nowhere.
#[derive(Default)]
pub(crate) struct Recorder {
    reset: AtomicBool,
}

impl Recorder {
    /// Whether the device asked for a reset.
    pub(crate) fn reset_requested(&self) -> bool {
        self.reset.load(Ordering::Relaxed)
    }
}

impl VirtioInterrupt for Recorder {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }

    fn needs_reset(&self, _reason: &str) {
        self.reset.store(true, Ordering::Relaxed);
    }
}

/// The queue a transport would hand over for this layout, or `None` where it would refuse.
pub(crate) fn queue(
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    mem: &GuestMemory,
) -> Option<Queue> {
    let mut q = Queue::new(size).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(avail)).ok()?;
    q.try_set_used_ring_address(GuestAddress(used)).ok()?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

/// Where a packed split queue of `size` entries puts its rings when it starts at `base`:
/// (descriptor table, available ring, used ring).
pub(crate) fn packed_layout(base: u64, size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    let avail = base + 16 * n;
    (base, avail, (avail + 6 + 2 * n).div_ceil(4) * 4)
}

/// Guest memory of `len` bytes at address 0 holding `image` (cut to fit; zero past it).
pub(crate) fn guest_image(image: &[u8], len: usize) -> Option<GuestMemory> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), len)]).ok()?;
    mem.write_slice(&image[..image.len().min(len)], GuestAddress(0))
        .ok()?;
    Some(mem)
}
