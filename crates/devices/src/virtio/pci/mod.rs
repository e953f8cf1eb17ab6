//! virtio-pci, modern (virtio 1.x): a PCI function with one 64-bit memory BAR holding the
//! common configuration, ISR, device configuration, notification area and the MSI-X table
//! and pending bits, described by vendor capabilities (plus the PCI configuration access
//! capability).
//!
//! Queue notifications arrive on one eventfd per queue that the VMM registers as an
//! ioeventfd at the queue's notification address (multiplier 4: queue `i` at
//! `NOTIFY + 4 * i`), so a notification never waits for a vCPU exit; a write that does reach
//! the transport signals the same eventfd. Interrupts go through MSI-X; with MSI-X disabled,
//! through INTA# and the ISR bits, which the driver reads to learn why (reading clears them).
//!
//! INTA# is a level-triggered line ([`LevelIrqLine`], a resample irqfd on the slot's IOAPIC
//! pin): the device asserts it while the ISR is non-zero, MSI-X is off and the command
//! register does not disable INTx. KVM holds the line high from the first
//! interrupt until the guest's EOI; then the VMM asks [`Resample::resample`] whether it is
//! still asserted, so an interrupt raised while the driver was handling the previous one is
//! delivered again, and one whose ISR the driver read is not.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::transport::{
    SharedStatus, StatusChange, TransportState, VirtioCore, ISR_CONFIG, ISR_QUEUE,
};
use super::{ids, GuestMemory, InterruptKind, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::bus::lock;
use crate::hooks::{IoEventAddress, IoEvents, MsiRouter};
use crate::pci::config::{command, reg, BarKind, BarSpec, PciConfig, PciConfigState, PciHeader};
use crate::pci::msix::{self, Msix, MsixState};
use crate::pci::{PciDevice, PciError};
use crate::{warn_ratelimited, LevelIrqLine, Resample};

/// Red Hat's virtio vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// BAR layout (BAR 0).
pub mod layout {
    /// Common configuration.
    pub const COMMON: u64 = 0x0000;
    /// Interrupt status.
    pub const ISR: u64 = 0x1000;
    /// Device-specific configuration.
    pub const DEVICE: u64 = 0x2000;
    /// Queue notifications, 4 bytes per queue.
    pub const NOTIFY: u64 = 0x3000;
    /// MSI-X table.
    pub const MSIX_TABLE: u64 = 0x4000;
    /// MSI-X pending bits.
    pub const MSIX_PBA: u64 = 0x5000;
    /// Size of each area above.
    pub const AREA: u64 = 0x1000;
    /// BAR size.
    pub const BAR_SIZE: u64 = 0x8000;
    /// Queue `i` is notified at `NOTIFY + NOTIFY_MULTIPLIER * i`.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
}

/// Most queues a virtio-pci device may have (the table holds one vector per queue plus the
/// configuration vector, 256 in its 4 KiB).
pub const MAX_QUEUES: usize = 255;

/// virtio PCI capability types.
mod cap {
    pub const VENDOR: u8 = 0x09;
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// PCI class of each device type.
fn class_of(device_type: u32) -> u32 {
    match device_type {
        ids::NET => 0x02_0000,
        ids::BLOCK => 0x01_8000,
        ids::CONSOLE => 0x07_8000,
        _ => 0xff_0000,
    }
}

/// MSI-X vectors of the queues and of configuration changes, and the interrupt enables,
/// shared with interrupts so that a device's worker never waits for the transport's lock.
struct Vectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
    /// MSI-X is enabled.
    msix_enabled: AtomicBool,
    /// The command register's INTx disable bit.
    intx_disabled: AtomicBool,
}

impl Vectors {
    fn reset(&self) {
        self.config.store(NO_VECTOR, Ordering::Release);
        for q in &self.queues {
            q.store(NO_VECTOR, Ordering::Release);
        }
    }
}

/// INTA#: asserted while the ISR is non-zero, MSI-X is off and INTx is not disabled.
struct Intx {
    line: LevelIrqLine,
    shared: Arc<SharedStatus>,
    vectors: Arc<Vectors>,
}

impl Intx {
    /// MSI-X is off and the command register does not disable INTx.
    fn enabled(&self) -> bool {
        !self.vectors.msix_enabled.load(Ordering::Acquire)
            && !self.vectors.intx_disabled.load(Ordering::Acquire)
    }
}

impl Resample for Intx {
    fn line(&self) -> &LevelIrqLine {
        &self.line
    }

    fn pending(&self) -> bool {
        self.enabled() && self.shared.isr.load(Ordering::Acquire) != 0
    }
}

/// How a virtio-pci device signals its driver.
struct PciInterrupt {
    name: &'static str,
    shared: Arc<SharedStatus>,
    vectors: Arc<Vectors>,
    msix: Arc<Mutex<Msix>>,
    intx: Option<Arc<Intx>>,
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let (vector, isr) = match kind {
            InterruptKind::Config => (self.vectors.config.load(Ordering::Acquire), ISR_CONFIG),
            InterruptKind::Queue(i) => (
                self.vectors
                    .queues
                    .get(usize::from(i))
                    .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire)),
                ISR_QUEUE,
            ),
        };
        if kind == InterruptKind::Config {
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        if self.vectors.msix_enabled.load(Ordering::Acquire) {
            if vector != NO_VECTOR {
                lock(&self.msix).trigger(vector);
            }
            return Ok(());
        }
        // MSI-X off: the ISR says why, INTA# (when enabled) says that.
        self.shared.isr.fetch_or(isr, Ordering::AcqRel);
        match &self.intx {
            Some(intx) if intx.enabled() => intx.line.assert(),
            _ => Ok(()),
        }
    }

    fn needs_reset(&self, reason: &str) {
        self.shared.set_needs_reset(self.name, reason);
        let _ = self.trigger(InterruptKind::Config);
    }
}

/// A virtio-pci device's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// Configuration space.
    pub config: PciConfigState,
    /// MSI-X table and bits.
    pub msix: MsixState,
    /// Configuration-change vector.
    pub config_vector: u16,
    /// Queue vectors.
    pub queue_vectors: Vec<u16>,
    /// The virtio transport and device.
    pub transport: TransportState,
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: PciConfig,
    core: VirtioCore,
    msix: Arc<Mutex<Msix>>,
    vectors: Arc<Vectors>,
    interrupt: Arc<dyn VirtioInterrupt>,
    intx: Option<Arc<Intx>>,
    ioevents: Arc<dyn IoEvents>,
    /// Where BAR 0 decodes (the ioeventfds are registered there).
    bar: Option<u64>,
    msix_cap: usize,
    cfg_cap: usize,
}

impl VirtioPci {
    /// Wraps `device`; MSI-X vectors come from `router`, notifications are registered with
    /// `ioevents` once the BAR is placed; `intx` is INTA# and the GSI it raises (the
    /// interrupt line register's initial value), if the device has one.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        router: Arc<dyn MsiRouter>,
        ioevents: Arc<dyn IoEvents>,
        intx: Option<(LevelIrqLine, u8)>,
    ) -> Result<Self, PciError> {
        let name = device.name();
        let dtype = device.device_type();
        let nq = device.queue_max_sizes().len();
        if nq > MAX_QUEUES {
            return Err(PciError::BadState(format!(
                "{name}: {nq} queues, at most {MAX_QUEUES}"
            )));
        }
        let device_id = u16::try_from(dtype)
            .ok()
            .and_then(|t| DEVICE_ID_BASE.checked_add(t))
            .ok_or_else(|| PciError::BadState(format!("{name}: device type {dtype}")))?;
        let core = VirtioCore::new(device, mem).map_err(|e| PciError::BadState(e.to_string()))?;
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: VENDOR_ID,
            device_id,
            revision: 1,
            class: class_of(dtype),
            subsystem_vendor_id: VENDOR_ID,
            subsystem_id: 0x40,
        });
        config.add_bar(
            0,
            BarSpec {
                size: layout::BAR_SIZE,
                kind: BarKind::Mem64 {
                    prefetchable: false,
                },
            },
        )?;
        let intx = intx.map(|(line, gsi)| {
            config.set_interrupt_pin(1);
            config.set_bytes(reg::INTERRUPT_LINE, &[gsi]);
            line
        });
        let nq16 = u16::try_from(nq).unwrap_or(u16::MAX);
        let msix = Msix::new(nq16 + 1, router)?;
        let vcap = |config: &mut PciConfig, kind: u8, offset: u64, len: u64| {
            config.add_capability(cap::VENDOR, &vendor_cap(kind, offset, len, &[]), &[0; 14])
        };
        vcap(&mut config, cap::COMMON, layout::COMMON, layout::AREA)?;
        config.add_capability(
            cap::VENDOR,
            &vendor_cap(
                cap::NOTIFY,
                layout::NOTIFY,
                layout::AREA,
                &layout::NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[0; 18],
        )?;
        vcap(&mut config, cap::ISR, layout::ISR, layout::AREA)?;
        vcap(&mut config, cap::DEVICE, layout::DEVICE, layout::AREA)?;
        // PCI configuration access: bar, offset, length and data are the driver's.
        let mut w = [0u8; 18];
        w[2] = 0xff;
        w[6..18].fill(0xff);
        let cfg_cap =
            config.add_capability(cap::VENDOR, &vendor_cap(cap::PCI_CFG, 0, 0, &[0; 4]), &w)?;
        let (body, wmask) = msix.capability(
            0,
            u32::try_from(layout::MSIX_TABLE).unwrap_or(0),
            u32::try_from(layout::MSIX_PBA).unwrap_or(0),
        );
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &wmask)?;
        let vectors = Arc::new(Vectors {
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..nq).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            msix_enabled: AtomicBool::new(false),
            intx_disabled: AtomicBool::new(false),
        });
        let msix = Arc::new(Mutex::new(msix));
        let intx = intx.map(|line| {
            Arc::new(Intx {
                line,
                shared: core.shared().clone(),
                vectors: vectors.clone(),
            })
        });
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(PciInterrupt {
            name,
            shared: core.shared().clone(),
            vectors: vectors.clone(),
            msix: msix.clone(),
            intx: intx.clone(),
        });
        Ok(VirtioPci {
            config,
            core,
            msix,
            vectors,
            interrupt,
            intx,
            ioevents,
            bar: None,
            msix_cap,
            cfg_cap,
        })
    }

    /// The transport core (status, features, queues).
    pub fn core(&self) -> &VirtioCore {
        &self.core
    }

    /// INTA#, for whoever watches its resample eventfd; `None` without INTx.
    pub fn intx(&self) -> Option<Arc<dyn Resample>> {
        self.intx.clone().map(|i| i as Arc<dyn Resample>)
    }

    /// Pauses the device.
    pub fn pause(&mut self) -> Result<(), VirtioError> {
        self.core.pause()
    }

    /// Resumes the device.
    pub fn resume(&mut self) -> Result<(), VirtioError> {
        self.core.resume()
    }

    /// Stops the device for good (the VM is ending): its workers stop, its queues drop.
    pub fn shutdown(&mut self) {
        self.core.reset();
    }

    /// The device's state; it must be paused.
    pub fn state(&self) -> Result<VirtioPciState, VirtioError> {
        Ok(VirtioPciState {
            config: self.config.state(),
            msix: lock(&self.msix).state(),
            config_vector: self.vectors.config.load(Ordering::Acquire),
            queue_vectors: self
                .vectors
                .queues
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
            transport: self.core.state()?,
        })
    }

    /// Restores [`VirtioPci::state`]. The caller then lets the root re-map the BAR
    /// ([`crate::pci::PciRoot::sync_all_bars`]). An interrupt pending in the saved ISR raises
    /// INTA# again: the line's level is not part of the state, the ISR is.
    pub fn restore(&mut self, s: VirtioPciState) -> Result<(), VirtioError> {
        let name = self.core.device().name();
        let bad = |reason: String| VirtioError::State {
            device: name,
            reason,
        };
        if s.queue_vectors.len() != self.vectors.queues.len() {
            return Err(bad(format!(
                "{} queue vectors saved",
                s.queue_vectors.len()
            )));
        }
        self.config
            .restore(&s.config)
            .map_err(|e| bad(e.to_string()))?;
        lock(&self.msix)
            .restore(&s.msix)
            .map_err(|e| bad(e.to_string()))?;
        self.sync_interrupt_enables();
        self.vectors
            .config
            .store(s.config_vector, Ordering::Release);
        for (v, saved) in self.vectors.queues.iter().zip(&s.queue_vectors) {
            v.store(*saved, Ordering::Release);
        }
        self.core.restore(s.transport, &self.interrupt)?;
        self.reassert_intx();
        Ok(())
    }

    /// Raises INTA# if it is asserted now (after a restore, or when the driver enables it
    /// with an interrupt pending).
    fn reassert_intx(&self) {
        if let Some(intx) = self.intx.as_ref().filter(|i| i.pending()) {
            if let Err(e) = intx.line.assert() {
                warn_ratelimited!("{}: INTA#: {e}", self.core.device().name());
            }
        }
    }

    fn set_ioevents(&self, base: u64, register: bool) {
        for (i, fd) in self.core.notify_fds().iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + layout::NOTIFY + 4 * i as u64);
            let r = if register {
                self.ioevents.register(fd, addr, None)
            } else {
                self.ioevents.unregister(fd, addr, None)
            };
            if let Err(e) = r {
                warn_ratelimited!(
                    "{}: queue {i} ioeventfd at {addr:?}: {e}",
                    self.core.device().name()
                );
            }
        }
    }

    /// Mirrors MSI-X enable and INTx disable for the interrupt path. A pending interrupt
    /// raises INTA# once it is unmasked, as on a real PCI function.
    fn sync_interrupt_enables(&self) {
        let was_enabled = self.intx.as_ref().is_some_and(|i| i.enabled());
        let msix = lock(&self.msix).enabled();
        self.vectors.msix_enabled.store(msix, Ordering::Release);
        let intx_off = self.config.command() & command::INTX_DISABLE != 0;
        self.vectors
            .intx_disabled
            .store(intx_off, Ordering::Release);
        if !was_enabled {
            self.reassert_intx();
        }
    }

    fn msix_vectors(&self) -> u16 {
        lock(&self.msix).count()
    }

    /// A BAR access through the PCI configuration access capability.
    fn cfg_cap_target(&self) -> Option<(u64, usize)> {
        let c = self.config.bytes(self.cfg_cap, 20);
        let bar = c[4];
        let offset = u64::from(u32::from_le_bytes([c[8], c[9], c[10], c[11]]));
        let len = usize::try_from(u32::from_le_bytes([c[12], c[13], c[14], c[15]])).ok()?;
        (bar == 0 && matches!(len, 1 | 2 | 4) && offset % len as u64 == 0).then_some((offset, len))
    }
}

/// A virtio vendor capability body (after ID and next pointer).
fn vendor_cap(kind: u8, offset: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![
        u8::try_from(16 + extra.len()).unwrap_or(0),
        kind,
        0, // BAR 0
        0, // id
        0,
        0,
    ];
    b.extend_from_slice(&u32::try_from(offset).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

fn overlaps(a: usize, alen: usize, b: usize, blen: usize) -> bool {
    a < b + blen && b < a + alen
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let data_at = self.cfg_cap + 16;
        if overlaps(offset, data.len(), data_at, 4) {
            let mut window = [0u8; 4];
            if let Some((bar_offset, len)) = self.cfg_cap_target() {
                self.read_bar(0, bar_offset, &mut window[..len]);
            }
            self.config.set_bytes(data_at, &window);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let ctrl_at = self.msix_cap + 2;
        if overlaps(offset, data.len(), ctrl_at, 2) {
            let c = self.config.bytes(ctrl_at, 2);
            let control = u16::from_le_bytes([c[0], c[1]]);
            lock(&self.msix).set_control(control);
        }
        self.sync_interrupt_enables();
        let data_at = self.cfg_cap + 16;
        if overlaps(offset, data.len(), data_at, 4) {
            if let Some((bar_offset, len)) = self.cfg_cap_target() {
                let window = self.config.bytes(data_at, 4)[..len].to_vec();
                self.write_bar(0, bar_offset, &window);
            }
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let area = offset / layout::AREA * layout::AREA;
        let at = offset - area;
        match area {
            layout::COMMON => self.read_common(at, data),
            layout::ISR if at == 0 => {
                data[0] = self.core.shared().isr.swap(0, Ordering::AcqRel);
            }
            layout::DEVICE => self.core.device().read_config(at, data),
            layout::MSIX_TABLE => lock(&self.msix).read_table(at, data),
            layout::MSIX_PBA => lock(&self.msix).read_pba(at, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let area = offset / layout::AREA * layout::AREA;
        let at = offset - area;
        match area {
            layout::COMMON => self.write_common(at, data),
            layout::DEVICE => self.core.device_mut().write_config(at, data),
            layout::NOTIFY => {
                // Reached only when the ioeventfd is not registered.
                let fd = usize::try_from(at / 4)
                    .ok()
                    .filter(|_| at.is_multiple_of(4))
                    .and_then(|q| self.core.notify_fd(q));
                if let Some(fd) = fd {
                    let _ = fd.write(1);
                }
            }
            layout::MSIX_TABLE => lock(&self.msix).write_table(at, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        if bar != 0 {
            return;
        }
        if let Some(old) = self.bar.take() {
            self.set_ioevents(old, false);
        }
        if let Some(new) = addr {
            self.set_ioevents(new, true);
        }
        self.bar = addr;
    }
}

impl VirtioPci {
    fn status_written(&mut self, change: StatusChange) {
        match change {
            StatusChange::Reset => self.vectors.reset(),
            StatusChange::NeedsReset => {
                let _ = self.interrupt.trigger(InterruptKind::Config);
            }
            StatusChange::None | StatusChange::Activated => {}
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.core.reset();
        if let Some(b) = self.bar.take() {
            self.set_ioevents(b, false);
        }
    }
}

#[cfg(test)]
mod tests;
