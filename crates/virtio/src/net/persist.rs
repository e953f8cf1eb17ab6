//! virtio-net state for snapshots and migration.

use serde::{Deserialize, Serialize};

use crate::common::QueueProgress;

/// One queue's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetQueueState {
    /// Queue index (2k: receive of pair k, 2k+1: transmit, last: control).
    pub index: u16,
    /// Ring positions.
    pub progress: QueueProgress,
}

/// The device's own state (the transport saves features, status and queue addresses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Features the driver accepted (they set the tap's offloads on restore).
    pub acked_features: u64,
    /// Queue pairs the driver switched on with the control queue.
    pub active_pairs: u16,
    /// Queues that were active.
    pub queues: Vec<NetQueueState>,
    /// Pairs waiting for a reset after a protocol error.
    pub broken_pairs: Vec<u16>,
}
