//! virtio-console with one port (no MULTIPORT): receive queue 0, transmit queue 1, and
//! emergency writes through the configuration space. Backends: stdio, a file (output only),
//! or a unix socket kiln listens on (one client at a time; later clients may reconnect).

mod backend;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use kiln_devices::virtio::{features, ids, Activation, VirtioDevice, VirtioError};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

pub use backend::{BackendError, ConsoleBackend};

use crate::common::worker::{stop_all, Worker};
use crate::common::{
    read_config_space, state_error, state_from_json, state_to_json, QueueProgress,
};
use backend::Backend;
use worker::{ConsoleQueue, ConsoleQueues, Shared};

const NAME: &str = "virtio-console";

/// Emergency writes through `emerg_wr` (VIRTIO_CONSOLE_F_EMERG_WRITE).
const F_EMERG_WRITE: u64 = 1 << 2;
/// Configuration space: cols, rows, max_nr_ports, emerg_wr.
const CONFIG_LEN: usize = 12;
/// Offset of `emerg_wr`.
const EMERG_WR: u64 = 8;

/// Default entries per queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 64;

/// How to build a virtio-console device.
#[derive(Debug, Clone)]
pub struct ConsoleParams {
    /// Where the console goes.
    pub backend: ConsoleBackend,
    /// Entries per queue (a power of two, 2 to 32768).
    pub queue_size: u16,
}

impl ConsoleParams {
    /// A console on `backend`.
    pub fn new(backend: ConsoleBackend) -> Self {
        ConsoleParams {
            backend,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// Errors building a virtio-console device.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The backend could not be opened (the message names the path).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Bad queue size.
    #[error("queue size {0}: expected a power of two from 2 to 32768")]
    QueueSize(u16),
}

/// The device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Receive queue progress, if it was active.
    pub rx: Option<QueueProgress>,
    /// Transmit queue progress, if it was active.
    pub tx: Option<QueueProgress>,
    /// The driver broke the protocol and the device waits for a reset.
    pub broken: bool,
}

enum State {
    Idle,
    Running {
        worker: Worker<ConsoleQueues>,
        shared: Arc<Shared>,
    },
    Paused {
        queues: ConsoleQueues,
        shared: Arc<Shared>,
    },
}

/// A virtio-console device.
pub struct Console {
    backend: Arc<Mutex<Backend>>,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    acked_features: u64,
    state: State,
    restored: Option<ConsoleState>,
}

impl Console {
    /// Opens the backend (creates the file, or listens on the socket) and builds the device.
    pub fn new(params: ConsoleParams) -> Result<Self, ConsoleError> {
        let backend = Backend::open(&params.backend)?;
        Self::with_backend(backend, params.queue_size)
    }

    fn with_backend(backend: Backend, queue_size: u16) -> Result<Self, ConsoleError> {
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(ConsoleError::QueueSize(queue_size));
        }
        let mut config = [0u8; CONFIG_LEN];
        // cols and rows unknown (0); one port.
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        Ok(Console {
            backend: Arc::new(Mutex::new(backend)),
            config,
            queue_sizes: [queue_size; 2],
            acked_features: 0,
            state: State::Idle,
            restored: None,
        })
    }

    fn bad(reason: impl Into<String>) -> VirtioError {
        VirtioError::BadActivation {
            device: NAME,
            reason: reason.into(),
        }
    }

    fn spawn(q: ConsoleQueues, shared: &Arc<Shared>) -> Result<Worker<ConsoleQueues>, VirtioError> {
        let s = shared.clone();
        Worker::spawn(NAME, "console".into(), move |stop| worker::run(q, s, stop))
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        ids::CONSOLE
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | F_EMERG_WRITE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr: the low byte of a write to it is one character of output.
        if offset == EMERG_WR && !data.is_empty() {
            let mut b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = b.write(&data[..1]) {
                kiln_devices::warn_ratelimited!("virtio-console: emergency write: {e}");
            }
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        if !matches!(self.state, State::Idle) {
            return Err(Self::bad("already active"));
        }
        let restored = self.restored.take();
        let event_idx = a.features & features::RING_EVENT_IDX != 0;
        let mut q = ConsoleQueues {
            rx: None,
            tx: None,
            broken: restored.as_ref().is_some_and(|r| r.broken),
        };
        for aq in a.queues {
            let mut queue = aq.queue;
            let max = self
                .queue_sizes
                .get(usize::from(aq.index))
                .copied()
                .ok_or_else(|| Self::bad(format!("queue {} does not exist", aq.index)))?;
            if queue.size() == 0 || queue.size() > max {
                return Err(Self::bad(format!(
                    "queue {} size {}",
                    aq.index,
                    queue.size()
                )));
            }
            queue.set_event_idx(event_idx);
            let saved = restored
                .as_ref()
                .and_then(|r| if aq.index == 0 { r.rx } else { r.tx });
            if let Some(p) = saved {
                p.apply(&mut queue);
            }
            let cq = ConsoleQueue {
                index: aq.index,
                queue,
                notify: aq.notify,
            };
            if aq.index == 0 {
                q.rx = Some(cq);
            } else {
                q.tx = Some(cq);
            }
        }
        let shared = Arc::new(Shared {
            mem: a.mem,
            interrupt: a.interrupt,
            backend: self.backend.clone(),
        });
        let worker = Self::spawn(q, &shared)?;
        self.acked_features = a.features;
        self.state = State::Running { worker, shared };
        Ok(())
    }

    fn reset(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.acked_features = 0;
        if let State::Running { worker, .. } = state {
            worker.stop(NAME)?;
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.state = match state {
            State::Running { worker, shared } => State::Paused {
                queues: stop_all(vec![worker], NAME)?
                    .pop()
                    .ok_or_else(|| Self::bad("worker handed nothing back"))?,
                shared,
            },
            other => other,
        };
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.state = match state {
            State::Paused { queues, shared } => State::Running {
                worker: Self::spawn(queues, &shared)?,
                shared,
            },
            other => other,
        };
        Ok(())
    }

    fn save_state(&self) -> Result<serde_json::Value, VirtioError> {
        let state = match &self.state {
            State::Running { .. } => {
                return Err(state_error(NAME, "save_state needs the device paused"))
            }
            State::Paused { queues, .. } => ConsoleState {
                acked_features: self.acked_features,
                rx: queues.rx.as_ref().map(|q| QueueProgress::of(&q.queue)),
                tx: queues.tx.as_ref().map(|q| QueueProgress::of(&q.queue)),
                broken: queues.broken,
            },
            State::Idle => self.restored.clone().unwrap_or(ConsoleState {
                acked_features: self.acked_features,
                rx: None,
                tx: None,
                broken: false,
            }),
        };
        state_to_json(NAME, &state)
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), VirtioError> {
        let err = |reason: String| state_error(NAME, reason);
        if !matches!(self.state, State::Idle) {
            return Err(err("restore_state needs an inactive device".into()));
        }
        let s: ConsoleState = state_from_json(NAME, state)?;
        self.acked_features = s.acked_features;
        self.restored = Some(s);
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // Stop the thread before the backend closes; errors have nowhere to go.
        let _ = self.reset();
    }
}
