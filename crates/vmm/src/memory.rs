//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings (so a guest larger than what it
//! touches costs only what it touches), registered with KVM as one memory slot per range.

use kiln_arch::layout::ram_ranges;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// Guest memory as the VMM sees it.
pub type GuestMemory = GuestMemoryMmap;

/// Largest single KVM slot: KVM caps a slot at 2^31 - 1 pages; stay well under.
const MAX_SLOT_SIZE: u64 = 1 << 40;

/// Memory errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {size:#x} bytes of guest RAM")]
    Mmap {
        /// Bytes asked for.
        size: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Regions could not form an address space.
    #[error("guest RAM regions overlap or are invalid: {0}")]
    Layout(String),
    /// The size does not fit this host's address space.
    #[error("{size:#x} bytes of guest RAM is too large for this host")]
    TooLarge {
        /// Bytes asked for.
        size: u64,
    },
    /// KVM's page tracking for this much RAM could exhaust the host.
    #[error("--memory {}: KVM may need up to {} MiB of host kernel memory to track this much guest RAM, and the host has {} MiB available", crate::config::MemorySize(*mem_size), needed >> 20, available >> 20)]
    TrackingTooLarge {
        /// Guest RAM.
        mem_size: u64,
        /// Estimated metadata.
        needed: u64,
        /// Host MemAvailable.
        available: u64,
    },
    /// KVM refused a slot.
    #[error("KVM refused memory slot {slot} ({size:#x} bytes at {gpa:#x})")]
    Slot {
        /// Slot number.
        slot: u32,
        /// Guest-physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Host kernel memory KVM may spend per 4 KiB guest page on page tracking when it shadows
/// guest page tables (reverse maps, write tracking): measured at about 10 bytes.
const KVM_TRACKING_BYTES_PER_PAGE: u64 = 10;

/// Refuses guest RAM whose KVM page-tracking metadata could exceed the host's available
/// memory. KVM allocates that metadata when a slot is registered on hosts that shadow guest
/// page tables (nested or without EPT/NPT); running out takes the whole host down through
/// the OOM killer, so a clear error first is better. `available` is `MemAvailable`.
pub fn check_tracking_fits(mem_size: u64, available: Option<u64>) -> Result<(), MemoryError> {
    let needed = mem_size / 4096 * KVM_TRACKING_BYTES_PER_PAGE;
    match available {
        Some(available) if needed > available => Err(MemoryError::TrackingTooLarge {
            mem_size,
            needed,
            available,
        }),
        _ => Ok(()),
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn host_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Maps guest RAM for `mem_size` bytes, following the layout's RAM ranges.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(mem_size) {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge { size: mem_size })?;
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Mmap { size, source })?;
        // Guest RAM has no place in a core dump of the VMM.
        // SAFETY: the range is exactly the mapping just created; madvise only sets a flag.
        unsafe {
            libc::madvise(mapping.as_ptr().cast(), len, libc::MADV_DONTDUMP);
        }
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Layout(format!("region at {start:#x} wraps around")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

/// A KVM slot: guest-physical range and host address.
#[derive(Clone, Copy, Debug)]
pub struct SlotSpec {
    /// Slot number.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the start.
    pub host: u64,
}

/// Deferred slots are at most this large: registering one can hold up running vCPUs on
/// hosts that shadow page tables, so smaller slots let the guest make progress between them.
const DEFERRED_SLOT_SIZE: u64 = 64 << 30;

/// The slots that cover `mem`: those wholly below [`SYNC_SLOT_LIMIT`] first (each at most
/// [`MAX_SLOT_SIZE`]), then the rest in pieces of [`DEFERRED_SLOT_SIZE`], grown if needed to
/// stay within `max_slots` slots in all.
pub fn slots(mem: &GuestMemory, max_slots: usize) -> Vec<SlotSpec> {
    // (gpa, size, host) pieces split at the sync limit.
    let mut pieces = Vec::new();
    for region in mem.iter() {
        let (base, len, host) = (region.start_addr().0, region.len(), region.as_ptr() as u64);
        let split = SYNC_SLOT_LIMIT.clamp(base, base + len) - base;
        if split > 0 {
            pieces.push((base, split, host));
        }
        if split < len {
            pieces.push((base + split, len - split, host + split));
        }
    }
    let deferred: u64 = pieces
        .iter()
        .filter(|p| p.0 >= SYNC_SLOT_LIMIT)
        .map(|p| p.1)
        .sum();
    let budget = (max_slots.max(16) as u64 - 8).max(1);
    let chunk = DEFERRED_SLOT_SIZE.max(deferred.div_ceil(budget).next_multiple_of(1 << 30));
    let mut out = Vec::new();
    for (gpa, len, host) in pieces {
        let max = if gpa >= SYNC_SLOT_LIMIT {
            chunk
        } else {
            MAX_SLOT_SIZE
        };
        let mut off = 0;
        while off < len {
            let size = (len - off).min(max);
            let slot = u32::try_from(out.len()).unwrap_or(u32::MAX);
            out.push(SlotSpec {
                slot,
                gpa: gpa + off,
                size,
                host: host + off,
            });
            off += size;
        }
    }
    out
}

/// Registers one slot with KVM.
pub fn register_slot(vm: &VmFd, s: SlotSpec) -> Result<(), MemoryError> {
    let region = kvm_userspace_memory_region {
        slot: s.slot,
        flags: 0,
        guest_phys_addr: s.gpa,
        memory_size: s.size,
        userspace_addr: s.host,
    };
    // SAFETY: the host range belongs to a guest memory mapping that lives as long as the VM
    // (the `GuestMemory` is kept by the VM until after the VM fd is closed).
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot {
        slot: s.slot,
        gpa: s.gpa,
        size: s.size,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_count_stays_within_kvms_limit() {
        let mem = create_guest_memory(64 << 40).unwrap();
        let s = slots(&mem, 32);
        assert!(s.len() <= 32, "{} slots", s.len());
        assert_eq!(s.iter().map(|s| s.size).sum::<u64>(), 64 << 40);
    }

    #[test]
    fn tracking_guard_refuses_what_would_exhaust_the_host() {
        assert!(check_tracking_fits(4 << 40, Some(23 << 30)).is_ok());
        let e = check_tracking_fits(64 << 40, Some(23 << 30))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--memory 64T"), "{e}");
        assert!(check_tracking_fits(64 << 40, None).is_ok());
    }

    #[test]
    fn huge_guest_maps_lazily_and_splits_into_slots() {
        let mem = create_guest_memory(4 << 40).unwrap();
        let s = slots(&mem, 509);
        let total: u64 = s.iter().map(|s| s.size).sum();
        assert_eq!(total, 4 << 40);
        assert!(s.iter().all(|s| s.size <= MAX_SLOT_SIZE));
        assert_eq!(s[0].gpa, 0);
        assert_eq!(s[1].gpa, 1 << 32);
        // Nothing straddles the sync limit, and deferred slots stay small.
        assert!(s
            .iter()
            .all(|s| s.gpa >= SYNC_SLOT_LIMIT || s.gpa + s.size <= SYNC_SLOT_LIMIT));
        assert_eq!(s[1].gpa + s[1].size, SYNC_SLOT_LIMIT);
        assert!(s
            .iter()
            .filter(|s| s.gpa >= SYNC_SLOT_LIMIT)
            .all(|s| s.size <= DEFERRED_SLOT_SIZE));
        for w in s.windows(2) {
            assert!(w[0].slot < w[1].slot);
        }
    }
}

/// Slots below this guest-physical address are registered before the guest starts; the
/// rest are registered by a background thread while the guest already runs.
///
/// On hosts where KVM shadows guest page tables, registering a slot costs time in
/// proportion to its size (about 6 ms per GiB here, and several seconds for terabytes), so
/// a huge guest would otherwise wait that long for its first instruction. Until its slot is
/// in, an access to deferred RAM exits to kiln as MMIO and [`PendingRam`] serves it.
pub const SYNC_SLOT_LIMIT: u64 = 16 << 30;

/// Progress of the background slot registration, shared with [`PendingRam`].
#[derive(Default)]
pub struct DeferredSlots {
    /// Index (in the deferred list) of the first slot not yet registered; `usize::MAX` once
    /// registration failed.
    done: std::sync::Mutex<usize>,
    changed: std::sync::Condvar,
    stopping: std::sync::atomic::AtomicBool,
}

impl DeferredSlots {
    fn set_done(&self, n: usize) {
        *kiln_devices::bus::lock(&self.done) = n;
        self.changed.notify_all();
    }

    /// Makes waiters give up: the VM is shutting down.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Waits until deferred slot `index` is registered; false if it never will be.
    fn wait_for(&self, index: usize) -> bool {
        let mut done = kiln_devices::bus::lock(&self.done);
        loop {
            if *done == usize::MAX || self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            if *done > index {
                return true;
            }
            done = self
                .changed
                .wait_timeout(done, std::time::Duration::from_millis(100))
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }
}

/// Registers `deferred` slots in order on a background thread.
pub fn register_in_background(
    vm: std::sync::Arc<VmFd>,
    deferred: Vec<SlotSpec>,
    progress: std::sync::Arc<DeferredSlots>,
) -> std::io::Result<std::thread::JoinHandle<Result<(), MemoryError>>> {
    std::thread::Builder::new()
        .name("kiln-memslots".into())
        .spawn(move || {
            for (i, s) in deferred.iter().enumerate() {
                if let Err(e) = register_slot(&vm, *s) {
                    progress.set_done(usize::MAX);
                    return Err(e);
                }
                progress.set_done(i + 1);
            }
            Ok(())
        })
}

/// RAM whose KVM slot is not registered yet, on the MMIO bus: an access waits for the slot
/// and is then carried out on guest memory directly, so the guest sees plain RAM.
pub struct PendingRam {
    mem: GuestMemory,
    /// Index of this range's slot in the deferred list.
    index: usize,
    progress: std::sync::Arc<DeferredSlots>,
}

impl PendingRam {
    /// The pending range of deferred slot `index`.
    pub fn new(mem: GuestMemory, index: usize, progress: std::sync::Arc<DeferredSlots>) -> Self {
        Self {
            mem,
            index,
            progress,
        }
    }
}

impl kiln_devices::BusDevice for PendingRam {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        use vm_memory::Bytes;
        if !self.progress.wait_for(self.index)
            || self
                .mem
                .read_slice(data, GuestAddress(base + offset))
                .is_err()
        {
            data.fill(0xff);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        use vm_memory::Bytes;
        if self.progress.wait_for(self.index) {
            let _ = self.mem.write_slice(data, GuestAddress(base + offset));
        }
    }
}
