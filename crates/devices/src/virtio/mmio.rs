//! virtio-mmio, version 2 (modern): a 4 KiB register block on the MMIO bus, announced to the
//! kernel on its command line (`virtio_mmio.device=4K@<base>:<gsi>`).
//!
//! Queue notifications arrive on one eventfd per queue that is registered as an ioeventfd
//! on the QueueNotify register with the queue index as datamatch; a notification that does
//! reach the transport signals the same eventfd. Interrupts set InterruptStatus and raise a
//! level-triggered IOAPIC line ([`LevelIrqLine`], a resample irqfd): the device asserts it
//! while InterruptStatus is non-zero, so after the guest's EOI the VMM raises it again
//! ([`Resample::resample`]) unless the driver acknowledged every bit (InterruptACK).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::transport::{
    SharedStatus, StatusChange, TransportState, VirtioCore, ISR_CONFIG, ISR_QUEUE,
};
use super::{GuestMemory, InterruptKind, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::bus::BusDevice;
use crate::hooks::{IoEventAddress, IoEvents};
use crate::{warn_ratelimited, LevelIrqLine, Resample};

/// "virt".
const MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
const VERSION: u32 = 2;
/// Vendor ID the device reports ("KILN").
const VENDOR: u32 = 0x4e4c_494b;

/// Register offsets.
pub mod reg {
    /// Magic value.
    pub const MAGIC: u64 = 0x000;
    /// Version.
    pub const VERSION: u64 = 0x004;
    /// Device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features (selected word).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device features word select.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features (selected word).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver features word select.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue select.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue enabled.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table, low half.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table, high half.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Driver area, low half.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Driver area, high half.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Device area, low half.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Device area, high half.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Shared memory region select.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory length, low half.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory length, high half.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// The device's interrupt line: asserted while InterruptStatus is non-zero.
struct MmioIrq {
    line: LevelIrqLine,
    shared: Arc<SharedStatus>,
}

impl Resample for MmioIrq {
    fn line(&self) -> &LevelIrqLine {
        &self.line
    }

    fn pending(&self) -> bool {
        self.shared.isr.load(Ordering::Acquire) != 0
    }
}

struct MmioInterrupt {
    name: &'static str,
    shared: Arc<SharedStatus>,
    irq: Arc<MmioIrq>,
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let bit = match kind {
            InterruptKind::Config => {
                self.shared.generation.fetch_add(1, Ordering::AcqRel);
                ISR_CONFIG
            }
            InterruptKind::Queue(_) => ISR_QUEUE,
        };
        self.shared.isr.fetch_or(bit, Ordering::AcqRel);
        self.irq.line.assert()
    }

    fn needs_reset(&self, reason: &str) {
        self.shared.set_needs_reset(self.name, reason);
        let _ = self.trigger(InterruptKind::Config);
    }
}

/// A virtio-mmio device's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// The virtio transport and device.
    pub transport: TransportState,
}

/// A virtio device on virtio-mmio.
pub struct VirtioMmio {
    core: VirtioCore,
    interrupt: Arc<dyn VirtioInterrupt>,
    irq: Arc<MmioIrq>,
    ioevents: Arc<dyn IoEvents>,
    base: u64,
}

impl VirtioMmio {
    /// Wraps `device` at `base`, interrupting through `irq`; registers the queue
    /// notification ioeventfds.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        base: u64,
        irq: LevelIrqLine,
        ioevents: Arc<dyn IoEvents>,
    ) -> Result<Self, VirtioError> {
        let name = device.name();
        let core = VirtioCore::new(device, mem)?;
        let irq = Arc::new(MmioIrq {
            line: irq,
            shared: core.shared().clone(),
        });
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(MmioInterrupt {
            name,
            shared: core.shared().clone(),
            irq: irq.clone(),
        });
        for (i, fd) in core.notify_fds().iter().enumerate() {
            ioevents
                .register(
                    fd,
                    IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
                    Some(u32::try_from(i).unwrap_or(u32::MAX)),
                )
                .map_err(|source| VirtioError::Io {
                    device: name,
                    source,
                })?;
        }
        Ok(VirtioMmio {
            core,
            interrupt,
            irq,
            ioevents,
            base,
        })
    }

    /// The transport core.
    pub fn core(&self) -> &VirtioCore {
        &self.core
    }

    /// The interrupt line, for whoever watches its resample eventfd.
    pub fn irq(&self) -> Arc<dyn Resample> {
        self.irq.clone()
    }

    /// Pauses the device.
    pub fn pause(&mut self) -> Result<(), VirtioError> {
        self.core.pause()
    }

    /// Resumes the device.
    pub fn resume(&mut self) -> Result<(), VirtioError> {
        self.core.resume()
    }

    /// Stops the device for good.
    pub fn shutdown(&mut self) {
        self.core.reset();
    }

    /// The state; the device must be paused.
    pub fn state(&self) -> Result<VirtioMmioState, VirtioError> {
        Ok(VirtioMmioState {
            transport: self.core.state()?,
        })
    }

    /// Restores [`VirtioMmio::state`]. A pending InterruptStatus raises the line again: the
    /// line's level is not part of the state, InterruptStatus is.
    pub fn restore(&mut self, s: VirtioMmioState) -> Result<(), VirtioError> {
        self.core.restore(s.transport, &self.interrupt)?;
        if self.irq.pending() {
            if let Err(e) = self.irq.line.assert() {
                warn_ratelimited!("{}: interrupt line: {e}", self.core.device().name());
            }
        }
        Ok(())
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let core = &self.core;
        let q = core.selected_queue();
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => core.device().device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => core.device_features_word(),
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| q.max_size.into()),
            reg::QUEUE_READY => q.map_or(0, |q| q.ready.into()),
            reg::INTERRUPT_STATUS => core.shared().isr.load(Ordering::Acquire).into(),
            reg::STATUS => core.status().into(),
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => core.shared().generation.load(Ordering::Acquire).into(),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let set_half = |f: &mut u64, high: bool| {
            *f = if high {
                (*f & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (*f & !0xffff_ffff) | u64::from(v)
            };
        };
        match offset {
            reg::DEVICE_FEATURES_SEL => self.core.device_feature_select = v,
            reg::DRIVER_FEATURES_SEL => self.core.driver_feature_select = v,
            reg::DRIVER_FEATURES => self.core.write_driver_features_word(v),
            reg::QUEUE_SEL => self.core.queue_select = u16::try_from(v).unwrap_or(u16::MAX),
            reg::QUEUE_NUM => {
                if let Some(q) = self.core.selected_queue_mut() {
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            reg::QUEUE_READY => {
                if v == 1 {
                    if let Some(q) = self.core.selected_queue_mut() {
                        q.ready = true;
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                if let Some(fd) = usize::try_from(v).ok().and_then(|i| self.core.notify_fd(i)) {
                    let _ = fd.write(1);
                }
            }
            reg::INTERRUPT_ACK => {
                let bits = u8::try_from(v & 0x3).unwrap_or(0);
                self.core.shared().isr.fetch_and(!bits, Ordering::AcqRel);
            }
            reg::STATUS => {
                let change = self
                    .core
                    .write_status(u8::try_from(v & 0xff).unwrap_or(0), &self.interrupt);
                if change == StatusChange::NeedsReset {
                    let _ = self.interrupt.trigger(InterruptKind::Config);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.core.selected_queue_mut() {
                    set_half(&mut q.desc, offset == reg::QUEUE_DESC_HIGH);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.core.selected_queue_mut() {
                    set_half(&mut q.driver, offset == reg::QUEUE_DRIVER_HIGH);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.core.selected_queue_mut() {
                    set_half(&mut q.device, offset == reg::QUEUE_DEVICE_HIGH);
                }
            }
            reg::SHM_SEL => {}
            _ => warn_ratelimited!(
                "{}: ignoring a write to virtio-mmio register {offset:#x}",
                self.core.device().name()
            ),
        }
    }
}

impl BusDevice for VirtioMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.core.device().read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0xff);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.core
                .device_mut()
                .write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn_ratelimited!(
                "{}: ignoring a {}-byte virtio-mmio access at {offset:#x}",
                self.core.device().name(),
                data.len()
            );
            return;
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(data);
        self.write_reg(offset, u32::from_le_bytes(b));
    }
}

impl Drop for VirtioMmio {
    fn drop(&mut self) {
        self.core.reset();
        for (i, fd) in self.core.notify_fds().iter().enumerate() {
            let _ = self.ioevents.unregister(
                fd,
                IoEventAddress::Mmio(self.base + reg::QUEUE_NOTIFY),
                Some(u32::try_from(i).unwrap_or(u32::MAX)),
            );
        }
    }
}

#[cfg(test)]
mod tests;
