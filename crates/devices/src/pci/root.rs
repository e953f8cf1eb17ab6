//! The root bus: bus 0 with the host bridge at 00:00.0, configuration space through the
//! 0xCF8/0xCFC ports ([`PciConfigIo`]) and through ECAM ([`PciEcam`]), BAR placement with
//! `vm-allocator`, and BARs that follow the guest when it moves them.

use std::sync::{Arc, Mutex, Weak};

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::config::{BarKind, PciConfigState, BAR_COUNT, EXTENDED_CONFIG_SIZE};
use super::{HostBridge, PciDevice, PciError};
use crate::bus::{lock, Bus, BusDevice};
use crate::warn_ratelimited;

/// Device slots on a bus.
const SLOTS: usize = 32;
/// 64-bit BARs larger than this go to the 64-bit window first.
const LARGE_BAR: u64 = 64 << 20;

/// A PCI function as the root holds it.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The MMIO windows BARs may occupy, `(start, size)` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    /// Below 4 GiB.
    pub mmio32: (u64, u64),
    /// Above RAM, if the host's address space has room.
    pub mmio64: Option<(u64, u64)>,
}

impl PciWindows {
    fn contains(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        [Some(self.mmio32), self.mmio64]
            .into_iter()
            .flatten()
            .any(|(s, l)| start >= s && end <= s + l)
    }
}

struct Slot {
    device: SharedPciDevice,
    /// Where each BAR is on the MMIO bus now.
    mapped: [Option<u64>; BAR_COUNT],
}

/// The root's own part of a snapshot (devices save theirs).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciRootState {
    /// The host bridge's configuration space.
    pub host_bridge: PciConfigState,
}

/// Bus 0.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mmio: Weak<Bus>,
    windows: PciWindows,
    alloc32: AddressAllocator,
    alloc64: Option<AddressAllocator>,
}

/// Whether a configuration access of `len` bytes at `offset` is one the root serves:
/// 1, 2 or 4 bytes, naturally aligned, inside the function's 4 KiB.
fn valid_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) && offset + len <= EXTENDED_CONFIG_SIZE
}

impl PciRoot {
    /// Bus 0 with the host bridge; BARs go on `mmio`, inside `windows`.
    pub fn new(mmio: &Arc<Bus>, windows: PciWindows) -> Result<Self, PciError> {
        let alloc = |(start, size): (u64, u64)| {
            AddressAllocator::new(start, size).map_err(|_| PciError::NoBarSpace { size })
        };
        let mut root = PciRoot {
            slots: (0..SLOTS).map(|_| None).collect(),
            mmio: Arc::downgrade(mmio),
            windows,
            alloc32: alloc(windows.mmio32)?,
            alloc64: windows.mmio64.map(alloc).transpose()?,
        };
        root.slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(HostBridge::new())),
            mapped: [None; BAR_COUNT],
        });
        Ok(root)
    }

    /// The slot [`PciRoot::add_device`] will use next.
    pub fn next_free_slot(&self) -> Option<u8> {
        let slot = self.slots.iter().position(Option::is_none)?;
        u8::try_from(slot).ok()
    }

    /// Plugs `device` into the next free slot: places its BARs and maps them. Returns the
    /// slot (device number; the function is 0).
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::BusFull)?;
        let mut mapped = [None; BAR_COUNT];
        {
            let mut dev = lock(&device);
            for (i, m) in mapped.iter_mut().enumerate() {
                let Some(spec) = dev.config().bar(i) else {
                    continue;
                };
                let addr = self.allocate(spec.size, spec.kind)?;
                dev.config_mut().set_bar_address(i, addr);
                *m = Some(addr);
            }
            for (i, m) in mapped.iter().enumerate() {
                if let Some(addr) = m {
                    let size = dev.config().bar(i).map_or(0, |s| s.size);
                    self.bus()?
                        .insert(bar_region(&device, i), *addr, size)
                        .map_err(PciError::Bus)?;
                    dev.bar_moved(i, Some(*addr));
                }
            }
        }
        self.slots[slot] = Some(Slot { device, mapped });
        u8::try_from(slot).map_err(|_| PciError::BusFull)
    }

    fn bus(&self) -> Result<Arc<Bus>, PciError> {
        self.mmio
            .upgrade()
            .ok_or(PciError::Bus(crate::BusError::NotFound(0)))
    }

    fn allocate(&mut self, size: u64, kind: BarKind) -> Result<u64, PciError> {
        let wide = matches!(kind, BarKind::Mem64 { .. });
        let try32 = |a: &mut AddressAllocator| a.allocate(size, size, AllocPolicy::FirstMatch);
        let first_64 = wide && size > LARGE_BAR;
        let order: [bool; 2] = if first_64 {
            [true, false]
        } else {
            [false, true]
        };
        for use64 in order {
            let r = match (use64, &mut self.alloc64) {
                (false, _) => try32(&mut self.alloc32),
                (true, Some(a)) if wide => try32(a),
                _ => continue,
            };
            if let Ok(r) = r {
                return Ok(r.start());
            }
        }
        Err(PciError::NoBarSpace { size })
    }

    /// The functions on the bus, by slot (the host bridge is slot 0).
    pub fn devices(&self) -> impl Iterator<Item = (u8, &SharedPciDevice)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((u8::try_from(i).ok()?, &s.as_ref()?.device)))
    }

    fn slot(&self, bus: u8, dev: u8, func: u8) -> Option<usize> {
        let i = usize::from(dev);
        (bus == 0 && func == 0 && self.slots.get(i).is_some_and(Option::is_some)).then_some(i)
    }

    /// A configuration read; functions that do not exist read as all-ones.
    pub fn read_config(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        if !valid_access(offset, data.len()) {
            return;
        }
        if let Some(s) = self
            .slot(bus, dev, func)
            .and_then(|i| self.slots[i].as_ref())
        {
            lock(&s.device).read_config(offset, data);
        }
    }

    /// A configuration write; then BARs follow what the guest programmed.
    pub fn write_config(&mut self, bus: u8, dev: u8, func: u8, offset: usize, data: &[u8]) {
        if !valid_access(offset, data.len()) {
            warn_ratelimited!(
                "pci: ignoring a {}-byte config write at {bus:02x}:{dev:02x}.{func} offset {offset:#x}",
                data.len()
            );
            return;
        }
        let Some(i) = self.slot(bus, dev, func) else {
            return;
        };
        if let Some(s) = &self.slots[i] {
            lock(&s.device).write_config(offset, data);
        }
        self.sync_bars(i);
    }

    /// Makes every BAR of every device decode where its register says (after a restore).
    pub fn sync_all_bars(&mut self) {
        for i in 0..SLOTS {
            self.sync_bars(i);
        }
    }

    /// Moves the BARs of slot `i` to where the guest programmed them, if it enabled memory
    /// decoding. A place outside the windows or over another range leaves the BAR
    /// unmapped.
    fn sync_bars(&mut self, i: usize) {
        let Ok(bus) = self.bus() else { return };
        let windows = self.windows;
        let Some(slot) = self.slots[i].as_mut() else {
            return;
        };
        let mut dev = lock(&slot.device);
        if !dev.config().memory_enabled() {
            // Ranges stay registered; accesses are refused while decoding is off, so BAR
            // sizing does not churn the bus and ioeventfds.
            return;
        }
        for bar in 0..BAR_COUNT {
            let (Some(spec), Some(want)) = (dev.config().bar(bar), dev.config().bar_address(bar))
            else {
                continue;
            };
            let have = slot.mapped[bar];
            if have == Some(want) {
                continue;
            }
            let placed = if !windows.contains(want, spec.size) {
                Err(format!("{want:#x} is outside the PCI windows"))
            } else {
                match have {
                    Some(old) => bus.relocate(old, want).map_err(|e| e.to_string()),
                    None => bus
                        .insert(bar_region(&slot.device, bar), want, spec.size)
                        .map_err(|e| e.to_string()),
                }
            };
            match placed {
                Ok(()) => {
                    slot.mapped[bar] = Some(want);
                    dev.bar_moved(bar, Some(want));
                }
                Err(why) => {
                    warn_ratelimited!("pci: slot {i} BAR {bar} unmapped: {why}");
                    if let Some(old) = have {
                        let _ = bus.remove(old);
                        dev.bar_moved(bar, None);
                    }
                    slot.mapped[bar] = None;
                }
            }
        }
    }

    /// The root's state (the host bridge's configuration space).
    pub fn state(&self) -> PciRootState {
        let host_bridge = self.slots[0]
            .as_ref()
            .map(|s| lock(&s.device).config().state())
            .unwrap_or(PciConfigState { regs: Vec::new() });
        PciRootState { host_bridge }
    }

    /// Restores [`PciRoot::state`].
    pub fn restore(&mut self, s: &PciRootState) -> Result<(), PciError> {
        match &self.slots[0] {
            Some(slot) => lock(&slot.device).config_mut().restore(&s.host_bridge),
            None => Ok(()),
        }
    }

    /// Where BAR `bar` of slot `dev` decodes now.
    pub fn bar_mapping(&self, dev: u8, bar: usize) -> Option<u64> {
        self.slots
            .get(usize::from(dev))?
            .as_ref()?
            .mapped
            .get(bar)
            .copied()
            .flatten()
    }
}

fn bar_region(device: &SharedPciDevice, bar: usize) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(BarRegion {
        device: device.clone(),
        bar,
    }))
}

/// One BAR on the MMIO bus.
struct BarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let mut d = lock(&self.device);
        if d.config().memory_enabled() {
            d.read_bar(self.bar, offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut d = lock(&self.device);
        if d.config().memory_enabled() {
            d.write_bar(self.bar, offset, data);
        }
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 and the data window at 0xCFC.
/// Put it on the port I/O bus at 0xCF8, 8 ports.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    /// The ports for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The address register (for snapshots).
    pub fn address(&self) -> u32 {
        self.address
    }

    /// Sets the address register (restoring a snapshot).
    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    /// (bus, device, function, register) the address register selects, if enabled.
    fn target(&self, port_offset: u64) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        if a & (1 << 31) == 0 {
            return None;
        }
        let b = a.to_le_bytes();
        let reg = usize::from(b[0] & 0xfc) + usize::try_from(port_offset - 4).ok()?;
        Some((b[2], b[1] >> 3, b[1] & 7, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                if let Some((bus, dev, func, reg)) = self.target(offset) {
                    lock(&self.root).read_config(bus, dev, func, reg, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            4..=7 => {
                if let Some((bus, dev, func, reg)) = self.target(offset) {
                    lock(&self.root).write_config(bus, dev, func, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: configuration space mapped in memory, 4 KiB per function. Put it on the MMIO bus at
/// the MCFG base, 1 MiB per bus.
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    /// ECAM for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciEcam { root }
    }
}

fn ecam_target(offset: u64) -> (u8, u8, u8, usize) {
    let b = offset.to_le_bytes();
    // Bus in bits 20..27, device 15..19, function 12..14, register 0..11.
    (
        (b[2] >> 4) | (b[3] << 4),
        (b[1] >> 7) | ((b[2] & 0xf) << 1),
        (b[1] >> 4) & 7,
        usize::from(u16::from_le_bytes([b[0], b[1]]) & 0xfff),
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = ecam_target(offset);
        lock(&self.root).read_config(bus, dev, func, reg, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = ecam_target(offset);
        lock(&self.root).write_config(bus, dev, func, reg, data);
    }
}

#[cfg(test)]
mod tests;
