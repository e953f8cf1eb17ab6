//! Asynchronous disk I/O for virtio-blk.
//!
//! A device's I/O thread queues requests on an [`AsyncIo`] engine (vectored reads and writes
//! straight into guest buffers, flush, discard, write-zeroes), starts them with
//! [`AsyncIo::submit`], and later collects [`Completion`]s when the engine's eventfd
//! ([`AsyncIo::notifier`]) becomes readable. Engines:
//!
//! * [`UringEngine`]: io_uring on a raw file or host block device (O_DIRECT when asked).
//! * [`PoolEngine`]: any [`BlockDevice`](crate::BlockDevice) (qcow2, or raw where io_uring
//!   is unavailable) run on a few threads, or synchronously inside `submit` with no threads.
//!
//! [`DiskImage::open`] opens an image once per disk (taking an OFD lock so that a second
//! process cannot write it at the same time), picks the engine and makes one engine per
//! queue with [`DiskImage::engine`].

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

mod align;
mod image;
mod lock;
mod pool;
mod uring;

pub use align::AlignedBuf;
pub use image::{AioOptions, DiskImage, EngineKind};
pub use lock::{ImageLock, LockMode};
pub use pool::PoolEngine;
pub use uring::UringEngine;

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The value the request was queued with.
    pub user_data: u64,
    /// Bytes transferred (reads and writes), 0 for other operations; or the error.
    pub result: io::Result<usize>,
}

/// A request queue on one disk. Each virtio queue owns one engine; engines of the same
/// [`DiskImage`] share the image.
///
/// An engine serves one thread at a time: it may move to another thread only while nothing is
/// in flight (an I/O thread handing its queue back on pause, say).
///
/// Requests queued with the methods below start no later than the next [`AsyncIo::submit`]
/// and finish in any order. Every queued request yields exactly one [`Completion`], also when
/// it fails; the methods themselves fail only when the engine cannot take the request at all
/// (for instance more than [`AsyncIo::depth`] requests in flight).
pub trait AsyncIo: Send {
    /// The eventfd that becomes readable when completions are ready. Reading it is the
    /// caller's job; completions are collected with [`AsyncIo::next_completion`].
    fn notifier(&self) -> RawFd;

    /// Most requests in flight at once (queued or started, not yet collected).
    fn depth(&self) -> usize;

    /// Requests queued or started and not yet collected.
    fn in_flight(&self) -> usize;

    /// Queues a read of the disk at `offset` into `iovecs`, in order.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and writable, and that no Rust
    /// reference aliases, until the completion for `user_data` has been collected.
    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), AioError>;

    /// Queues a write of `iovecs`, in order, to the disk at `offset`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and readable until the completion
    /// for `user_data` has been collected.
    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), AioError>;

    /// Queues a flush: writes completed before it was queued become durable.
    fn flush(&mut self, user_data: u64) -> Result<(), AioError>;

    /// Queues a discard of `len` bytes at `offset` (a hole in a file, BLKDISCARD on a block
    /// device, freed clusters in qcow2).
    fn discard(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), AioError>;

    /// Queues a request making `len` bytes at `offset` read as zeroes; `unmap` lets the
    /// storage behind them be freed.
    fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        user_data: u64,
    ) -> Result<(), AioError>;

    /// Starts every request queued since the last call.
    fn submit(&mut self) -> Result<(), AioError>;

    /// The next finished request, if any. Never blocks.
    fn next_completion(&mut self) -> Option<Completion>;
}

/// Errors of the async disk layer.
#[derive(Debug, thiserror::Error)]
pub enum AioError {
    /// The image file does not exist.
    #[error("disk image {0} does not exist")]
    NotFound(PathBuf),
    /// Opening the image failed.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another open file description holds a conflicting lock on the image.
    #[error(
        "disk image {path} is in use by another process (it holds a lock on it); a disk that \
         a VM may write cannot be shared, read-only disks can (readonly=on in every VM)"
    )]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// Taking the lock failed for another reason than a conflict.
    #[error("cannot lock disk image {path}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image format layer refused the image.
    #[error("cannot open disk image {path}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: crate::DiskError,
    },
    /// O_DIRECT was asked for an image whose file system does not support it.
    #[error("disk image {path}: direct=on (O_DIRECT) is not supported by its file system")]
    DirectUnsupported {
        /// The image.
        path: PathBuf,
    },
    /// The engine asked for is not available here.
    #[error("io_uring is not available")]
    Uring(#[source] io::Error),
    /// Starting requests failed.
    #[error("cannot submit disk requests")]
    Submit(#[source] io::Error),
    /// More requests than [`AsyncIo::depth`].
    #[error("disk request queue is full ({0} requests in flight)")]
    QueueFull(usize),
    /// A request has more segments than the engine accepts.
    #[error("disk request has {0} segments, more than the {max} allowed", max = libc::UIO_MAXIOV)]
    TooManySegments(usize),
    /// An eventfd or thread could not be created.
    #[error("cannot set up the disk engine: {what}")]
    Setup {
        /// What was being created.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Total byte length of `iovecs`, or `None` on overflow.
pub fn iovecs_len(iovecs: &[libc::iovec]) -> Option<usize> {
    iovecs
        .iter()
        .try_fold(0usize, |acc, v| acc.checked_add(v.iov_len))
}

/// An eventfd made non-blocking and close-on-exec.
pub(crate) fn new_eventfd() -> Result<vmm_sys_util::eventfd::EventFd, AioError> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
        AioError::Setup {
            what: "eventfd",
            source,
        }
    })
}

#[cfg(test)]
mod tests;
