//! virtio-net on a host tap, in userspace (no vhost-net).
//!
//! [`Net::new`] opens (or creates) the tap with one queue per pair; activation sets the tap's
//! offloads from what the driver accepted and starts one thread per queue pair (see
//! [`worker`]). The control queue (with MQ) switches the number of active pairs by attaching
//! and detaching tap queues.

mod batch;
mod config;
pub mod fuzzing;
mod persist;
pub mod tap;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use kiln_devices::virtio::{features, ids, Activation, VirtioDevice, VirtioError};
use virtio_queue::QueueT;

pub use persist::{NetQueueState, NetState};
pub use tap::{Tap, TapError};
pub use worker::NetStats;

use crate::common::worker::{stop_all, Worker};
use crate::common::{
    read_config_space, state_error, state_from_json, state_to_json, QueueProgress,
};
use config::{
    config_bytes, guest_takes_big_frames, tap_offloads, CONFIG_LEN, F_CSUM, F_CTRL_VQ,
    F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_ECN, F_HOST_TSO4, F_HOST_TSO6,
    F_MAC, F_MQ, F_MRG_RXBUF, F_STATUS,
};
use worker::{set_active_pairs, NetPair, NetQueue, Shared};

const NAME: &str = "virtio-net";

/// Most queue pairs.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Default entries per queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// How to build a virtio-net device.
#[derive(Debug, Clone)]
pub struct NetParams {
    /// Host tap interface; created (and removed again when kiln exits) if it does not exist.
    pub tap: String,
    /// Guest MAC address; a random locally administered one when `None`.
    pub mac: Option<[u8; 6]>,
    /// Queue pairs (1 to [`MAX_QUEUE_PAIRS`]); more than one needs a multi-queue tap.
    pub queues: u16,
    /// Entries per queue (a power of two, 2 to 32768).
    pub queue_size: u16,
}

impl NetParams {
    /// One queue pair on tap `tap`, random MAC.
    pub fn new(tap: impl Into<String>) -> Self {
        NetParams {
            tap: tap.into(),
            mac: None,
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// Errors building a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened (the message names the tap and the fix).
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Bad queue pair count.
    #[error("queues={0}: expected 1 to {MAX_QUEUE_PAIRS}")]
    Queues(u16),
    /// Bad queue size.
    #[error("queue size {0}: expected a power of two from 2 to 32768")]
    QueueSize(u16),
    /// A multicast MAC cannot be a station address.
    #[error("MAC address {0} is a multicast address")]
    MulticastMac(String),
    /// No random MAC could be made.
    #[error("cannot make a random MAC address")]
    Random(#[source] std::io::Error),
}

enum State {
    Idle,
    Running {
        workers: Vec<Worker<NetPair>>,
        shared: Arc<Shared>,
    },
    Paused {
        pairs: Vec<NetPair>,
        shared: Arc<Shared>,
    },
}

/// A virtio-net device.
pub struct Net {
    taps: Vec<Arc<Tap>>,
    mac: [u8; 6],
    config: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    active_pairs: Arc<AtomicU16>,
    state: State,
    restored: Option<NetState>,
    stats: Arc<NetStats>,
}

impl Net {
    /// Opens the tap (creating it if needed) and builds the device.
    pub fn new(params: NetParams) -> Result<Self, NetError> {
        if params.queues == 0 || params.queues > MAX_QUEUE_PAIRS {
            return Err(NetError::Queues(params.queues));
        }
        if !params.queue_size.is_power_of_two()
            || params.queue_size < 2
            || params.queue_size > 32768
        {
            return Err(NetError::QueueSize(params.queue_size));
        }
        let mac = match params.mac {
            Some(m) if m[0] & 1 != 0 => return Err(NetError::MulticastMac(mac_string(m))),
            Some(m) => m,
            None => random_mac().map_err(NetError::Random)?,
        };
        let taps = Tap::open_queues(&params.tap, params.queues)?
            .into_iter()
            .map(Arc::new)
            .collect::<Vec<_>>();
        let mut avail = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_MRG_RXBUF
            | F_MAC
            | F_STATUS;
        let mut queue_count = 2 * usize::from(params.queues);
        if params.queues > 1 {
            avail |= F_CTRL_VQ | F_MQ;
            queue_count += 1;
        }
        Ok(Net {
            taps,
            mac,
            config: config_bytes(mac, params.queues),
            avail_features: avail,
            acked_features: 0,
            queue_sizes: vec![params.queue_size; queue_count],
            active_pairs: Arc::new(AtomicU16::new(1)),
            state: State::Idle,
            restored: None,
            stats: Arc::new(NetStats::default()),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.taps[0].name()
    }

    /// Frame counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    fn pairs(&self) -> u16 {
        u16::try_from(self.taps.len()).unwrap_or(u16::MAX)
    }

    fn spawn(
        pairs: Vec<NetPair>,
        shared: &Arc<Shared>,
    ) -> Result<Vec<Worker<NetPair>>, VirtioError> {
        let mut workers = Vec::with_capacity(pairs.len());
        for p in pairs {
            let s = shared.clone();
            let name = format!("net-q{}", p.pair);
            match Worker::spawn(NAME, name, move |stop| worker::run(p, s, stop)) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    let _ = stop_all(workers, NAME);
                    return Err(e);
                }
            }
        }
        Ok(workers)
    }

    fn bad(reason: impl Into<String>) -> VirtioError {
        VirtioError::BadActivation {
            device: NAME,
            reason: reason.into(),
        }
    }

    fn tap_error(e: TapError) -> VirtioError {
        VirtioError::Worker {
            device: NAME,
            reason: e.to_string(),
        }
    }
}

fn mac_string(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A random unicast, locally administered MAC.
fn random_mac() -> std::io::Result<[u8; 6]> {
    let mut m = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into the array, which lives across the call.
    let n = unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), 0) };
    if usize::try_from(n).ok() != Some(m.len()) {
        return Err(std::io::Error::last_os_error());
    }
    m[0] = (m[0] & 0xfe) | 0x02;
    Ok(m)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        ids::NET
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only in virtio 1.x (no CTRL_MAC_ADDR); nothing else is writable.
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        if !matches!(self.state, State::Idle) {
            return Err(Self::bad("already active"));
        }
        let f = a.features;
        let mq = f & F_MQ != 0;
        let ctrl_index = if mq { 2 * self.pairs() } else { 2 };
        let restored = self.restored.take();
        let event_idx = f & features::RING_EVENT_IDX != 0;
        let mut pairs: Vec<NetPair> = (0..self.pairs())
            .map(|pair| NetPair {
                pair,
                rx: None,
                tx: None,
                ctrl: None,
                broken: restored
                    .as_ref()
                    .is_some_and(|r| r.broken_pairs.contains(&pair)),
            })
            .collect();
        for aq in a.queues {
            let idx = aq.index;
            let max = self
                .queue_sizes
                .get(usize::from(idx))
                .copied()
                .ok_or_else(|| Self::bad(format!("queue {idx} does not exist")))?;
            let mut queue = aq.queue;
            if queue.size() == 0 || queue.size() > max {
                return Err(Self::bad(format!("queue {idx} size {}", queue.size())));
            }
            queue.set_event_idx(event_idx);
            if let Some(s) = restored
                .as_ref()
                .and_then(|r| r.queues.iter().find(|q| q.index == idx))
            {
                s.progress.apply(&mut queue);
            }
            let nq = NetQueue {
                index: idx,
                queue,
                notify: aq.notify,
            };
            if f & F_CTRL_VQ != 0 && idx == ctrl_index {
                pairs[0].ctrl = Some(nq);
            } else if let Some(p) = pairs.get_mut(usize::from(idx / 2)) {
                if idx % 2 == 0 {
                    p.rx = Some(nq);
                } else {
                    p.tx = Some(nq);
                }
            } else {
                return Err(Self::bad(format!(
                    "queue {idx} is not used with these features"
                )));
            }
        }
        pairs.retain(|p| p.rx.is_some() || p.tx.is_some() || p.ctrl.is_some());
        let offloads = tap_offloads(f);
        for t in &self.taps {
            t.set_offload(offloads).map_err(Self::tap_error)?;
        }
        let active = restored
            .as_ref()
            .map_or(1, |r| r.active_pairs)
            .clamp(1, self.pairs());
        let active = if mq { active } else { 1 };
        if self.taps.len() > 1 {
            set_active_pairs(&self.taps, active);
        }
        self.active_pairs.store(active, Ordering::Release);
        let shared = Arc::new(Shared {
            mem: a.mem,
            interrupt: a.interrupt,
            taps: self.taps.clone(),
            mrg_rxbuf: f & F_MRG_RXBUF != 0,
            big_frames: guest_takes_big_frames(f),
            mq,
            active_pairs: self.active_pairs.clone(),
            stats: self.stats.clone(),
        });
        let workers = Self::spawn(pairs, &shared)?;
        self.acked_features = f;
        self.state = State::Running { workers, shared };
        Ok(())
    }

    fn reset(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.acked_features = 0;
        if let State::Running { workers, .. } = state {
            stop_all(workers, NAME)?;
        }
        for t in &self.taps {
            t.set_offload(0).map_err(Self::tap_error)?;
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.state = match state {
            State::Running { workers, shared } => State::Paused {
                pairs: stop_all(workers, NAME)?,
                shared,
            },
            other => other,
        };
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.state = match state {
            State::Paused { pairs, shared } => State::Running {
                workers: Self::spawn(pairs, &shared)?,
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
            State::Paused { pairs, .. } => NetState {
                mac: self.mac,
                acked_features: self.acked_features,
                active_pairs: self.active_pairs.load(Ordering::Acquire),
                queues: pairs
                    .iter()
                    .flat_map(|p| [&p.rx, &p.tx, &p.ctrl])
                    .flatten()
                    .map(|q| NetQueueState {
                        index: q.index,
                        progress: QueueProgress::of(&q.queue),
                    })
                    .collect(),
                broken_pairs: pairs.iter().filter(|p| p.broken).map(|p| p.pair).collect(),
            },
            State::Idle => self.restored.clone().unwrap_or(NetState {
                mac: self.mac,
                acked_features: self.acked_features,
                active_pairs: 1,
                queues: Vec::new(),
                broken_pairs: Vec::new(),
            }),
        };
        state_to_json(NAME, &state)
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), VirtioError> {
        let err = |reason: String| state_error(NAME, reason);
        if !matches!(self.state, State::Idle) {
            return Err(err("restore_state needs an inactive device".into()));
        }
        let s: NetState = state_from_json(NAME, state)?;
        if s.mac != self.mac {
            return Err(err(format!(
                "the saved MAC {} differs from this device's {}",
                mac_string(s.mac),
                mac_string(self.mac)
            )));
        }
        if s.active_pairs > self.pairs() {
            return Err(err(format!(
                "the saved state uses {} queue pairs, this device has {}",
                s.active_pairs,
                self.pairs()
            )));
        }
        self.acked_features = s.acked_features;
        self.restored = Some(s);
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Stop the threads before the tap closes; errors have nowhere to go.
        let _ = self.reset();
    }
}
