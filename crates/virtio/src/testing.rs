//! Test helpers: a driver-side split queue in guest memory that tests fill with any
//! descriptors they like (hostile ones included), and an interrupt that records what a device
//! asked for.

// Test indices and sizes are small.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_devices::virtio::{ActiveQueue, GuestMemory, InterruptKind, VirtioInterrupt};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory of `size` bytes at address 0.
pub(crate) fn guest_memory(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A fixed pseudo-random sequence (xorshift64) for tests that mutate inputs.
pub(crate) fn xorshift() -> impl FnMut() -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// A split queue seen from the driver. The rings sit at `base`; buffers are handed out from
/// `base + 64 KiB` upwards.
pub(crate) struct TestDriver {
    mem: GuestMemory,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    heap: u64,
    notify: Option<EventFd>,
}

impl TestDriver {
    /// A queue of `size` entries whose rings start at `base`, packed as the specification
    /// allows. (virtio-queue 0.18's `MockSplitQueue` places the used ring `size` bytes after
    /// the available ring's start, inside it, so it is not used for layout here.)
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n).div_ceil(4) * 4;
        assert!(
            used + 6 + 8 * n <= base + 0x1_0000,
            "rings overlap the buffer heap"
        );
        for a in (base..used + 6 + 8 * n).step_by(8) {
            mem.write_obj(0u64, GuestAddress(a)).unwrap();
        }
        TestDriver {
            mem: mem.clone(),
            size,
            desc: GuestAddress(base),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            heap: base + 0x1_0000,
            notify: None,
        }
    }

    /// The device side of the queue, configured and ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(self.desc).unwrap();
        q.try_set_avail_ring_address(self.avail).unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_ready(true);
        q
    }

    /// The queue wrapped for activation, with a fresh notification eventfd that
    /// [`TestDriver::kick`] signals.
    pub fn active(&mut self, index: u16) -> ActiveQueue {
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.notify = Some(notify.try_clone().unwrap());
        ActiveQueue {
            index,
            queue: self.queue(),
            notify,
        }
    }

    /// Notifies the device.
    pub fn kick(&self) {
        self.notify.as_ref().unwrap().write(1).unwrap();
    }

    /// `len` bytes of guest memory for buffers (64-byte aligned).
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = GuestAddress(self.heap);
        self.heap += len.div_ceil(64) * 64;
        a
    }

    /// A buffer filled with `data`.
    pub fn buffer(&mut self, data: &[u8]) -> GuestAddress {
        let a = self.alloc(data.len() as u64);
        self.mem.write_slice(data, a).unwrap();
        a
    }

    /// Writes descriptor `index` as given.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc.0 + u64::from(index) * 16;
        self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), GuestAddress(at + 14))
            .unwrap();
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail.0 + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::Release);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(self.avail.0 + 2))
            .unwrap();
    }

    /// Sets the available ring's index to any value (hostile tests).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail.0 + 2))
            .unwrap();
    }

    /// Sets the available ring's flags.
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem
            .write_obj(flags.to_le(), GuestAddress(self.avail.0))
            .unwrap();
    }

    /// Sets `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        let at = self.avail.0 + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj::<u16>(self.used).unwrap()
    }

    /// `avail_event` (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = self.used.0 + 4 + 8 * u64::from(self.size);
        self.mem.read_obj::<u16>(GuestAddress(at)).unwrap()
    }

    /// Adds a chain of `(addr, len, device-writable)` buffers using the next free
    /// descriptors, publishes it and returns its head.
    pub fn add_chain(&mut self, bufs: &[(GuestAddress, u32, bool)]) -> u16 {
        let head = self.next_desc % self.size;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(idx, addr.0, len, flags, (idx + 1) % self.size);
        }
        self.next_desc = self.next_desc.wrapping_add(bufs.len() as u16);
        self.publish(head);
        head
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self) -> u16 {
        let idx = self
            .mem
            .read_obj::<u16>(GuestAddress(self.used.0 + 2))
            .unwrap();
        // Entries up to idx are read after idx.
        std::sync::atomic::fence(Ordering::Acquire);
        idx
    }

    /// The next used entry, if the device produced one.
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let at = self.used.0 + 4 + slot * 8;
        let id = self.mem.read_obj::<u32>(GuestAddress(at)).unwrap();
        let len = self.mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Waits up to 5 s for the next used entry.
    pub fn wait_used(&mut self) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = self.next_used() {
                return u;
            }
            assert!(Instant::now() < deadline, "the device used nothing");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }
}

/// Records what a device signalled.
#[derive(Default)]
pub(crate) struct TestInterrupt {
    pub queue_triggers: AtomicU64,
    pub config_triggers: AtomicU64,
    pub resets: Mutex<Vec<String>>,
}

impl TestInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reasons the device gave for needing a reset.
    pub fn reset_reasons(&self) -> Vec<String> {
        self.resets.lock().unwrap().clone()
    }

    /// Waits up to 5 s for a needs-reset request.
    pub fn wait_reset(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = self.reset_reasons().first() {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the device never asked for a reset"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl VirtioInterrupt for TestInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Config => self.config_triggers.fetch_add(1, Ordering::SeqCst),
            InterruptKind::Queue(_) => self.queue_triggers.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }

    fn needs_reset(&self, reason: &str) {
        self.resets.lock().unwrap().push(reason.to_owned());
    }
}
