//! The common configuration structure (virtio 1.2, 4.1.4.3): field by field, at the width
//! the specification gives each field (64-bit addresses also as two 32-bit halves). Other
//! accesses read as zero and are ignored on write.

use std::sync::atomic::Ordering;

use super::{VirtioPci, NO_VECTOR};
use crate::warn_ratelimited;

/// Offsets of the fields.
mod field {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
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
    /// Size of the structure (up to queue_reset).
    pub const END: u64 = 0x3c;
}

fn put(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

fn get(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl VirtioPci {
    pub(super) fn read_common(&self, offset: u64, data: &mut [u8]) {
        use field::*;
        data.fill(0);
        let core = &self.core;
        let q = core.selected_queue();
        let qi = usize::from(core.queue_select);
        let v: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => core.device_feature_select.into(),
            (DEVICE_FEATURE, 4) => core.device_features_word().into(),
            (DRIVER_FEATURE_SELECT, 4) => core.driver_feature_select.into(),
            (DRIVER_FEATURE, 4) => core.driver_features_word().into(),
            (CONFIG_MSIX_VECTOR, 2) => self.vectors.config.load(Ordering::Acquire).into(),
            (NUM_QUEUES, 2) => core.num_queues().into(),
            (DEVICE_STATUS, 1) => core.status().into(),
            (CONFIG_GENERATION, 1) => core.shared().generation.load(Ordering::Acquire).into(),
            (QUEUE_SELECT, 2) => core.queue_select.into(),
            (QUEUE_SIZE, 2) => q.map_or(0, |q| q.size).into(),
            (QUEUE_MSIX_VECTOR, 2) => self
                .vectors
                .queues
                .get(qi)
                .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
                .into(),
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.ready)),
            // Queue i is notified at NOTIFY + 4 * i.
            (QUEUE_NOTIFY_OFF, 2) => q.map_or(0, |_| qi as u64),
            (QUEUE_DESC, 8) | (QUEUE_DESC, 4) => q.map_or(0, |q| q.desc),
            (QUEUE_DRIVER, 8) | (QUEUE_DRIVER, 4) => q.map_or(0, |q| q.driver),
            (QUEUE_DEVICE, 8) | (QUEUE_DEVICE, 4) => q.map_or(0, |q| q.device),
            (o, 4) if o == QUEUE_DESC + 4 => q.map_or(0, |q| q.desc >> 32),
            (o, 4) if o == QUEUE_DRIVER + 4 => q.map_or(0, |q| q.driver >> 32),
            (o, 4) if o == QUEUE_DEVICE + 4 => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        put(data, v);
    }

    pub(super) fn write_common(&mut self, offset: u64, data: &[u8]) {
        use field::*;
        let v = get(data);
        let narrow = |v: u64| u16::try_from(v & 0xffff).unwrap_or(0);
        let word = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap_or(0);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.core.device_feature_select = word(v),
            (DRIVER_FEATURE_SELECT, 4) => self.core.driver_feature_select = word(v),
            (DRIVER_FEATURE, 4) => self.core.write_driver_features_word(word(v)),
            (CONFIG_MSIX_VECTOR, 2) => {
                let vec = self.checked_vector(narrow(v));
                self.vectors.config.store(vec, Ordering::Release);
            }
            (DEVICE_STATUS, 1) => {
                let change = self
                    .core
                    .write_status(u8::try_from(v & 0xff).unwrap_or(0), &self.interrupt);
                self.status_written(change);
            }
            (QUEUE_SELECT, 2) => self.core.queue_select = narrow(v),
            (QUEUE_SIZE, 2) => {
                if let Some(q) = self.core.selected_queue_mut() {
                    q.size = narrow(v);
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                let vec = self.checked_vector(narrow(v));
                if let Some(slot) = self.vectors.queues.get(usize::from(self.core.queue_select)) {
                    slot.store(vec, Ordering::Release);
                }
            }
            (QUEUE_ENABLE, 2) => {
                if v == 1 {
                    if let Some(q) = self.core.selected_queue_mut() {
                        q.ready = true;
                    }
                }
            }
            (QUEUE_DESC, _) | (QUEUE_DRIVER, _) | (QUEUE_DEVICE, _)
                if matches!(data.len(), 4 | 8) =>
            {
                if let Some(q) = self.core.selected_queue_mut() {
                    let f = match offset {
                        QUEUE_DESC => &mut q.desc,
                        QUEUE_DRIVER => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *f = if data.len() == 8 {
                        v
                    } else {
                        (*f & !0xffff_ffff) | v
                    };
                }
            }
            (o, 4) if o == QUEUE_DESC + 4 || o == QUEUE_DRIVER + 4 || o == QUEUE_DEVICE + 4 => {
                if let Some(q) = self.core.selected_queue_mut() {
                    let f = match o - 4 {
                        QUEUE_DESC => &mut q.desc,
                        QUEUE_DRIVER => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *f = (*f & 0xffff_ffff) | (v << 32);
                }
            }
            (o, n) => {
                if o >= END
                    || !matches!(
                        o,
                        DEVICE_FEATURE | NUM_QUEUES | CONFIG_GENERATION | QUEUE_NOTIFY_OFF
                    )
                {
                    warn_ratelimited!(
                        "{}: ignoring a {n}-byte common config write at {o:#x}",
                        self.core.device().name()
                    );
                }
            }
        }
    }

    /// A vector the table has, or NO_VECTOR (which the driver reads back to learn that the
    /// device refused it).
    fn checked_vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors() {
            v
        } else {
            NO_VECTOR
        }
    }
}
