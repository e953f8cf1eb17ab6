//! What virtio-pci and virtio-mmio share: feature negotiation, the device status state
//! machine, the driver's queue configuration (checked before the device ever sees it),
//! activation and reset, and the transport's part of a snapshot.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    features, status, Activation, ActiveQueue, GuestMemory, VirtioDevice, VirtioError,
    VirtioInterrupt,
};
use crate::warn_ratelimited;

/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the configuration changed (or the device needs a reset).
pub const ISR_CONFIG: u8 = 2;

/// Status the transport and the device's workers share: a worker may set
/// DEVICE_NEEDS_RESET and ISR bits without taking the transport's lock.
#[derive(Debug, Default)]
pub struct SharedStatus {
    /// Device status.
    pub status: AtomicU8,
    /// Interrupt status (ISR).
    pub isr: AtomicU8,
    /// Configuration generation.
    pub generation: AtomicU8,
}

impl SharedStatus {
    /// Marks the device broken: DEVICE_NEEDS_RESET, logged (rate-limited). The caller sends
    /// the configuration interrupt.
    pub fn set_needs_reset(&self, device: &str, reason: &str) {
        warn_ratelimited!("{device}: needs reset: {reason}");
        self.status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The driver's configuration of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Largest size the device allows.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Driver area (available ring).
    pub driver: u64,
    /// Device area (used ring).
    pub device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Checks the configuration against the specification and guest RAM, and builds the
    /// queue the device will serve.
    pub fn to_queue(&self, mem: &GuestMemory, event_idx: bool) -> Result<Queue, String> {
        let n = u64::from(self.size);
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(format!(
                "size {} (must be a power of two up to {})",
                self.size, self.max_size
            ));
        }
        let areas = [
            ("descriptor table", self.desc, 16, 16 * n),
            ("driver area", self.driver, 2, 6 + 2 * n),
            ("device area", self.device, 4, 6 + 8 * n),
        ];
        for (what, addr, align, len) in areas {
            if addr % align != 0 {
                return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
            }
            let fits = usize::try_from(len)
                .is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(addr), len));
            if !fits {
                return Err(format!(
                    "{what} at {addr:#x} ({len} bytes) is not in guest RAM"
                ));
            }
        }
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size).map_err(|e| e.to_string())?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| e.to_string())?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|e| e.to_string())?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|e| e.to_string())?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        Ok(q)
    }
}

/// The transport's part of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    /// Device feature word selected.
    pub device_feature_select: u32,
    /// Driver feature word selected.
    pub driver_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Device status.
    pub status: u8,
    /// Interrupt status.
    pub isr: u8,
    /// Configuration generation.
    pub generation: u8,
    /// Queue selected.
    pub queue_select: u16,
    /// Every queue's configuration.
    pub queues: Vec<QueueConfig>,
    /// The device was activated.
    pub activated: bool,
    /// The device's own state ([`VirtioDevice::save_state`]).
    pub device: serde_json::Value,
}

/// What a status write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// Nothing the transport must act on.
    None,
    /// The driver reset the device.
    Reset,
    /// The device was activated.
    Activated,
    /// Activation failed: DEVICE_NEEDS_RESET is set; send a configuration interrupt.
    NeedsReset,
}

/// The common transport core.
pub struct VirtioCore {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    shared: Arc<SharedStatus>,
    /// Device feature word selected (0: bits 0-31, 1: bits 32-63).
    pub device_feature_select: u32,
    /// Driver feature word selected.
    pub driver_feature_select: u32,
    /// Queue selected.
    pub queue_select: u16,
    driver_features: u64,
    queues: Vec<QueueConfig>,
    notify: Vec<EventFd>,
    activated: bool,
    /// Paused by the VMM: a device activated by a restore stays paused until resumed.
    paused: bool,
}

impl VirtioCore {
    /// A core for `device` with one notification eventfd per queue.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Result<Self, VirtioError> {
        let name = device.name();
        let queues: Vec<QueueConfig> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueConfig::new(m))
            .collect();
        let notify = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VirtioError::Io {
                device: name,
                source,
            })?;
        Ok(VirtioCore {
            device,
            mem,
            shared: Arc::new(SharedStatus::default()),
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            driver_features: 0,
            queues,
            notify,
            activated: false,
            paused: false,
        })
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device, mutably (configuration space writes).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Status shared with interrupts.
    pub fn shared(&self) -> &Arc<SharedStatus> {
        &self.shared
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    /// The notification eventfd of queue `i`.
    pub fn notify_fd(&self, i: usize) -> Option<&EventFd> {
        self.notify.get(i)
    }

    /// Every notification eventfd, by queue.
    pub fn notify_fds(&self) -> &[EventFd] {
        &self.notify
    }

    /// Device status.
    pub fn status(&self) -> u8 {
        self.shared.status.load(Ordering::Acquire)
    }

    /// Whether the device runs.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// The selected word of the device's features.
    pub fn device_features_word(&self) -> u32 {
        word(self.device.features(), self.device_feature_select)
    }

    /// The selected word of the driver's features.
    pub fn driver_features_word(&self) -> u32 {
        word(self.driver_features, self.driver_feature_select)
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The driver writes its selected feature word; ignored after FEATURES_OK.
    pub fn write_driver_features_word(&mut self, value: u32) {
        if self.status() & status::FEATURES_OK != 0 {
            warn_ratelimited!(
                "{}: feature write after FEATURES_OK ignored",
                self.device.name()
            );
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.driver_features =
            (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
    }

    /// The selected queue's configuration, if the selection is a queue.
    pub fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue's configuration for a driver write: `None` if the selection is not
    /// a queue, or once the queue is enabled or the device runs (the driver must not change
    /// it then).
    pub fn selected_queue_mut(&mut self) -> Option<&mut QueueConfig> {
        let activated = self.activated;
        let name = self.device.name();
        let q = self.queues.get_mut(usize::from(self.queue_select))?;
        if q.ready || activated {
            warn_ratelimited!("{name}: write to an enabled queue's configuration ignored");
            return None;
        }
        Some(q)
    }

    /// The driver writes the device status.
    pub fn write_status(
        &mut self,
        value: u8,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> StatusChange {
        if value == 0 {
            self.reset();
            return StatusChange::Reset;
        }
        let old = self.status();
        let name = self.device.name();
        // DEVICE_NEEDS_RESET is the device's bit; the driver cannot set or clear it.
        let value = (value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if value & old != old {
            warn_ratelimited!(
                "{name}: driver cleared status bits ({old:#x} -> {value:#x}); ignored"
            );
            return StatusChange::None;
        }
        let added = value & !old;
        let mut new = value;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let extra = self.driver_features & !offered;
            if extra != 0 || self.driver_features & features::VERSION_1 == 0 {
                warn_ratelimited!(
                    "{name}: features {:#x} refused (offered {offered:#x}; VERSION_1 is required)",
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        let mut change = StatusChange::None;
        if added & status::DRIVER_OK != 0 {
            let ready = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
            let result = if new & ready != ready {
                Err("DRIVER_OK before ACKNOWLEDGE, DRIVER and FEATURES_OK".to_string())
            } else if new & status::DEVICE_NEEDS_RESET != 0 {
                Err("DRIVER_OK while the device needs a reset".to_string())
            } else {
                self.activate(interrupt)
            };
            match result {
                Ok(()) => change = StatusChange::Activated,
                Err(reason) => {
                    new &= !status::DRIVER_OK;
                    self.shared.status.store(new, Ordering::Release);
                    self.shared.set_needs_reset(name, &reason);
                    return StatusChange::NeedsReset;
                }
            }
        }
        self.shared.status.store(new, Ordering::Release);
        change
    }

    fn activate(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) -> Result<(), String> {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, cfg) in self.queues.iter().enumerate() {
            if !cfg.ready {
                continue;
            }
            let queue = cfg
                .to_queue(&self.mem, event_idx)
                .map_err(|e| format!("queue {i}: {e}"))?;
            let notify = self.notify[i]
                .try_clone()
                .map_err(|e| format!("queue {i}: cannot clone its eventfd: {e}"))?;
            queues.push(ActiveQueue {
                index: u16::try_from(i).unwrap_or(u16::MAX),
                queue,
                notify,
            });
        }
        self.device
            .activate(Activation {
                mem: self.mem.clone(),
                features: self.driver_features,
                queues,
                interrupt: interrupt.clone(),
            })
            .map_err(|e| e.to_string())?;
        self.activated = true;
        Ok(())
    }

    /// Back to the state after power-on: device stopped, queues unconfigured.
    pub fn reset(&mut self) {
        if self.activated {
            if let Err(e) = self.device.reset() {
                warn_ratelimited!("{}: reset: {e}", self.device.name());
            }
            self.activated = false;
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for n in &self.notify {
            let _ = n.read();
        }
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.shared.status.store(0, Ordering::Release);
        self.shared.isr.store(0, Ordering::Release);
    }

    /// Pauses the device.
    pub fn pause(&mut self) -> Result<(), VirtioError> {
        if self.activated && !self.paused {
            self.device.pause()?;
        }
        self.paused = true;
        Ok(())
    }

    /// Resumes the device.
    pub fn resume(&mut self) -> Result<(), VirtioError> {
        if self.activated && self.paused {
            self.device.resume()?;
        }
        self.paused = false;
        Ok(())
    }

    /// The transport's state with the device's; the device must be paused.
    pub fn state(&self) -> Result<TransportState, VirtioError> {
        Ok(TransportState {
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status(),
            isr: self.shared.isr.load(Ordering::Acquire),
            generation: self.shared.generation.load(Ordering::Acquire),
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            activated: self.activated,
            device: self.device.save_state()?,
        })
    }

    /// Restores [`VirtioCore::state`] into a device that was never activated, and activates
    /// it again if it was running.
    pub fn restore(
        &mut self,
        s: TransportState,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        let name = self.device.name();
        let bad = |reason: String| VirtioError::State {
            device: name,
            reason,
        };
        if s.queues.len() != self.queues.len()
            || s.queues
                .iter()
                .zip(&self.queues)
                .any(|(a, b)| a.max_size != b.max_size)
        {
            return Err(bad(format!(
                "{} queues saved, the device has {} (or their sizes differ)",
                s.queues.len(),
                self.queues.len()
            )));
        }
        self.reset();
        self.device.restore_state(s.device)?;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.queues = s.queues;
        self.shared.isr.store(s.isr, Ordering::Release);
        self.shared
            .generation
            .store(s.generation, Ordering::Release);
        self.shared.status.store(s.status, Ordering::Release);
        if s.activated {
            self.activate(interrupt).map_err(bad)?;
            if self.paused {
                self.device.pause()?;
            }
        }
        Ok(())
    }
}

fn word(v: u64, select: u32) -> u32 {
    match select {
        0 => u32::try_from(v & 0xffff_ffff).unwrap_or(0),
        1 => u32::try_from(v >> 32).unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
