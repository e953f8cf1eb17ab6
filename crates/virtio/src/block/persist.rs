//! virtio-blk state for snapshots and migration.

use serde::{Deserialize, Serialize};

use super::config::BlockConfig;
use crate::common::QueueProgress;

/// One queue's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockQueueState {
    /// Queue index.
    pub index: u16,
    /// Ring positions.
    pub progress: QueueProgress,
    /// The driver broke the protocol and the device waits for a reset.
    pub broken: bool,
}

/// The device's own state (the transport saves features, status and queue addresses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// Configuration space as the guest saw it.
    pub config: BlockConfig,
    /// Serial number.
    pub serial: String,
    /// Whether the disk was read-only.
    pub read_only: bool,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Queues that were active.
    pub queues: Vec<BlockQueueState>,
}

impl BlockState {
    /// Whether a device configured as `config` can take this state: the guest must see the
    /// same disk.
    pub(crate) fn check_compatible(
        &self,
        config: &BlockConfig,
        read_only: bool,
    ) -> Result<(), String> {
        if self.config.capacity != config.capacity {
            return Err(format!(
                "disk has {} sectors, the saved state {}",
                config.capacity, self.config.capacity
            ));
        }
        if self.read_only != read_only {
            return Err(format!(
                "disk is {}, the saved state was {}",
                ro_word(read_only),
                ro_word(self.read_only)
            ));
        }
        if self.config.num_queues != config.num_queues || self.config.blk_size != config.blk_size {
            return Err("queue count or block size differs from the saved state".into());
        }
        Ok(())
    }
}

fn ro_word(ro: bool) -> &'static str {
    if ro {
        "read-only"
    } else {
        "writable"
    }
}
