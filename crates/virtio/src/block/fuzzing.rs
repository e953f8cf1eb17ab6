//! The virtio-blk request path as a fuzzing entry point: one synchronous pass of a queue's
//! I/O thread over guest memory, a queue layout and requests that the fuzzer chooses. The
//! same code serves a real guest; only the thread is the caller's and the pass ends once
//! every request it started has finished.
//!
//! Used by `fuzz/fuzz_targets/virtio_blk_queue.rs` and by a unit test that runs it on
//! pseudo-random inputs.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{self, BlockQueue, Shared, MAX_ZERO_SEGMENTS};
use super::Block;
use crate::common::fuzzing::{guest_image, packed_layout, queue, Recorder};
use crate::common::worker::StopSignal;
use kiln_disk::aio::AsyncIo;

/// Bytes of input before the guest memory image.
pub const HEADER_LEN: usize = 8;
/// Guest memory the pass runs on.
pub const MEMORY_LEN: usize = 64 << 10;

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The queue layout was accepted (as a transport would accept it).
    pub ran: bool,
    /// The available ring's index when the pass started. Not a bound on what the device
    /// may take: request data may overlap the ring and make more chains available.
    pub offered: u16,
    /// Chains the device took from the available ring.
    pub taken: u16,
    /// Requests the device completed into the used ring.
    pub completed: u64,
    /// The device asked for a reset.
    pub needs_reset: bool,
}

/// A virtio-blk device and the disk engine its passes share (an idle engine between passes:
/// setting up an io_uring per input would cost more than the pass).
pub struct Fuzzer {
    dev: Block,
    engine: Option<Box<dyn AsyncIo>>,
}

impl Fuzzer {
    /// Fuzzes `dev`'s request path.
    pub fn new(dev: Block) -> Self {
        Fuzzer { dev, engine: None }
    }

    /// Runs one pass of queue 0 over `input`, read as:
    ///
    /// - byte 0: log2 of the queue size (mod 9: 1 to 256 entries);
    /// - byte 1: bit 0 negotiates EVENT_IDX; bit 1 takes the ring addresses from bytes 2-7
    ///   (three little-endian u16 counts of 16-byte units) instead of packing the rings at
    ///   the start of memory;
    /// - the rest: guest memory from address 0 ([`MEMORY_LEN`] bytes, zero past the input).
    ///
    /// Every guest-supplied address, length and index goes through the device's checks; a
    /// layout a transport would refuse is not run.
    pub fn pass(&mut self, input: &[u8]) -> Outcome {
        let mut out = Outcome {
            ran: false,
            offered: 0,
            taken: 0,
            completed: 0,
            needs_reset: false,
        };
        let Some(header) = input.get(..HEADER_LEN) else {
            return out;
        };
        let size = 1u16 << (header[0] % 9);
        let event_idx = header[1] & 1 != 0;
        let (desc, avail, used) = if header[1] & 2 != 0 {
            let at = |i: usize| u64::from(u16::from_le_bytes([header[i], header[i + 1]])) * 16;
            (at(2), at(4), at(6))
        } else {
            packed_layout(0, size)
        };
        let Some(mem) = guest_image(&input[HEADER_LEN..], MEMORY_LEN) else {
            return out;
        };
        let Some(queue) = queue(size, desc, avail, used, event_idx, &mem) else {
            return out;
        };
        out.offered = queue.avail_idx(&mem, Ordering::Acquire).map_or(0, |w| w.0);
        let engine = match self.engine.take() {
            Some(e) => Ok(e),
            // Room for the largest queue this input format makes.
            None => self.dev.disk.engine(256 + MAX_ZERO_SEGMENTS as usize),
        };
        let (Ok(engine), Ok(notify), Ok(stop)) = (
            engine,
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
            StopSignal::raised(),
        ) else {
            return out;
        };
        let recorder = Arc::new(Recorder::default());
        let before = self.dev.stats.requests.load(Ordering::Relaxed);
        let shared = Arc::new(Shared {
            mem,
            interrupt: recorder.clone(),
            limits: self.dev.limits.clone(),
            poll: std::time::Duration::ZERO,
            yields: false,
            stats: self.dev.stats.clone(),
            path: self.dev.disk.path().display().to_string(),
        });
        let q = BlockQueue {
            index: 0,
            queue,
            notify,
            engine,
            broken: false,
        };
        // A raised stop signal: the worker serves what is available once, waits for what it
        // started, and returns.
        let q = worker::run(q, shared, &stop);
        out.ran = true;
        out.completed = self.dev.stats.requests.load(Ordering::Relaxed) - before;
        out.taken = q.queue.next_avail();
        out.needs_reset = q.broken || recorder.reset_requested();
        self.engine = Some(q.engine);
        out
    }
}
