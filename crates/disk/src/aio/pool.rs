//! Runs any [`BlockDevice`] (qcow2, or raw where io_uring is unavailable) behind the
//! [`AsyncIo`] interface: on a few worker threads, or synchronously inside
//! [`AsyncIo::submit`] when built with no threads.
//!
//! Data goes through a per-thread aligned bounce buffer: the formats take byte slices, and a
//! slice over guest memory that the guest may change concurrently would not be sound.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::align::{copy_from_iovecs, copy_to_iovecs, AlignedBuf};
use super::{iovecs_len, new_eventfd, AioError, AsyncIo, Completion};
use crate::{BlockDevice, DiskError};

/// Alignment of the bounce buffers: enough for O_DIRECT on any common device.
const BOUNCE_ALIGN: usize = 4096;

/// Guest buffers carried to a worker thread.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers refer to memory the caller promised (unsafe read/write contract) stays
// valid until the completion is collected; they are not tied to the queuing thread.
unsafe impl Send for Iovecs {}

enum JobKind {
    Read(u64, Iovecs),
    Write(u64, Iovecs),
    Flush,
    Discard(u64, u64),
    WriteZeroes(u64, u64, bool),
}

struct Job {
    user_data: u64,
    kind: JobKind,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    stop: bool,
}

struct Shared {
    dev: Arc<dyn BlockDevice>,
    jobs: Mutex<Jobs>,
    wake: Condvar,
    done: Mutex<VecDeque<Completion>>,
    evt: EventFd,
}

impl Shared {
    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        // A worker that panicked leaves consistent data (plain queue operations).
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn done(&self) -> MutexGuard<'_, VecDeque<Completion>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn complete(&self, c: Completion) {
        self.done().push_back(c);
        // A failed eventfd write only delays the wake-up until the next poll.
        let _ = self.evt.write(1);
    }
}

/// A [`BlockDevice`] on worker threads (or none: synchronous).
pub struct PoolEngine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    pending: Vec<Job>,
    depth: usize,
    in_flight: usize,
    /// Bounce buffer of the synchronous mode.
    bounce: Option<AlignedBuf>,
}

impl PoolEngine {
    /// An engine running `dev` on `threads` threads (0: synchronously in `submit`), with room
    /// for `depth` requests in flight.
    pub fn new(dev: Arc<dyn BlockDevice>, threads: usize, depth: usize) -> Result<Self, AioError> {
        let shared = Arc::new(Shared {
            dev,
            jobs: Mutex::new(Jobs::default()),
            wake: Condvar::new(),
            done: Mutex::new(VecDeque::new()),
            evt: new_eventfd()?,
        });
        let mut engine = PoolEngine {
            shared,
            threads: Vec::with_capacity(threads),
            pending: Vec::new(),
            depth: depth.max(1),
            in_flight: 0,
            bounce: None,
        };
        for i in 0..threads {
            let shared = engine.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("disk-pool-{i}"))
                .spawn(move || worker(&shared))
                .map_err(|source| AioError::Setup {
                    what: "disk worker thread",
                    source,
                })?;
            engine.threads.push(handle);
        }
        Ok(engine)
    }

    fn queue(&mut self, user_data: u64, kind: JobKind) -> Result<(), AioError> {
        if self.in_flight >= self.depth {
            return Err(AioError::QueueFull(self.depth));
        }
        self.in_flight += 1;
        self.pending.push(Job { user_data, kind });
        Ok(())
    }

    fn queue_rw(
        &mut self,
        write: bool,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), AioError> {
        if iovecs.len() > usize::try_from(libc::UIO_MAXIOV).unwrap_or(1024) {
            return Err(AioError::TooManySegments(iovecs.len()));
        }
        let v = Iovecs(iovecs.to_vec());
        let kind = if write {
            JobKind::Write(offset, v)
        } else {
            JobKind::Read(offset, v)
        };
        self.queue(user_data, kind)
    }
}

impl AsyncIo for PoolEngine {
    fn notifier(&self) -> RawFd {
        self.shared.evt.as_raw_fd()
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), AioError> {
        self.queue_rw(false, offset, iovecs, user_data)
    }

    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), AioError> {
        self.queue_rw(true, offset, iovecs, user_data)
    }

    fn flush(&mut self, user_data: u64) -> Result<(), AioError> {
        self.queue(user_data, JobKind::Flush)
    }

    fn discard(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), AioError> {
        self.queue(user_data, JobKind::Discard(offset, len))
    }

    fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        user_data: u64,
    ) -> Result<(), AioError> {
        self.queue(user_data, JobKind::WriteZeroes(offset, len, unmap))
    }

    fn submit(&mut self) -> Result<(), AioError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.threads.is_empty() {
            for job in std::mem::take(&mut self.pending) {
                let c = run(&*self.shared.dev, job, &mut self.bounce);
                self.shared.complete(c);
            }
            return Ok(());
        }
        let n = self.pending.len();
        let mut jobs = self.shared.jobs();
        jobs.queue.extend(self.pending.drain(..));
        drop(jobs);
        if n == 1 {
            self.shared.wake.notify_one();
        } else {
            self.shared.wake.notify_all();
        }
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        let c = self.shared.done().pop_front()?;
        self.in_flight = self.in_flight.saturating_sub(1);
        Some(c)
    }
}

impl Drop for PoolEngine {
    fn drop(&mut self) {
        self.shared.jobs().stop = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            // A panicked worker has nothing left to clean up.
            let _ = t.join();
        }
    }
}

fn worker(shared: &Shared) {
    let mut bounce = None;
    loop {
        let job = {
            let mut jobs = shared.jobs();
            loop {
                if let Some(j) = jobs.queue.pop_front() {
                    break j;
                }
                if jobs.stop {
                    return;
                }
                jobs = shared.wake.wait(jobs).unwrap_or_else(|e| e.into_inner());
            }
        };
        let c = run(&*shared.dev, job, &mut bounce);
        shared.complete(c);
    }
}

/// A bounce buffer of at least `len` bytes, reusing `slot`'s when it is big enough.
fn bounce_buf(slot: &mut Option<AlignedBuf>, len: usize) -> io::Result<&mut AlignedBuf> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = Some(
            AlignedBuf::new(len, BOUNCE_ALIGN)
                .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?,
        );
    }
    slot.as_mut()
        .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
}

fn run(dev: &dyn BlockDevice, job: Job, bounce: &mut Option<AlignedBuf>) -> Completion {
    let result = match job.kind {
        JobKind::Read(offset, v) => (|| {
            let len = iovecs_len(&v.0).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let buf = bounce_buf(bounce, len)?;
            let data = &mut buf.as_mut_slice()[..len];
            dev.read_at(offset, data).map_err(to_io)?;
            // SAFETY: the caller guarantees the iovecs stay writable until completion (read
            // contract); the bounce buffer is ours.
            unsafe { copy_to_iovecs(&v.0, data) };
            Ok(len)
        })(),
        JobKind::Write(offset, v) => (|| {
            let len = iovecs_len(&v.0).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let buf = bounce_buf(bounce, len)?;
            let data = &mut buf.as_mut_slice()[..len];
            // SAFETY: the caller guarantees the iovecs stay readable until completion (write
            // contract); the bounce buffer is ours.
            unsafe { copy_from_iovecs(&v.0, data) };
            dev.write_at(offset, data).map_err(to_io)?;
            Ok(len)
        })(),
        JobKind::Flush => dev.flush().map(|()| 0).map_err(to_io),
        JobKind::Discard(offset, len) => dev.discard(offset, len).map(|()| 0).map_err(to_io),
        JobKind::WriteZeroes(offset, len, unmap) => dev
            .write_zeroes(offset, len, unmap)
            .map(|()| 0)
            .map_err(to_io),
    };
    Completion {
        user_data: job.user_data,
        result,
    }
}

/// Maps a format error to the errno a block request reports.
fn to_io(e: DiskError) -> io::Error {
    match e {
        DiskError::Io { source, .. } => source,
        DiskError::OutOfRange { .. } => io::Error::from_raw_os_error(libc::EINVAL),
        DiskError::ReadOnly => io::Error::from_raw_os_error(libc::EROFS),
        other => io::Error::other(other.to_string()),
    }
}
