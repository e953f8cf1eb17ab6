//! The standard (type 0) PCI configuration header, emulated register by register: which
//! bits the guest may write, BAR sizing, the command register and the capability list.
//! Read-only fields stay what the device set, whatever the guest writes.

use serde::{Deserialize, Serialize};

use super::PciError;

/// Size of conventional configuration space; ECAM's extended space above it reads as zero.
pub const CONFIG_SIZE: usize = 256;
/// Size of a function's configuration space through ECAM.
pub const EXTENDED_CONFIG_SIZE: usize = 4096;

/// Register offsets.
pub mod reg {
    /// Vendor ID.
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID.
    pub const DEVICE_ID: usize = 0x02;
    /// Command.
    pub const COMMAND: usize = 0x04;
    /// Status.
    pub const STATUS: usize = 0x06;
    /// Revision ID, then programming interface, subclass and class.
    pub const REVISION: usize = 0x08;
    /// Header type.
    pub const HEADER_TYPE: usize = 0x0e;
    /// First base address register.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: usize = 0x2c;
    /// Subsystem ID.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line (scratch for the OS).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (0: none).
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// Where capabilities start.
    pub const CAP_START: usize = 0x40;
}

/// Command register bits.
pub mod command {
    /// I/O space decoding.
    pub const IO: u16 = 1 << 0;
    /// Memory space decoding.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master (DMA, MSI).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register: the function has a capability list.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Number of BARs in a type 0 header.
pub const BAR_COUNT: usize = 6;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR: uses this BAR and the next one.
    Mem64 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

/// A BAR the device implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarSpec {
    /// Size: a power of two, at least 4 KiB (so BARs never share a page).
    pub size: u64,
    /// Kind.
    pub kind: BarKind,
}

/// The identity fields of a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// The guest-visible part of a configuration space, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    /// The 256 bytes of conventional configuration space.
    pub regs: Vec<u8>,
}

/// A function's configuration space.
#[derive(Clone, Debug)]
pub struct PciConfig {
    regs: Vec<u8>,
    wmask: Vec<u8>,
    /// Bits that a write of 1 clears (status).
    w1c: Vec<u8>,
    bars: [Option<BarSpec>; BAR_COUNT],
    /// Offset of the last capability, to link the next one.
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfig {
    /// A header with these identity fields, no BARs, no capabilities, no interrupt pin.
    pub fn new(h: &PciHeader) -> Self {
        let mut c = PciConfig {
            regs: vec![0; CONFIG_SIZE],
            wmask: vec![0; CONFIG_SIZE],
            w1c: vec![0; CONFIG_SIZE],
            bars: [None; BAR_COUNT],
            last_cap: None,
            next_cap: reg::CAP_START,
        };
        c.put(reg::VENDOR_ID, &h.vendor_id.to_le_bytes());
        c.put(reg::DEVICE_ID, &h.device_id.to_le_bytes());
        c.put(reg::REVISION, &[h.revision]);
        c.put(reg::REVISION + 1, &h.class.to_le_bytes()[..3]);
        c.put(reg::SUBSYSTEM_VENDOR, &h.subsystem_vendor_id.to_le_bytes());
        c.put(reg::SUBSYSTEM_ID, &h.subsystem_id.to_le_bytes());
        let cmd = command::IO
            | command::MEMORY
            | command::BUS_MASTER
            | command::SERR
            | command::INTX_DISABLE;
        c.wmask[reg::COMMAND..reg::COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        c.wmask[reg::INTERRUPT_LINE] = 0xff;
        // Status: the error bits are write-one-to-clear (kiln never sets them).
        c.w1c[reg::STATUS + 1] = 0xf9;
        c
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.regs[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn dword(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.regs[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    /// Declares BAR `index`. A 64-bit BAR also takes `index + 1`.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        let bad = || PciError::BadBar {
            index,
            size: spec.size,
        };
        let wide = matches!(spec.kind, BarKind::Mem64 { .. });
        let last = if wide { index + 1 } else { index };
        if last >= BAR_COUNT
            || !spec.size.is_power_of_two()
            || spec.size < 0x1000
            || (!wide && spec.size > 1 << 31)
            || self.bars[index].is_some()
            || (index > 0
                && matches!(
                    self.bars[index - 1],
                    Some(BarSpec {
                        kind: BarKind::Mem64 { .. },
                        ..
                    })
                ))
            || (wide && self.bars[index + 1].is_some())
        {
            return Err(bad());
        }
        let mask = !(spec.size - 1);
        let off = reg::BAR0 + 4 * index;
        let type_bits: u32 = match spec.kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 { prefetchable } => 0b100 | if prefetchable { 0b1000 } else { 0 },
        };
        // Address bits above the size are writable; the type bits are not.
        let low_mask = u32::try_from(mask & 0xffff_fff0).unwrap_or(0);
        self.put(off, &type_bits.to_le_bytes());
        self.wmask[off..off + 4].copy_from_slice(&low_mask.to_le_bytes());
        if wide {
            let high_mask = u32::try_from(mask >> 32).unwrap_or(u32::MAX);
            self.wmask[off + 4..off + 8].copy_from_slice(&high_mask.to_le_bytes());
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    /// The BAR declared at `index` (not the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` holds now.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar(index)?;
        let off = reg::BAR0 + 4 * index;
        let low = u64::from(self.dword(off) & 0xffff_fff0);
        Some(match spec.kind {
            BarKind::Mem32 => low,
            BarKind::Mem64 { .. } => low | u64::from(self.dword(off + 4)) << 32,
        })
    }

    /// Places BAR `index` at `addr` (the VMM's allocation; the guest moves it by writing).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(spec) = self.bar(index) else { return };
        let off = reg::BAR0 + 4 * index;
        let addr = addr & !(spec.size - 1);
        let low = (self.dword(off) & 0xf) | u32::try_from(addr & 0xffff_fff0).unwrap_or(0);
        self.put(off, &low.to_le_bytes());
        if matches!(spec.kind, BarKind::Mem64 { .. }) {
            let high = u32::try_from(addr >> 32).unwrap_or(0);
            self.put(off + 4, &high.to_le_bytes());
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.regs[reg::COMMAND], self.regs[reg::COMMAND + 1]])
    }

    /// Whether the function decodes its memory BARs.
    pub fn memory_enabled(&self) -> bool {
        self.command() & command::MEMORY != 0
    }

    /// Sets the interrupt pin (1 = INTA#).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.regs[reg::INTERRUPT_PIN] = pin;
    }

    /// Appends a capability: `body` is everything after the ID and next-pointer bytes, and
    /// `writable` (same length as `body`) says which of its bits the guest may write.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciError> {
        let len = body.len() + 2;
        let offset = self.next_cap;
        if writable.len() != body.len() || offset + len > CONFIG_SIZE {
            return Err(PciError::CapabilitySpace { id, len });
        }
        self.regs[offset] = id;
        self.regs[offset + 1] = 0;
        self.put(offset + 2, body);
        self.wmask[offset + 2..offset + len].copy_from_slice(writable);
        // Below CONFIG_SIZE (checked above), so it fits a byte.
        let link = u8::try_from(offset).unwrap_or(0);
        match self.last_cap {
            Some(prev) => self.regs[prev + 1] = link,
            None => {
                self.regs[reg::CAP_PTR] = link;
                let status =
                    u16::from_le_bytes([self.regs[reg::STATUS], self.regs[reg::STATUS + 1]])
                        | STATUS_CAP_LIST;
                self.put(reg::STATUS, &status.to_le_bytes());
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = (offset + len).next_multiple_of(4);
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset`; past conventional space reads as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A guest write: only writable bits change; write-one-to-clear bits clear.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let m = self.wmask[at];
            self.regs[at] = (self.regs[at] & !m) | (v & m);
            self.regs[at] &= !(v & self.w1c[at]);
        }
    }

    /// Raw bytes, for a device reading back its own capability registers.
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let end = (offset + len).min(CONFIG_SIZE);
        &self.regs[offset.min(end)..end]
    }

    /// Sets bytes regardless of the write mask (a device updating a read-only register).
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) {
        if offset + bytes.len() <= CONFIG_SIZE {
            self.put(offset, bytes);
        }
    }

    /// The guest-visible state.
    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            regs: self.regs.clone(),
        }
    }

    /// Restores what [`PciConfig::state`] returned: only guest-writable bits are taken, so
    /// a state from another kind of device cannot change this one's identity or layout.
    pub fn restore(&mut self, state: &PciConfigState) -> Result<(), PciError> {
        if state.regs.len() != CONFIG_SIZE {
            return Err(PciError::BadState(format!(
                "configuration space of {} bytes",
                state.regs.len()
            )));
        }
        for (i, &v) in state.regs.iter().enumerate() {
            let m = self.wmask[i];
            self.regs[i] = (self.regs[i] & !m) | (v & m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class: 0xff_0000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn read32(c: &PciConfig, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(c: &mut PciConfig, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_fields_ignore_guest_writes() {
        let mut c = PciConfig::new(&header());
        for off in (0..CONFIG_SIZE).step_by(4) {
            if off != reg::COMMAND && off != reg::INTERRUPT_LINE {
                write32(&mut c, off, 0xdead_beef);
            }
        }
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        assert_eq!(read32(&c, reg::REVISION), 0xff00_0001);
        assert_eq!(read32(&c, reg::SUBSYSTEM_VENDOR), 0x0040_1af4);
        assert_eq!(
            read32(&c, reg::BAR0),
            0,
            "no BAR: reads zero, sizing finds nothing"
        );
    }

    #[test]
    fn bar_sizing_protocol_reports_size_and_type() {
        let mut c = PciConfig::new(&header());
        c.add_bar(
            0,
            BarSpec {
                size: 0x8000,
                kind: BarKind::Mem64 { prefetchable: true },
            },
        )
        .unwrap();
        c.add_bar(
            2,
            BarSpec {
                size: 0x1000,
                kind: BarKind::Mem32,
            },
        )
        .unwrap();
        c.set_bar_address(0, 0x1_2345_8000);
        assert_eq!(c.bar_address(0), Some(0x1_2345_8000));
        write32(&mut c, reg::BAR0, 0xffff_ffff);
        write32(&mut c, reg::BAR0 + 4, 0xffff_ffff);
        assert_eq!(read32(&c, reg::BAR0), 0xffff_800c);
        assert_eq!(read32(&c, reg::BAR0 + 4), 0xffff_ffff);
        write32(&mut c, reg::BAR0 + 8, 0xffff_ffff);
        assert_eq!(read32(&c, reg::BAR0 + 8), 0xffff_f000);
        // Unaligned addresses are truncated to the size.
        write32(&mut c, reg::BAR0, 0xc000_1234);
        write32(&mut c, reg::BAR0 + 4, 0);
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        assert_eq!(c.bar(1), None, "upper half of a 64-bit BAR");
        assert_eq!(c.bar_address(1), None);
    }

    #[test]
    fn rejects_impossible_bars() {
        let mut c = PciConfig::new(&header());
        let m64 = |size| BarSpec {
            size,
            kind: BarKind::Mem64 {
                prefetchable: false,
            },
        };
        assert!(
            c.add_bar(5, m64(0x1000)).is_err(),
            "64-bit BAR needs two slots"
        );
        assert!(c.add_bar(0, m64(0x1800)).is_err(), "not a power of two");
        assert!(c.add_bar(0, m64(0x100)).is_err(), "smaller than a page");
        c.add_bar(0, m64(0x1000)).unwrap();
        assert!(c.add_bar(1, m64(0x1000)).is_err(), "upper half taken");
        assert!(c.add_bar(0, m64(0x1000)).is_err(), "declared twice");
    }

    #[test]
    fn command_keeps_only_defined_bits_and_status_lists_capabilities() {
        let mut c = PciConfig::new(&header());
        write32(&mut c, reg::COMMAND, 0xffff_ffff);
        assert_eq!(c.command(), 0x0507);
        assert!(c.memory_enabled());
        assert_eq!(read32(&c, reg::COMMAND) >> 16, 0);
        let off = c
            .add_capability(0x09, &[1, 2, 3, 4, 5, 6], &[0, 0, 0xff, 0, 0, 0])
            .unwrap();
        assert_eq!(off, 0x40);
        let off2 = c.add_capability(0x11, &[0; 10], &[0; 10]).unwrap();
        assert_eq!(off2, 0x48);
        assert_eq!(
            read32(&c, reg::STATUS - 2) >> 16,
            u32::from(STATUS_CAP_LIST)
        );
        assert_eq!(c.bytes(reg::CAP_PTR, 1), &[0x40]);
        assert_eq!(c.bytes(0x40, 4), &[0x09, 0x48, 1, 2]);
        assert_eq!(c.bytes(0x49, 1), &[0], "last capability ends the list");
        write32(&mut c, 0x40, 0xffff_ffff);
        write32(&mut c, 0x44, 0xffff_ffff);
        assert_eq!(c.bytes(0x40, 8), &[0x09, 0x48, 1, 2, 0xff, 4, 5, 6]);
    }

    #[test]
    fn extended_space_reads_zero_and_ignores_writes() {
        let mut c = PciConfig::new(&header());
        c.write(0xffe, &[1, 2, 3, 4]);
        let mut b = [0xaau8; 4];
        c.read(0x100, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn capability_space_runs_out_cleanly() {
        let mut c = PciConfig::new(&header());
        let body = [0u8; 60];
        for _ in 0..3 {
            c.add_capability(0x09, &body, &body).unwrap();
        }
        assert!(matches!(
            c.add_capability(0x09, &body, &body),
            Err(PciError::CapabilitySpace { .. })
        ));
    }

    #[test]
    fn state_round_trips_and_restores_only_writable_bits() {
        let mut c = PciConfig::new(&header());
        c.add_bar(
            0,
            BarSpec {
                size: 0x4000,
                kind: BarKind::Mem64 {
                    prefetchable: false,
                },
            },
        )
        .unwrap();
        c.set_bar_address(0, 0xc000_4000);
        write32(&mut c, reg::COMMAND, 0x6);
        let json = serde_json::to_string(&c.state()).unwrap();
        let mut saved: PciConfigState = serde_json::from_str(&json).unwrap();

        let mut d = PciConfig::new(&header());
        d.add_bar(
            0,
            BarSpec {
                size: 0x4000,
                kind: BarKind::Mem64 {
                    prefetchable: false,
                },
            },
        )
        .unwrap();
        saved.regs[0] = 0x12; // a forged vendor ID is not taken
        d.restore(&saved).unwrap();
        assert_eq!(d.bar_address(0), Some(0xc000_4000));
        assert_eq!(d.command(), 0x6);
        assert_eq!(read32(&d, 0), 0x1044_1af4);
        assert!(d.restore(&PciConfigState { regs: vec![0; 3] }).is_err());
    }
}
