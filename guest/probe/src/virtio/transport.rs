//! The virtio 1.x transports, polled: PCI (capabilities in memory BARs) and
//! MMIO (version 2 register block). Status handshake, feature negotiation,
//! queue setup. No interrupts: on PCI, MSI-X stays disabled with every vector
//! NO_VECTOR and INTx is disabled in the command register; on MMIO nothing
//! is acknowledged. Only the `msix` check (virtio/msix.rs) assigns a vector,
//! through [`Transport::set_queue_vector`].

use crate::clock::Clock;
use crate::dma::Dma;
use crate::io::{mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8};
use crate::reason;
use crate::util::Reason;

use super::queue::{Rings, Virtqueue, INDIRECT_MAX, MAX_QSIZE};
use super::{DevId, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK};
use super::{STATUS_FEATURES_OK, STATUS_NEEDS_RESET};

pub const NO_VECTOR: u16 = 0xffff;

/// PCI common configuration structure offsets.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// The PCI common configuration structure must cover at least the fields used.
pub const COMMON_MIN_LEN: u32 = 0x38;

/// virtio-mmio (version 2) register offsets; every access is 32 bits.
pub mod mmio {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
    /// "virt", little-endian.
    pub const MAGIC_VALUE: u32 = 0x7472_6976;
}

/// Where a device's registers are (addresses in the identity map).
#[derive(Clone, Copy, Debug)]
pub enum Regs {
    Pci {
        common: u64,
        notify: u64,
        notify_len: u32,
        notify_mul: u32,
        isr: Option<u64>,
        device: Option<(u64, u32)>,
    },
    /// A virtio-mmio register block of `size` bytes (config space from 0x100).
    Mmio {
        base: u64,
        size: u64,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct Transport {
    pub id: DevId,
    pub dev_type: u16,
    regs: Regs,
    /// Features both sides agreed on.
    pub features: u64,
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: every address passed here lies in a device's register block:
    // the PCI structures inside an assigned, identity-mapped memory BAR
    // (checked when the device was found), or a virtio-mmio block the probe
    // checked the magic of (mapped by then).
    unsafe { mmio_read32(addr) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd32`.
    unsafe { mmio_write32(addr, v) }
}

impl Transport {
    pub fn new(id: DevId, dev_type: u16, regs: Regs) -> Transport {
        Transport { id, dev_type, regs, features: 0 }
    }

    /// Reads a PCI common-configuration field (`width` 1, 2 or 4 bytes).
    fn common_read(common: u64, off: u64, width: u8) -> u32 {
        // SAFETY: as for `rd32`; the fields are naturally aligned.
        unsafe {
            match width {
                1 => u32::from(mmio_read8(common + off)),
                2 => u32::from(mmio_read16(common + off)),
                _ => mmio_read32(common + off),
            }
        }
    }

    fn common_write(common: u64, off: u64, width: u8, v: u32) {
        // SAFETY: as in `common_read`.
        unsafe {
            match width {
                1 => mmio_write8(common + off, v as u8),
                2 => mmio_write16(common + off, v as u16),
                _ => mmio_write32(common + off, v),
            }
        }
    }

    pub fn status(&self) -> u8 {
        match self.regs {
            Regs::Pci { common: c, .. } => Self::common_read(c, common::DEVICE_STATUS, 1) as u8,
            Regs::Mmio { base, .. } => rd32(base + mmio::STATUS) as u8,
        }
    }

    pub fn set_status(&self, s: u8) {
        match self.regs {
            Regs::Pci { common: c, .. } => Self::common_write(c, common::DEVICE_STATUS, 1, u32::from(s)),
            Regs::Mmio { base, .. } => wr32(base + mmio::STATUS, u32::from(s)),
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.status() & STATUS_NEEDS_RESET != 0
    }

    /// Writes 0 to the status and waits until the device reads back 0.
    pub fn reset(&self, clock: &Clock) -> Result<(), Reason> {
        self.set_status(0);
        let d = clock.deadline_ms(1000);
        while self.status() != 0 {
            if d.expired() {
                return Err(reason!("{}: status still {:#x} one second after reset", self.id, self.status()));
            }
        }
        Ok(())
    }

    fn select_features(&self, driver: bool, page: u32) {
        match self.regs {
            Regs::Pci { common: c, .. } => {
                let off = if driver { common::DRIVER_FEATURE_SELECT } else { common::DEVICE_FEATURE_SELECT };
                Self::common_write(c, off, 4, page)
            }
            Regs::Mmio { base, .. } => {
                wr32(base + if driver { mmio::DRIVER_FEATURES_SEL } else { mmio::DEVICE_FEATURES_SEL }, page)
            }
        }
    }

    pub fn device_features(&self) -> u64 {
        let read = |page| {
            self.select_features(false, page);
            u64::from(match self.regs {
                Regs::Pci { common: c, .. } => Self::common_read(c, common::DEVICE_FEATURE, 4),
                Regs::Mmio { base, .. } => rd32(base + mmio::DEVICE_FEATURES),
            })
        };
        read(0) | (read(1) << 32)
    }

    fn write_driver_features(&self, f: u64) {
        for page in 0..2u32 {
            self.select_features(true, page);
            let v = (f >> (32 * page)) as u32;
            match self.regs {
                Regs::Pci { common: c, .. } => Self::common_write(c, common::DRIVER_FEATURE, 4, v),
                Regs::Mmio { base, .. } => wr32(base + mmio::DRIVER_FEATURES, v),
            }
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (`wanted` & offered, VERSION_1
    /// required), FEATURES_OK (checked), config vector NO_VECTOR (PCI).
    pub fn init(&mut self, wanted: u64, clock: &Clock) -> Result<u64, Reason> {
        self.reset(clock)?;
        self.set_status(STATUS_ACK);
        self.set_status(STATUS_ACK | STATUS_DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(reason!("{}: device does not offer VERSION_1 (features {:#x})", self.id, offered));
        }
        let features = offered & (wanted | F_VERSION_1);
        self.write_driver_features(features);
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err(reason!("{}: device refused features {:#x}", self.id, features));
        }
        if let Regs::Pci { common: c, .. } = self.regs {
            Self::common_write(c, common::MSIX_CONFIG, 2, u32::from(NO_VECTOR));
        }
        self.features = features;
        Ok(features)
    }

    fn select_queue(&self, index: u16) {
        match self.regs {
            Regs::Pci { common: c, .. } => Self::common_write(c, common::QUEUE_SELECT, 2, u32::from(index)),
            Regs::Mmio { base, .. } => wr32(base + mmio::QUEUE_SEL, u32::from(index)),
        }
    }

    /// The device's maximum size for queue `index` (0: no such queue).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.select_queue(index);
        match self.regs {
            Regs::Pci { common: c, .. } => Self::common_read(c, common::QUEUE_SIZE, 2) as u16,
            Regs::Mmio { base, .. } => u16::try_from(rd32(base + mmio::QUEUE_NUM_MAX)).unwrap_or(u16::MAX),
        }
    }

    /// Programs queue `index` with `size` entries at `rings` and enables it.
    /// No validation: the hostile check uses it to hand over bad values.
    pub fn program_queue(&self, index: u16, size: u16, rings: Rings) {
        self.select_queue(index);
        let split = |a: u64| (a as u32, (a >> 32) as u32);
        match self.regs {
            Regs::Pci { common: c, .. } => {
                Self::common_write(c, common::QUEUE_SIZE, 2, u32::from(size));
                Self::common_write(c, common::QUEUE_MSIX_VECTOR, 2, u32::from(NO_VECTOR));
                // 64-bit fields as two 32-bit halves, low first.
                for (off, a) in [
                    (common::QUEUE_DESC, rings.desc),
                    (common::QUEUE_DRIVER, rings.avail),
                    (common::QUEUE_DEVICE, rings.used),
                ] {
                    let (lo, hi) = split(a);
                    Self::common_write(c, off, 4, lo);
                    Self::common_write(c, off + 4, 4, hi);
                }
                Self::common_write(c, common::QUEUE_ENABLE, 2, 1);
            }
            Regs::Mmio { base, .. } => {
                wr32(base + mmio::QUEUE_NUM, u32::from(size));
                for (off, a) in [
                    (mmio::QUEUE_DESC_LOW, rings.desc),
                    (mmio::QUEUE_DRIVER_LOW, rings.avail),
                    (mmio::QUEUE_DEVICE_LOW, rings.used),
                ] {
                    let (lo, hi) = split(a);
                    wr32(base + off, lo);
                    wr32(base + off + 4, hi);
                }
                wr32(base + mmio::QUEUE_READY, 1);
            }
        }
    }

    /// Assigns MSI-X table entry `vector` (or NO_VECTOR) to configuration
    /// changes; returns what the device reads back.
    pub fn set_config_vector(&self, vector: u16) -> Result<u16, Reason> {
        let Regs::Pci { common: c, .. } = self.regs else {
            return Err(reason!("{}: virtio-mmio has no MSI-X vectors", self.id));
        };
        Self::common_write(c, common::MSIX_CONFIG, 2, u32::from(vector));
        Ok(Self::common_read(c, common::MSIX_CONFIG, 2) as u16)
    }

    /// The PCI common configuration's `config_generation` (changes with every
    /// configuration-change notification the device sends).
    pub fn config_generation(&self) -> Result<u8, Reason> {
        let Regs::Pci { common: c, .. } = self.regs else {
            return Err(reason!("{}: not a virtio-pci function", self.id));
        };
        Ok(Self::common_read(c, common::CONFIG_GENERATION, 1) as u8)
    }

    /// Assigns MSI-X table entry `vector` (or [`NO_VECTOR`]) to queue `index`
    /// and returns what the device reads back: `NO_VECTOR` if it refused.
    /// Only the `msix` check uses vectors; virtio-mmio has none.
    pub fn set_queue_vector(&self, index: u16, vector: u16) -> Result<u16, Reason> {
        let Regs::Pci { common: c, .. } = self.regs else {
            return Err(reason!("{}: virtio-mmio has no MSI-X vectors", self.id));
        };
        self.select_queue(index);
        Self::common_write(c, common::QUEUE_MSIX_VECTOR, 2, u32::from(vector));
        Ok(Self::common_read(c, common::QUEUE_MSIX_VECTOR, 2) as u16)
    }

    /// Whether queue `index` reads back as enabled (and, on PCI, with `size`).
    fn queue_took(&self, index: u16, size: u16) -> bool {
        self.select_queue(index);
        match self.regs {
            Regs::Pci { common: c, .. } => {
                Self::common_read(c, common::QUEUE_SIZE, 2) == u32::from(size)
                    && Self::common_read(c, common::QUEUE_ENABLE, 2) == 1
            }
            Regs::Mmio { base, .. } => rd32(base + mmio::QUEUE_READY) == 1,
        }
    }

    /// Queue `index`'s notify register and whether it takes 32-bit writes.
    pub fn notify_addr(&self, index: u16) -> Result<(u64, bool), Reason> {
        match self.regs {
            Regs::Pci { common: c, notify, notify_len, notify_mul, .. } => {
                self.select_queue(index);
                let off = u64::from(Self::common_read(c, common::QUEUE_NOTIFY_OFF, 2)) * u64::from(notify_mul);
                if off + 2 > u64::from(notify_len) {
                    return Err(reason!(
                        "{}: queue {} notify offset {:#x} is outside the notify structure",
                        self.id,
                        index,
                        off
                    ));
                }
                Ok((notify + off, false))
            }
            Regs::Mmio { base, .. } => Ok((base + mmio::QUEUE_NOTIFY, true)),
        }
    }

    /// Sets up queue `index` with at most `max` entries: rings (and indirect
    /// tables when negotiated) from `dma`.
    pub fn setup_queue(&self, index: u16, max: u16, dma: &mut Dma) -> Result<Virtqueue, Reason> {
        let dev_max = self.queue_max(index);
        if dev_max == 0 {
            return Err(reason!("{}: queue {} is not available", self.id, index));
        }
        // The largest power of two within both limits.
        let limit = dev_max.min(max).min(MAX_QSIZE);
        let size = 1u16 << (15 - limit.leading_zeros().min(15));
        let rings = Rings::alloc(dma, size).ok_or_else(|| reason!("out of DMA memory for queue {}", index))?;
        let indirect = if self.features & F_INDIRECT_DESC != 0 {
            let bytes = u64::from(size) * u64::from(INDIRECT_MAX) * 16;
            Some(dma.alloc(bytes, 16).ok_or_else(|| reason!("out of DMA memory for indirect tables"))?)
        } else {
            None
        };
        let (notify, wide) = self.notify_addr(index)?;
        self.program_queue(index, size, rings);
        if !self.queue_took(index, size) {
            return Err(reason!("{}: queue {} did not take size {} / enable", self.id, index, size));
        }
        let q = Virtqueue::new(index, size, rings, notify, self.features & F_EVENT_IDX != 0, indirect);
        Ok(q.with_wide_notify(wide))
    }

    pub fn driver_ok(&self) -> Result<(), Reason> {
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let s = self.status();
        if s & STATUS_NEEDS_RESET != 0 || s & STATUS_DRIVER_OK == 0 {
            return Err(reason!("{}: status {:#x} after DRIVER_OK", self.id, s));
        }
        Ok(())
    }

    fn generation(&self) -> u32 {
        match self.regs {
            Regs::Pci { common: c, .. } => Self::common_read(c, common::CONFIG_GENERATION, 1),
            Regs::Mmio { base, .. } => rd32(base + mmio::CONFIG_GENERATION),
        }
    }

    /// Reads `width` (1, 2, 4 or 8) bytes of device configuration, retrying
    /// until the configuration generation is stable. 0 if out of range.
    pub fn config(&self, off: u64, width: u64) -> u64 {
        let addr = match self.regs {
            Regs::Pci { device: Some((base, len)), .. } if off + width <= u64::from(len) => base + off,
            Regs::Mmio { base, size } if mmio::CONFIG + off + width <= size => base + mmio::CONFIG + off,
            _ => return 0,
        };
        loop {
            let gen = self.generation();
            // SAFETY: `addr` lies in the device configuration area checked above.
            let v = unsafe {
                match width {
                    1 => u64::from(mmio_read8(addr)),
                    2 => u64::from(mmio_read16(addr)),
                    4 => u64::from(mmio_read32(addr)),
                    _ => u64::from(mmio_read32(addr)) | (u64::from(mmio_read32(addr + 4)) << 32),
                }
            };
            if self.generation() == gen {
                return v;
            }
        }
    }

    /// Reads the interrupt status (on PCI this clears it). 0 if unknown.
    pub fn isr(&self) -> u32 {
        match self.regs {
            // SAFETY: the ISR structure lies in an assigned memory BAR.
            Regs::Pci { isr: Some(a), .. } => u32::from(unsafe { mmio_read8(a) }),
            Regs::Pci { .. } => 0,
            Regs::Mmio { base, .. } => rd32(base + mmio::INTERRUPT_STATUS),
        }
    }
}

/// Reads a virtio-mmio block's identity: `Ok(Some(type))` for a version-2
/// device, `Ok(None)` for an empty slot (device id 0).
pub fn mmio_identify(base: u64) -> Result<Option<u16>, Reason> {
    let magic = rd32(base + mmio::MAGIC);
    if magic != mmio::MAGIC_VALUE {
        return Err(reason!("virtio-mmio at {:#x}: magic {:#x}, not \"virt\"", base, magic));
    }
    let version = rd32(base + mmio::VERSION);
    if version != 2 {
        return Err(reason!("virtio-mmio at {:#x}: version {} (only 2, modern, is supported)", base, version));
    }
    let id = rd32(base + mmio::DEVICE_ID);
    Ok((id != 0).then(|| u16::try_from(id).unwrap_or(u16::MAX)))
}
