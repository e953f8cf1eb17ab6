//! virtio-blk: a disk image (raw file, host block device or qcow2) as a virtio block device.
//!
//! [`Block::new`] opens and locks the image ([`kiln_disk::aio::DiskImage`]); activation starts
//! one I/O thread per queue, each with its own engine (io_uring for raw images, a thread pool
//! for qcow2), see [`worker`]. Requests: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES.

mod config;
pub mod fuzzing;
mod persist;
mod request;
mod worker;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_devices::virtio::{features, ids, Activation, VirtioDevice, VirtioError};
use kiln_disk::aio::{AioError, AioOptions, DiskImage, EngineKind};
use kiln_disk::ImageFormat;
use virtio_queue::QueueT;

pub use config::BlockConfig;
pub use persist::{BlockQueueState, BlockState};
pub use request::Malformed;
pub use worker::BlockStats;

use crate::common::read_config_space;
use crate::common::worker::{stop_all, Worker};
use crate::common::{state_error, state_from_json, state_to_json, QueueProgress};
use config::{
    CONFIG_LEN, F_BLK_SIZE, F_DISCARD, F_FLUSH, F_MQ, F_RO, F_SEG_MAX, F_SIZE_MAX, F_TOPOLOGY,
    F_WRITE_ZEROES,
};
use request::{DiskLimits, ID_BYTES, SECTOR};
use worker::{BlockQueue, Shared, MAX_ZERO_SEGMENTS};

const NAME: &str = "virtio-blk";

/// Most request queues.
pub const MAX_QUEUES: u16 = 16;
/// Default entries per queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Default busy-poll budget of an O_DIRECT disk, in microseconds: the most each queue's
/// window may grow to (it adapts, see the worker's `PollWindow`). Disks in the page cache
/// do not poll unless asked: their requests finish at once or on kernel worker threads,
/// which need the CPU time a polling thread would take.
pub const DEFAULT_POLL_US: u32 = 200;
/// Largest segment the driver may use (SIZE_MAX).
const SIZE_MAX: u32 = 1 << 20;
/// Largest discard or write-zeroes segment, in sectors.
const MAX_ZERO_SECTORS: u32 = 0x3fff_ffff;

/// How to build a virtio-blk device.
#[derive(Debug, Clone)]
pub struct BlockParams {
    /// Image file or host block device.
    pub path: PathBuf,
    /// The guest may not write (shared lock; RO feature).
    pub readonly: bool,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    pub serial: Option<String>,
    /// Bypass the host page cache (O_DIRECT; raw images only).
    pub direct: bool,
    /// Number of request queues (1 to [`MAX_QUEUES`]), each with its own I/O thread.
    pub queues: u16,
    /// Image format; probed from the file when `None`.
    pub format: Option<ImageFormat>,
    /// Which engine runs the I/O.
    pub engine: EngineKind,
    /// Entries per queue (a power of two, 2 to 32768).
    pub queue_size: u16,
    /// Most a queue busy-polls after its last work while requests are at the disk, in
    /// microseconds (0: never poll; the window adapts below it); `None`: [`DEFAULT_POLL_US`]
    /// with `direct`, else 0.
    pub poll_us: Option<u32>,
}

impl BlockParams {
    /// Defaults for the image at `path`: writable, one queue, engine chosen by format.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockParams {
            path: path.into(),
            readonly: false,
            serial: None,
            direct: false,
            queues: 1,
            format: None,
            engine: EngineKind::Auto,
            queue_size: DEFAULT_QUEUE_SIZE,
            poll_us: None,
        }
    }
}

/// Errors building a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened, locked or probed (the message names the file).
    #[error(transparent)]
    Disk(#[from] AioError),
    /// The serial is longer than the protocol allows.
    #[error("serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
    /// Bad queue count.
    #[error("queues={0}: expected 1 to {MAX_QUEUES}")]
    Queues(u16),
    /// Bad queue size.
    #[error("queue size {0}: expected a power of two from 2 to 32768")]
    QueueSize(u16),
    /// The image is smaller than one sector.
    #[error("disk image {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
}

enum State {
    /// Not activated (or reset).
    Idle,
    /// Threads serve the queues.
    Running {
        workers: Vec<Worker<BlockQueue>>,
        shared: Arc<Shared>,
    },
    /// Threads stopped, queues kept.
    Paused {
        queues: Vec<BlockQueue>,
        shared: Arc<Shared>,
    },
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<DiskImage>,
    config: BlockConfig,
    config_bytes: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    limits: DiskLimits,
    serial: String,
    poll: Duration,
    state: State,
    /// Queue progress from [`VirtioDevice::restore_state`], applied at the next activation.
    restored: Option<Vec<BlockQueueState>>,
    stats: Arc<BlockStats>,
}

impl Block {
    /// Opens the image and builds the device. Fails with a clear error for a missing file,
    /// an image locked by another process, an unknown format, a bad serial or queue count.
    pub fn new(params: BlockParams) -> Result<Self, BlockError> {
        let serial = params.serial.clone().unwrap_or_default();
        if serial.len() > ID_BYTES {
            return Err(BlockError::SerialTooLong(serial));
        }
        if params.queues == 0 || params.queues > MAX_QUEUES {
            return Err(BlockError::Queues(params.queues));
        }
        let default_poll = if params.direct { DEFAULT_POLL_US } else { 0 };
        let poll_us = params.poll_us.unwrap_or(default_poll);
        if !params.queue_size.is_power_of_two()
            || params.queue_size < 2
            || params.queue_size > 32768
        {
            return Err(BlockError::QueueSize(params.queue_size));
        }
        let disk = DiskImage::open(
            &params.path,
            &AioOptions {
                read_only: params.readonly,
                direct: params.direct,
                format: params.format,
                engine: params.engine,
                key: None,
            },
        )?;
        if poll_us > 0 && !disk.completes_in_kernel() {
            log::debug!(
                "{}: requests run on worker threads (the file system refuses non-blocking I/O, \
                 or io_uring is not used): polling queue threads yield to them",
                params.path.display()
            );
        }
        let capacity = disk.size() / SECTOR;
        if capacity == 0 {
            return Err(BlockError::TooSmall(params.path));
        }
        let logical = disk.logical_block_size().max(512);
        let physical = disk.physical_block_size().max(logical);
        let ro = params.readonly;
        let config = BlockConfig {
            capacity,
            size_max: SIZE_MAX,
            seg_max: u32::from(params.queue_size).saturating_sub(2).max(1),
            blk_size: logical,
            physical_block_exp: u8::try_from((physical / logical).trailing_zeros()).unwrap_or(0),
            num_queues: params.queues,
            max_discard_sectors: MAX_ZERO_SECTORS,
            max_discard_seg: 1,
            discard_sector_alignment: (physical / 512).max(1),
            max_write_zeroes_sectors: MAX_ZERO_SECTORS,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: true,
        };
        let mut avail_features = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_TOPOLOGY
            | F_FLUSH;
        if params.queues > 1 {
            avail_features |= F_MQ;
        }
        avail_features |= if ro { F_RO } else { F_DISCARD | F_WRITE_ZEROES };
        let mut id = [0u8; ID_BYTES];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        Ok(Block {
            config_bytes: config.bytes(),
            config,
            avail_features,
            acked_features: 0,
            queue_sizes: vec![params.queue_size; usize::from(params.queues)],
            limits: DiskLimits {
                capacity,
                read_only: ro,
                max_segments: MAX_ZERO_SEGMENTS,
                max_zero_sectors: MAX_ZERO_SECTORS,
                serial: id,
            },
            serial,
            poll: Duration::from_micros(u64::from(poll_us)),
            state: State::Idle,
            restored: None,
            stats: Arc::new(BlockStats::default()),
            disk: Arc::new(disk),
        })
    }

    /// The configuration space contents.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The opened image.
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// Request counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    fn spawn(
        queues: Vec<BlockQueue>,
        shared: &Arc<Shared>,
    ) -> Result<Vec<Worker<BlockQueue>>, VirtioError> {
        let mut workers = Vec::with_capacity(queues.len());
        for q in queues {
            let s = shared.clone();
            let name = format!("blk-q{}", q.index);
            match Worker::spawn(NAME, name, move |stop| worker::run(q, s, stop)) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    // Stop what started; their queues are dropped with them.
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
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        ids::BLOCK
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
        read_config_space(&self.config_bytes, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field kiln serves is read-only (no CONFIG_WCE).
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        if !matches!(self.state, State::Idle) {
            return Err(Self::bad("already active"));
        }
        if a.queues.is_empty() {
            return Err(Self::bad("no queue enabled"));
        }
        let event_idx = a.features & features::RING_EVENT_IDX != 0;
        let restored = self.restored.take();
        let mut queues = Vec::with_capacity(a.queues.len());
        for aq in a.queues {
            let Some(&max) = self.queue_sizes.get(usize::from(aq.index)) else {
                return Err(Self::bad(format!("queue {} does not exist", aq.index)));
            };
            let mut queue = aq.queue;
            if queue.size() > max || queue.size() == 0 {
                return Err(Self::bad(format!(
                    "queue {} size {} (max {max})",
                    aq.index,
                    queue.size()
                )));
            }
            queue.set_event_idx(event_idx);
            let saved = restored
                .as_ref()
                .and_then(|r| r.iter().find(|s| s.index == aq.index));
            if let Some(s) = saved {
                s.progress.apply(&mut queue);
            }
            let depth = usize::from(queue.size()) + MAX_ZERO_SEGMENTS as usize;
            let engine = self.disk.engine(depth).map_err(|e| VirtioError::Worker {
                device: NAME,
                reason: format!("{}: {e}", self.disk.path().display()),
            })?;
            queues.push(BlockQueue {
                index: aq.index,
                queue,
                notify: aq.notify,
                engine,
                broken: saved.is_some_and(|s| s.broken),
            });
        }
        let shared = Arc::new(Shared {
            mem: a.mem,
            interrupt: a.interrupt,
            limits: self.limits.clone(),
            poll: self.poll,
            yields: !self.disk.completes_in_kernel(),
            stats: self.stats.clone(),
            path: self.disk.path().display().to_string(),
        });
        let workers = Self::spawn(queues, &shared)?;
        self.acked_features = a.features;
        self.state = State::Running { workers, shared };
        Ok(())
    }

    fn reset(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.acked_features = 0;
        if let State::Running { workers, .. } = state {
            stop_all(workers, NAME)?;
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.state = match state {
            State::Running { workers, shared } => {
                let queues = stop_all(workers, NAME)?;
                State::Paused { queues, shared }
            }
            other => other,
        };
        self.disk.flush().map_err(|e| VirtioError::Worker {
            device: NAME,
            reason: format!("flush on pause: {e}"),
        })
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        self.state = match state {
            State::Paused { queues, shared } => {
                let workers = Self::spawn(queues, &shared)?;
                State::Running { workers, shared }
            }
            other => other,
        };
        Ok(())
    }

    fn save_state(&self) -> Result<serde_json::Value, VirtioError> {
        let queues = match &self.state {
            State::Running { .. } => {
                return Err(state_error(NAME, "save_state needs the device paused"))
            }
            State::Paused { queues, .. } => queues
                .iter()
                .map(|q| BlockQueueState {
                    index: q.index,
                    progress: QueueProgress::of(&q.queue),
                    broken: q.broken,
                })
                .collect(),
            State::Idle => self.restored.clone().unwrap_or_default(),
        };
        let state = BlockState {
            config: self.config.clone(),
            serial: self.serial.clone(),
            read_only: self.limits.read_only,
            acked_features: self.acked_features,
            queues,
        };
        state_to_json(NAME, &state)
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), VirtioError> {
        let err = |reason: String| state_error(NAME, reason);
        if !matches!(self.state, State::Idle) {
            return Err(err("restore_state needs an inactive device".into()));
        }
        let s: BlockState = state_from_json(NAME, state)?;
        s.check_compatible(&self.config, self.limits.read_only)
            .map_err(err)?;
        self.acked_features = s.acked_features;
        self.restored = Some(s.queues);
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // Stop the threads before the image closes; errors have nowhere to go.
        let _ = self.reset();
    }
}
