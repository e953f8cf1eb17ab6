//! Address-range buses for port I/O and MMIO exits.
//!
//! A bus maps non-overlapping `[base, base + len)` ranges to devices. vCPU threads look up
//! the device for each exit and call it with the offset into its range.
//!
//! Ranges can change while vCPUs run (a guest moving a PCI BAR): the map sits behind a
//! read-write lock that a lookup holds only to find the device, never while calling it, so a
//! device may itself move ranges on the bus it was reached through.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the range's `base`.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Bus errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero, or one that wraps around.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
        /// Start of the existing range.
        other_base: u64,
        /// Length of the existing range.
        other_len: u64,
    },
    /// No range starts at this address.
    #[error("no bus range at {0:#x}")]
    NotFound(u64),
}

/// A device shared between the bus and whoever else drives it (e.g. the serial input).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address-range bus.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

fn check_free(
    ranges: &BTreeMap<u64, Entry>,
    base: u64,
    len: u64,
    ignore: Option<u64>,
) -> Result<(), BusError> {
    let end = base
        .checked_add(len)
        .filter(|_| len > 0)
        .ok_or(BusError::InvalidRange { base, len })?;
    // The last range starting below `end` (other than the one being moved) must end by `base`.
    if let Some((&b, e)) = ranges.range(..end).rev().find(|(&b, _)| Some(b) != ignore) {
        if b + e.len > base {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: b,
                other_len: e.len,
            });
        }
    }
    Ok(())
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.read().unwrap_or_else(|p| p.into_inner())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let mut map = self.map_mut();
        check_free(&map, base, len, None)?;
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// Takes the range starting at `base` off the bus; returns its device.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        self.map_mut()
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Moves the range starting at `old` to start at `new` (same length), in one step: an
    /// access sees the device at one place or the other. Fails, changing nothing, if the
    /// new place overlaps another range.
    pub fn relocate(&self, old: u64, new: u64) -> Result<(), BusError> {
        let mut map = self.map_mut();
        let len = map.get(&old).ok_or(BusError::NotFound(old))?.len;
        check_free(&map, new, len, Some(old))?;
        if let Some(e) = map.remove(&old) {
            map.insert(new, e);
        }
        Ok(())
    }

    /// The device whose range holds `[addr, addr + size)`, with the range's base.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let map = self.map();
        let (&base, entry) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= entry.len).then(|| (base, entry.device.clone()))
    }

    /// Dispatches a read; returns false (and leaves `data` as is) when no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, device)) => {
                lock(&device).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, device)) => {
                lock(&device).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on after a panic elsewhere poisoned the lock: device state is
/// guest-owned and a half-done register write is the guest's problem, not the VMM's.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xff));
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offset_and_rejects_straddling_access() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        assert_eq!(dev.lock().unwrap().last, Some((0x3f8, 2, vec![7])));
        let mut b = [0u8; 2];
        assert!(bus.read(0x3fe, &mut b));
        assert_eq!(b, [6, 6]);
        assert!(!bus.read(0x3ff, &mut b), "access past the end of the range");
        assert!(!bus.write(0x3f7, &[1]));
        assert!(!bus.write(0x400, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(d(), 0x108, 4),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0xf8, 9),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(d(), 0x110, 1).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }

    #[test]
    fn relocates_a_range_or_refuses_an_overlapping_move() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x3000, 0x100)
            .unwrap();
        // Overlapping its own old place is fine.
        bus.relocate(0x1000, 0x1080).unwrap();
        assert!(bus.write(0x1090, &[1]));
        assert_eq!(dev.lock().unwrap().last, Some((0x1080, 0x10, vec![1])));
        assert!(!bus.write(0x1000, &[1]));
        assert!(matches!(
            bus.relocate(0x1080, 0x2f80),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.write(0x1080, &[2]), "a refused move changes nothing");
        assert_eq!(
            bus.relocate(0x5000, 0x6000),
            Err(BusError::NotFound(0x5000))
        );
        bus.remove(0x1080).unwrap();
        assert!(!bus.write(0x1080, &[3]));
        assert!(bus.remove(0x1080).is_err());
    }

    #[test]
    fn a_device_may_move_itself_from_inside_an_access() {
        struct Mover(Arc<Bus>);
        impl BusDevice for Mover {
            fn read(&mut self, _: u64, _: u64, _: &mut [u8]) {}
            fn write(&mut self, base: u64, _: u64, _: &[u8]) {
                self.0.relocate(base, base + 0x1000).unwrap();
            }
        }
        let bus = Arc::new(Bus::new());
        bus.insert(Arc::new(Mutex::new(Mover(bus.clone()))), 0x1000, 0x10)
            .unwrap();
        assert!(bus.write(0x1000, &[0]));
        assert!(bus.write(0x2000, &[0]));
        assert!(!bus.write(0x2000, &[0]));
        // Break the Arc cycle.
        bus.remove(0x3000).unwrap();
    }
}
