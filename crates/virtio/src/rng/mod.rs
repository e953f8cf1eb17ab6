//! virtio-rng: one queue of device-writable buffers, filled from the host's `getrandom`.
//!
//! The queue is served on its own thread (started on activation and resume, stopped on
//! pause and reset). Each chain gets at most [`MAX_BYTES_PER_REQUEST`] bytes (the used
//! length tells the driver how many), so a hostile 4 GiB descriptor costs nothing much;
//! device-readable descriptors are skipped. A chain that does not end, or a buffer outside
//! guest RAM, puts the device in DEVICE_NEEDS_RESET.

mod worker;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use kiln_devices::virtio::{features, ids, Activation, VirtioDevice, VirtioError};

use crate::common::worker::Worker;
use crate::common::{state_error, state_from_json, state_to_json, QueueProgress};
use worker::RngQueue;

/// Most bytes written into one request.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;
/// Queue size the device offers.
pub const QUEUE_SIZE: u16 = 256;

const NAME: &str = "virtio-rng";

/// The device's own state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Progress of the request queue, if the device was activated.
    pub queue: Option<QueueProgress>,
}

/// The entropy device.
pub struct Rng {
    /// The serving thread, while running.
    worker: Option<Worker<RngQueue>>,
    /// The queue, while paused.
    parked: Option<RngQueue>,
    /// Progress restored from a snapshot, applied at the next activation.
    restored: Option<QueueProgress>,
    max_sizes: [u16; 1],
}

impl Rng {
    /// A device with no queue yet.
    pub fn new() -> Self {
        Rng {
            worker: None,
            parked: None,
            restored: None,
            max_sizes: [QUEUE_SIZE],
        }
    }

    fn start(&mut self, q: RngQueue) -> Result<(), VirtioError> {
        self.worker = Some(Worker::spawn(NAME, "virtio-rng".into(), move |stop| {
            q.run(stop)
        })?);
        Ok(())
    }

    fn queue(&self) -> Option<&Queue> {
        self.parked.as_ref().map(|q| &q.queue)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        ids::RNG
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        if self.worker.is_some() || self.parked.is_some() {
            return Err(VirtioError::BadActivation {
                device: NAME,
                reason: "already active".into(),
            });
        }
        let mut queues = a.queues.into_iter();
        let Some(mut active) = queues.next().filter(|q| q.index == 0) else {
            return Err(VirtioError::BadActivation {
                device: NAME,
                reason: "the request queue (0) is not enabled".into(),
            });
        };
        if let Some(p) = self.restored.take() {
            p.apply(&mut active.queue);
        }
        self.start(RngQueue {
            queue: active.queue,
            notify: active.notify,
            mem: a.mem,
            interrupt: a.interrupt,
            broken: false,
        })
    }

    fn reset(&mut self) -> Result<(), VirtioError> {
        self.parked = None;
        self.restored = None;
        match self.worker.take() {
            Some(w) => w.stop(NAME).map(drop),
            None => Ok(()),
        }
    }

    fn pause(&mut self) -> Result<(), VirtioError> {
        if let Some(w) = self.worker.take() {
            self.parked = Some(w.stop(NAME)?);
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        match self.parked.take() {
            Some(q) => self.start(q),
            None => Ok(()),
        }
    }

    fn save_state(&self) -> Result<serde_json::Value, VirtioError> {
        if self.worker.is_some() {
            return Err(state_error(NAME, "state saved while running; pause first"));
        }
        let state = RngState {
            queue: self.queue().map(QueueProgress::of).or(self.restored),
        };
        state_to_json(NAME, &state)
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), VirtioError> {
        let s: RngState = state_from_json(NAME, state)?;
        self.restored = s.queue;
        Ok(())
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        let _ = self.reset();
    }
}

#[cfg(test)]
mod tests;
