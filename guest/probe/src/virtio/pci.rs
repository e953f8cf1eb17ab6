//! The virtio 1.x PCI transport, polled: capabilities, status handshake,
//! feature negotiation, queue setup. MSI-X stays disabled and every vector
//! is NO_VECTOR; INTx is disabled in the command register.

use crate::clock::Clock;
use crate::dma::Dma;
use crate::io::{mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8};
use crate::pci::{Bdf, Config, Function, CAP_VENDOR, CMD_BUS_MASTER, CMD_INTX_DISABLE, CMD_MEM};
use crate::reason;
use crate::util::Reason;

use super::queue::{Rings, Virtqueue, INDIRECT_MAX, MAX_QSIZE};
use super::{F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK};
use super::{STATUS_FEATURES_OK, STATUS_NEEDS_RESET};

const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
pub const NO_VECTOR: u16 = 0xffff;

// Common configuration structure offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const COMMON_MIN_LEN: u32 = 0x38;

/// A virtio-pci device's register blocks (addresses in the identity map).
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    pub bdf: Bdf,
    pub dev_type: u16,
    common: u64,
    notify: u64,
    notify_len: u32,
    notify_mul: u32,
    pub isr: Option<u64>,
    device: Option<(u64, u32)>,
    /// Features both sides agreed on.
    pub features: u64,
}

/// A structure capability: (BAR index, offset, length, extra dword).
fn read_cap(cfg: &Config, bdf: Bdf, off: u8) -> (u8, u32, u32, u32) {
    let off = u16::from(off);
    let bar = cfg.read8(bdf, off + 4);
    (bar, cfg.read32(bdf, off + 8), cfg.read32(bdf, off + 12), cfg.read32(bdf, off + 16))
}

impl Transport {
    /// Locates the structures of a virtio-pci function and turns on memory
    /// decoding and bus mastering (INTx off). Touches no virtio register.
    pub fn new(cfg: &Config, f: &Function, dev_type: u16) -> Result<Transport, Reason> {
        let mut t = Transport {
            bdf: f.bdf,
            dev_type,
            common: 0,
            notify: 0,
            notify_len: 0,
            notify_mul: 0,
            isr: None,
            device: None,
            features: 0,
        };
        for c in f.caps().iter().filter(|c| c.id == CAP_VENDOR) {
            let kind = cfg.read8(f.bdf, u16::from(c.off) + 3);
            if !(CFG_COMMON..=CFG_DEVICE).contains(&kind) {
                continue;
            }
            let (bar_idx, offset, len, extra) = read_cap(cfg, f.bdf, c.off);
            let bar = f.bar(bar_idx).filter(|b| b.is_mem() && b.addr != 0);
            let Some(bar) = bar else {
                return Err(reason!(
                    "{}: virtio structure {} in BAR {}, not an assigned memory BAR",
                    f.bdf,
                    kind,
                    bar_idx
                ));
            };
            if u64::from(offset) + u64::from(len) > bar.size {
                return Err(reason!("{}: virtio structure {} exceeds BAR {}", f.bdf, kind, bar_idx));
            }
            let addr = bar.addr + u64::from(offset);
            // The spec says to use the first capability of each type.
            match kind {
                CFG_COMMON if t.common == 0 => {
                    if len < COMMON_MIN_LEN {
                        return Err(reason!("{}: common configuration is only {} bytes", f.bdf, len));
                    }
                    t.common = addr;
                }
                CFG_NOTIFY if t.notify == 0 => {
                    t.notify = addr;
                    t.notify_len = len;
                    t.notify_mul = extra;
                }
                CFG_ISR if t.isr.is_none() => t.isr = Some(addr),
                CFG_DEVICE if t.device.is_none() => t.device = Some((addr, len)),
                _ => {}
            }
        }
        if t.common == 0 || t.notify == 0 {
            return Err(reason!("{}: no virtio common or notify capability (legacy-only device?)", f.bdf));
        }
        let cmd = cfg.read16(f.bdf, 4);
        cfg.write16(f.bdf, 4, cmd | CMD_MEM | CMD_BUS_MASTER | CMD_INTX_DISABLE);
        Ok(t)
    }

    fn r8(&self, off: u64) -> u8 {
        // SAFETY: `common` + off lies in the common configuration structure,
        // inside an assigned, identity-mapped memory BAR (checked in `new`).
        unsafe { mmio_read8(self.common + off) }
    }

    fn r16(&self, off: u64) -> u16 {
        // SAFETY: as in `r8`; the field is 2-byte aligned.
        unsafe { mmio_read16(self.common + off) }
    }

    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as in `r8`; the field is 4-byte aligned.
        unsafe { mmio_read32(self.common + off) }
    }

    fn w8(&self, off: u64, v: u8) {
        // SAFETY: as in `r8`.
        unsafe { mmio_write8(self.common + off, v) }
    }

    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as in `r16`.
        unsafe { mmio_write16(self.common + off, v) }
    }

    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as in `r32`.
        unsafe { mmio_write32(self.common + off, v) }
    }

    /// 64-bit fields are written as two 32-bit halves, low first.
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.r8(DEVICE_STATUS)
    }

    pub fn set_status(&self, s: u8) {
        self.w8(DEVICE_STATUS, s);
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
                return Err(reason!("{}: status still {:#x} one second after reset", self.bdf, self.status()));
            }
        }
        Ok(())
    }

    pub fn device_features(&self) -> u64 {
        self.w32(DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(DEVICE_FEATURE);
        self.w32(DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(DEVICE_FEATURE);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (`wanted` & offered, VERSION_1
    /// required), FEATURES_OK (checked), config vector NO_VECTOR.
    pub fn init(&mut self, wanted: u64, clock: &Clock) -> Result<u64, Reason> {
        self.reset(clock)?;
        self.set_status(STATUS_ACK);
        self.set_status(STATUS_ACK | STATUS_DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(reason!("{}: device does not offer VERSION_1 (features {:#x})", self.bdf, offered));
        }
        let features = offered & (wanted | F_VERSION_1);
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, features as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (features >> 32) as u32);
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err(reason!("{}: device refused features {:#x}", self.bdf, features));
        }
        self.w16(MSIX_CONFIG, NO_VECTOR);
        self.features = features;
        Ok(features)
    }

    pub fn num_queues(&self) -> u16 {
        self.r16(NUM_QUEUES)
    }

    /// The device's maximum size for queue `index` (0: no such queue).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.w16(QUEUE_SELECT, index);
        self.r16(QUEUE_SIZE)
    }

    /// Programs queue `index` with `size` entries at `rings` and enables it.
    /// No validation: the hostile check uses it to hand over bad values.
    pub fn program_queue(&self, index: u16, size: u16, rings: Rings) {
        self.w16(QUEUE_SELECT, index);
        self.w16(QUEUE_SIZE, size);
        self.w16(QUEUE_MSIX_VECTOR, NO_VECTOR);
        self.w64(QUEUE_DESC, rings.desc);
        self.w64(QUEUE_DRIVER, rings.avail);
        self.w64(QUEUE_DEVICE, rings.used);
        self.w16(QUEUE_ENABLE, 1);
    }

    /// Address of queue `index`'s notify register.
    pub fn notify_addr(&self, index: u16) -> Result<u64, Reason> {
        self.w16(QUEUE_SELECT, index);
        let off = u64::from(self.r16(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_mul);
        if off + 2 > u64::from(self.notify_len) {
            return Err(reason!(
                "{}: queue {} notify offset {:#x} is outside the notify structure",
                self.bdf,
                index,
                off
            ));
        }
        Ok(self.notify + off)
    }

    /// Sets up queue `index` with at most `max` entries: rings (and indirect
    /// tables when negotiated) from `dma`.
    pub fn setup_queue(&self, index: u16, max: u16, dma: &mut Dma) -> Result<Virtqueue, Reason> {
        let dev_max = self.queue_max(index);
        if dev_max == 0 {
            return Err(reason!("{}: queue {} is not available", self.bdf, index));
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
        let notify = self.notify_addr(index)?;
        self.program_queue(index, size, rings);
        self.w16(QUEUE_SELECT, index);
        if self.r16(QUEUE_SIZE) != size || self.r16(QUEUE_ENABLE) != 1 {
            return Err(reason!("{}: queue {} did not take size {} / enable", self.bdf, index, size));
        }
        Ok(Virtqueue::new(index, size, rings, notify, self.features & F_EVENT_IDX != 0, indirect))
    }

    pub fn driver_ok(&self) -> Result<(), Reason> {
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let s = self.status();
        if s & STATUS_NEEDS_RESET != 0 || s & STATUS_DRIVER_OK == 0 {
            return Err(reason!("{}: status {:#x} after DRIVER_OK", self.bdf, s));
        }
        Ok(())
    }

    fn device_addr(&self, off: u64, width: u64) -> Option<u64> {
        let (base, len) = self.device?;
        (off + width <= u64::from(len)).then_some(base + off)
    }

    /// Reads `width` (1, 2, 4 or 8) bytes of device configuration, retrying
    /// until the configuration generation is stable. 0 if out of range.
    pub fn config(&self, off: u64, width: u64) -> u64 {
        let Some(addr) = self.device_addr(off, width) else { return 0 };
        loop {
            let gen = self.r8(CONFIG_GENERATION);
            // SAFETY: `addr` lies in the device configuration structure inside
            // an assigned memory BAR (`device_addr` checked the length).
            let v = unsafe {
                match width {
                    1 => u64::from(mmio_read8(addr)),
                    2 => u64::from(mmio_read16(addr)),
                    4 => u64::from(mmio_read32(addr)),
                    _ => u64::from(mmio_read32(addr)) | (u64::from(mmio_read32(addr + 4)) << 32),
                }
            };
            if self.r8(CONFIG_GENERATION) == gen {
                return v;
            }
        }
    }

    /// Reads the ISR status (clears it). 0 without an ISR structure.
    pub fn isr(&self) -> u8 {
        // SAFETY: the ISR structure lies in an assigned memory BAR.
        self.isr.map_or(0, |a| unsafe { mmio_read8(a) })
    }
}
