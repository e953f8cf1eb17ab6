//! The io_uring engine for raw files and host block devices.
//!
//! Reads and writes go to the kernel as READV/WRITEV straight from and into the caller's
//! buffers (guest memory); flush is FSYNC(DATASYNC); discard and write-zeroes are FALLOCATE
//! (BLKDISCARD for discard on a block device, done synchronously). With O_DIRECT, buffers
//! that are not aligned to what the file needs go through an aligned bounce buffer. Short
//! transfers are resubmitted for the remainder.
//!
//! Buffered writes (no O_DIRECT) to a file system that cannot take them without blocking
//! (`RWF_NOWAIT` fails with EOPNOTSUPP: ext4) are done here, with `pwritev`, instead: io_uring
//! would hand every one of them to one of its kernel worker threads, and that hand-off cost
//! more than the copy into the page cache itself (4K random writes through virtio-blk on
//! ext4, 2 cores: 1.7 to 1.8 x the IOPS inline). See [`BufferedWrites`].

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::align::{copy_from_iovecs, copy_to_iovecs, iovecs_aligned, AlignedBuf};
use super::{iovecs_len, new_eventfd, AioError, AsyncIo, Completion};

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::Ioctl = 0x1277;

/// What the engine's file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// A regular file.
    Regular,
    /// A host block device.
    BlockDevice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes { unmap: bool },
}

/// How buffered writes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BufferedWrites {
    /// Not known yet: the first one tries `RWF_NOWAIT` and finds out.
    Unknown,
    /// Through the ring: the file system takes non-blocking buffered writes, so io_uring
    /// does them at submission itself and hands to its workers only those that must wait.
    Ring,
    /// Here, at once: the file system cannot take them without blocking, and io_uring
    /// would hand every one to a worker thread. A write that blocked longer than
    /// [`SLOW_INLINE_WRITE`] (dirty-page throttling, a journal) sends the next ones to the
    /// ring for [`INLINE_PAUSE`], so that one slow write does not hold up the queue's other
    /// requests for long.
    Inline,
}

/// An inline buffered write that took longer than this blocked on something.
const SLOW_INLINE_WRITE: Duration = Duration::from_millis(1);
/// How long buffered writes go to the ring after a slow inline one.
const INLINE_PAUSE: Duration = Duration::from_millis(100);

/// One request in flight; slots never move while the kernel may read their iovecs.
struct Slot {
    user_data: u64,
    op: Op,
    offset: u64,
    /// Byte length (fallocate operations).
    len: u64,
    /// What the kernel transfers into or from (the caller's buffers or the bounce buffer),
    /// advanced past what a short transfer already moved.
    iovecs: Vec<libc::iovec>,
    /// The caller's buffers when a bounce buffer stands in for them.
    guest: Vec<libc::iovec>,
    bounce: Option<AlignedBuf>,
    total: usize,
    done: usize,
}

impl Slot {
    fn empty() -> Self {
        Slot {
            user_data: 0,
            op: Op::Flush,
            offset: 0,
            len: 0,
            iovecs: Vec::new(),
            guest: Vec::new(),
            bounce: None,
            total: 0,
            done: 0,
        }
    }
}

/// io_uring on a raw file or block device.
///
/// Where the kernel allows (Linux 6.1+), the ring runs completion work only when its thread
/// asks for it (`DEFER_TASKRUN`, `SINGLE_ISSUER`): a completing disk then neither interrupts
/// the I/O thread with an IPI nor wakes it twice; it signals the eventfd, and the next
/// [`AsyncIo::next_completion`] collects what finished in one system call. Such a ring
/// belongs to one thread, so it is bound to the first thread that uses it and rebuilt,
/// while idle, when the engine moves to another thread (a queue restarted after a pause).
pub struct UringEngine {
    ring: IoUring,
    /// Entries of the submission ring.
    entries: u32,
    /// The ring defers completion work to its thread (see above).
    deferred: bool,
    /// The thread the deferred ring is bound to; `None` until first used.
    owner: Option<std::thread::ThreadId>,
    file: Arc<File>,
    kind: FileKind,
    /// Memory alignment the file needs (O_DIRECT), if any.
    align: Option<usize>,
    evt: EventFd,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Completions produced without the kernel ring (synchronous operations).
    ready: VecDeque<Completion>,
    unsubmitted: bool,
    buffered: BufferedWrites,
    /// Buffered writes go to the ring until then (see [`BufferedWrites::Inline`]).
    inline_paused_until: Option<Instant>,
    /// [`SLOW_INLINE_WRITE`], or what a test sets.
    slow_inline_write: Duration,
}

// SAFETY: the raw pointers in the slots' iovecs refer to memory the caller promised (through
// the unsafe read/write methods) stays valid until completion; nothing in them is tied to the
// thread that queued the request. The ring itself is Send.
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// An engine for `file` with room for `depth` requests in flight. `align` is the memory
    /// and length alignment O_DIRECT needs (`None` for buffered files).
    pub(crate) fn new(
        file: Arc<File>,
        kind: FileKind,
        align: Option<usize>,
        depth: usize,
    ) -> Result<Self, AioError> {
        let depth = depth.clamp(1, 4096);
        let entries = u32::try_from(depth.next_power_of_two()).unwrap_or(4096);
        let evt = new_eventfd()?;
        let (ring, deferred) = build_ring(entries, evt.as_raw_fd())?;
        let slots: Vec<Slot> = (0..depth).map(|_| Slot::empty()).collect();
        Ok(UringEngine {
            ring,
            entries,
            deferred,
            owner: None,
            file,
            kind,
            align,
            evt,
            free: (0..depth).rev().collect(),
            slots,
            ready: VecDeque::new(),
            unsubmitted: false,
            buffered: BufferedWrites::Unknown,
            inline_paused_until: None,
            slow_inline_write: SLOW_INLINE_WRITE,
        })
    }

    /// Whether io_uring can be set up here at all.
    pub fn available() -> bool {
        IoUring::new(2).is_ok()
    }

    /// Binds a deferred ring to the calling thread, rebuilding it if another thread used it.
    fn bind(&mut self) -> Result<(), AioError> {
        if !self.deferred {
            return Ok(());
        }
        let me = current_thread();
        match self.owner {
            Some(t) if t == me => return Ok(()),
            Some(_) if self.free.len() < self.slots.len() => {
                // The AsyncIo contract: an engine changes threads only when idle.
                return Err(AioError::Submit(io::Error::other(
                    "disk engine used from a second thread while requests are in flight",
                )));
            }
            Some(_) => {
                let (ring, deferred) = build_ring(self.entries, self.evt.as_raw_fd())?;
                self.ring = ring;
                self.deferred = deferred;
                self.unsubmitted = false;
                if !deferred {
                    return Ok(());
                }
            }
            None => {}
        }
        self.ring
            .submitter()
            .register_enable_rings()
            .map_err(AioError::Uring)?;
        self.owner = Some(me);
        Ok(())
    }

    fn take_slot(&mut self, user_data: u64, op: Op) -> Result<usize, AioError> {
        self.bind()?;
        // Completions waiting in `ready` have given their slots back but still count.
        if self.in_flight() >= self.slots.len() {
            return Err(AioError::QueueFull(self.slots.len()));
        }
        let idx = self
            .free
            .pop()
            .ok_or(AioError::QueueFull(self.slots.len()))?;
        let s = &mut self.slots[idx];
        s.user_data = user_data;
        s.op = op;
        s.offset = 0;
        s.len = 0;
        s.iovecs.clear();
        s.guest.clear();
        s.bounce = None;
        s.total = 0;
        s.done = 0;
        Ok(idx)
    }

    fn release(&mut self, idx: usize) -> u64 {
        let s = &mut self.slots[idx];
        s.bounce = None;
        self.free.push(idx);
        s.user_data
    }

    /// Pushes the kernel request for slot `idx` (its remaining part, after a short transfer).
    fn push(&mut self, idx: usize) -> Result<(), AioError> {
        let s = &self.slots[idx];
        let user_data = idx as u64;
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match s.op {
            Op::Read | Op::Write => rw_entry(s.op, fd, &s.iovecs, s.offset + s.done as u64)?,
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard | Op::WriteZeroes { unmap: true } => opcode::Fallocate::new(fd, s.len)
                .offset(s.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Op::WriteZeroes { unmap: false } => opcode::Fallocate::new(fd, s.len)
                .offset(s.offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
        .user_data(user_data);
        // SAFETY: the entry points at the slot's iovec array (stable: slots never move and the
        // Vec is not touched until completion), or at the one buffer it describes, and so at
        // caller memory valid until completion (the read/write contract). Fallocate and fsync
        // carry no pointers.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // The submission ring is full: start what is queued, then retry once.
            self.ring.submit().map_err(AioError::Submit)?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| AioError::QueueFull(self.slots.len()))?;
        }
        self.unsubmitted = true;
        Ok(())
    }

    /// Queues a read or write; `iovecs` as the trait's contract says.
    fn queue_rw(
        &mut self,
        op: Op,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), AioError> {
        if iovecs.len() > usize::try_from(libc::UIO_MAXIOV).unwrap_or(1024) {
            return Err(AioError::TooManySegments(iovecs.len()));
        }
        let total = iovecs_len(iovecs).ok_or(AioError::TooManySegments(iovecs.len()))?;
        let idx = self.take_slot(user_data, op)?;
        let bounce = match self.align {
            Some(a) if !iovecs_aligned(iovecs, a) => {
                let Some(buf) = AlignedBuf::new(total.div_ceil(a) * a, a) else {
                    self.complete_now(idx, Err(io::Error::from(io::ErrorKind::OutOfMemory)));
                    return Ok(());
                };
                Some(buf)
            }
            _ => None,
        };
        let s = &mut self.slots[idx];
        s.offset = offset;
        s.total = total;
        match bounce {
            Some(mut buf) => {
                if op == Op::Write {
                    // SAFETY: the caller guarantees the iovecs are readable (write contract);
                    // the bounce buffer is our own allocation.
                    unsafe { copy_from_iovecs(iovecs, buf.as_mut_slice()) };
                }
                s.guest.extend_from_slice(iovecs);
                s.iovecs.push(libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: total,
                });
                s.bounce = Some(buf);
            }
            None => s.iovecs.extend_from_slice(iovecs),
        }
        if total == 0 {
            self.complete_now(idx, Ok(0));
            return Ok(());
        }
        if op == Op::Write && self.align.is_none() {
            if let Some(result) = self.write_inline(idx) {
                let user_data = self.release(idx);
                self.ready.push_back(Completion { user_data, result });
                if self.ready.len() == 1 {
                    // A failed eventfd write only delays the wake-up until the next poll.
                    let _ = self.evt.write(1);
                }
                return Ok(());
            }
        }
        self.push(idx)
    }

    /// Tries buffered write `idx` here and now (see [`BufferedWrites`]): its result, or
    /// `None` when the ring must do it (or the rest of it, after a partial write).
    fn write_inline(&mut self, idx: usize) -> Option<io::Result<usize>> {
        let nowait = match self.buffered {
            BufferedWrites::Ring => return None,
            BufferedWrites::Unknown => true,
            BufferedWrites::Inline => {
                match self.inline_paused_until {
                    Some(t) if Instant::now() < t => return None,
                    Some(_) => self.inline_paused_until = None,
                    None => {}
                }
                false
            }
        };
        let s = &self.slots[idx];
        let count = libc::c_int::try_from(s.iovecs.len()).ok()?;
        let offset = libc::off_t::try_from(s.offset).ok()?;
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        let start = Instant::now();
        // SAFETY: the iovecs describe caller memory that stays readable until this request's
        // completion is collected (the write contract); the count matches the array.
        let n = unsafe {
            libc::pwritev2(
                self.file.as_raw_fd(),
                s.iovecs.as_ptr(),
                count,
                offset,
                flags,
            )
        };
        let result = usize::try_from(n).map_err(|_| io::Error::last_os_error());
        if nowait {
            self.buffered = match &result {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    log::debug!(
                        "disk: buffered writes cannot wait in io_uring here: writing them inline"
                    );
                    BufferedWrites::Inline
                }
                // It took the write without blocking, or would have blocked (EAGAIN), or
                // failed: the ring does the same from now on.
                _ => BufferedWrites::Ring,
            };
            if self.buffered == BufferedWrites::Inline {
                return self.write_inline(idx);
            }
        } else if start.elapsed() > self.slow_inline_write {
            self.inline_paused_until = Some(Instant::now() + INLINE_PAUSE);
        }
        match result {
            Ok(n) if n >= s.total => Some(Ok(s.total)),
            Ok(n) => {
                // A partial write: the ring writes the rest.
                let s = &mut self.slots[idx];
                s.done = n;
                skip_iovecs(&mut s.iovecs, n);
                None
            }
            // EINTR, or EAGAIN from RWF_NOWAIT: the ring tries again; it also reports a
            // failure the same way for every write.
            Err(_) if nowait => None,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn queue_fallocate(
        &mut self,
        op: Op,
        offset: u64,
        len: u64,
        user_data: u64,
    ) -> Result<(), AioError> {
        let idx = self.take_slot(user_data, op)?;
        self.slots[idx].offset = offset;
        self.slots[idx].len = len;
        if len == 0 {
            self.complete_now(idx, Ok(0));
            return Ok(());
        }
        if op == Op::Discard && self.kind == FileKind::BlockDevice {
            let r = blk_discard(&self.file, offset, len).map(|()| 0);
            self.complete_now(idx, r);
            return Ok(());
        }
        self.push(idx)
    }

    /// Completes slot `idx` without the kernel ring and wakes the poller.
    fn complete_now(&mut self, idx: usize, result: io::Result<usize>) {
        let user_data = self.release(idx);
        self.ready.push_back(Completion { user_data, result });
        // A failed eventfd write only delays the wake-up until the next poll.
        let _ = self.evt.write(1);
    }

    /// Handles one kernel completion; `None` when the request goes on (short transfer).
    fn finish(&mut self, idx: usize, res: i32) -> Option<Completion> {
        let op = self.slots[idx].op;
        let result = match op {
            Op::Read | Op::Write => match self.advance(idx, res) {
                Ok(true) => return None,
                Ok(false) => Ok(self.slots[idx].total),
                Err(e) => Err(e),
            },
            Op::Flush => errno_result(res).map(|_| 0),
            Op::Discard => match errno_result(res) {
                // Discard is a hint: a file system that cannot punch holes keeps the data.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(0),
                r => r.map(|_| 0),
            },
            Op::WriteZeroes { .. } => match errno_result(res) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    let s = &self.slots[idx];
                    write_zeroes_sync(&self.file, s.offset, s.len, self.align).map(|()| 0)
                }
                r => r.map(|_| 0),
            },
        };
        if op == Op::Read && result.is_ok() {
            let s = &self.slots[idx];
            if let Some(buf) = &s.bounce {
                // SAFETY: the caller guarantees the guest iovecs stay writable until this
                // completion is collected (read contract); the bounce buffer is ours.
                unsafe { copy_to_iovecs(&s.guest, &buf.as_slice()[..s.total]) };
            }
        }
        let user_data = self.release(idx);
        Some(Completion { user_data, result })
    }

    /// Accounts `res` bytes of a read/write; `Ok(true)` when a remainder was resubmitted.
    fn advance(&mut self, idx: usize, res: i32) -> io::Result<bool> {
        let n = usize::try_from(errno_result(res)?).unwrap_or(0);
        let s = &mut self.slots[idx];
        s.done += n;
        if s.done >= s.total {
            return Ok(false);
        }
        if n == 0 {
            if s.op == Op::Write {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            // Reading at end of file: what lies beyond reads as zeroes, as in a sparse file.
            zero_iovecs_from(&mut s.iovecs, 0);
            return Ok(false);
        }
        skip_iovecs(&mut s.iovecs, n);
        self.push(idx)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.submit().map_err(|e| io::Error::other(e.to_string()))?;
        Ok(true)
    }
}

impl AsyncIo for UringEngine {
    fn notifier(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    fn depth(&self) -> usize {
        self.slots.len()
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len()
    }

    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), AioError> {
        self.queue_rw(Op::Read, offset, iovecs, user_data)
    }

    unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), AioError> {
        self.queue_rw(Op::Write, offset, iovecs, user_data)
    }

    fn flush(&mut self, user_data: u64) -> Result<(), AioError> {
        let idx = self.take_slot(user_data, Op::Flush)?;
        self.push(idx)
    }

    fn discard(&mut self, offset: u64, len: u64, user_data: u64) -> Result<(), AioError> {
        self.queue_fallocate(Op::Discard, offset, len, user_data)
    }

    fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        user_data: u64,
    ) -> Result<(), AioError> {
        self.queue_fallocate(Op::WriteZeroes { unmap }, offset, len, user_data)
    }

    fn submit(&mut self) -> Result<(), AioError> {
        if !self.unsubmitted {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(AioError::Submit(e)),
            }
        }
        self.unsubmitted = false;
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        if let Some(c) = self.ready.pop_front() {
            return Some(c);
        }
        loop {
            let mut cqe = self.ring.completion().next();
            // Finished requests wait in the kernel until this thread collects them: an enter
            // with GETEVENTS (submit adds it when TASKRUN is flagged) runs that deferred work;
            // a failure leaves it for the next call.
            if cqe.is_none() && self.deferred && self.ring.submission().taskrun() {
                self.ring.submit().ok()?;
                cqe = self.ring.completion().next();
            }
            let cqe = cqe?;
            let idx = usize::try_from(cqe.user_data()).ok()?;
            if idx >= self.slots.len() {
                continue;
            }
            if let Some(c) = self.finish(idx, cqe.result()) {
                return Some(c);
            }
        }
    }
}

/// Whether `file` takes non-blocking reads (`RWF_NOWAIT`), tried with one block of
/// `align` bytes (the O_DIRECT alignment; `None` for buffered files) at offset 0. A file
/// that refuses them (`EOPNOTSUPP`: tmpfs, many network and FUSE file systems) gets every
/// io_uring request handed to a kernel worker thread; one that takes them, or says the read
/// would block, has its requests started by the submitting call and finished by the disk.
pub(crate) fn takes_nowait(file: &File, align: Option<usize>) -> bool {
    let a = align.unwrap_or(512);
    let Some(mut buf) = AlignedBuf::new(a, a) else {
        return true;
    };
    let v = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: a,
    };
    // SAFETY: one iovec over our own buffer of `a` bytes, which outlives the call.
    let rc = unsafe { libc::preadv2(file.as_raw_fd(), &v, 1, 0, libc::RWF_NOWAIT) };
    !(rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP))
}

/// A ring of `entries` that signals `evt` on completions, with deferred completion work
/// (disabled until [`UringEngine::bind`]) where the kernel has it; returns whether it has.
fn build_ring(entries: u32, evt: RawFd) -> Result<(IoUring, bool), AioError> {
    let deferred = IoUring::builder()
        .setup_cqsize(entries * 2)
        .setup_r_disabled()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(entries);
    let (ring, deferred) = match deferred {
        Ok(r) => (r, true),
        // Older kernels refuse these flags (EINVAL): an ordinary ring works everywhere.
        Err(_) => (
            IoUring::builder()
                .setup_cqsize(entries * 2)
                .build(entries)
                .map_err(AioError::Uring)?,
            false,
        ),
    };
    ring.submitter()
        .register_eventfd(evt)
        .map_err(AioError::Uring)?;
    Ok((ring, deferred))
}

/// The request for a read or write of `iovecs` at `offset`. One segment (most requests) goes
/// as a plain read or write, without an iovec array for the kernel to copy in and check.
fn rw_entry(
    op: Op,
    fd: types::Fd,
    iovecs: &[libc::iovec],
    offset: u64,
) -> Result<io_uring::squeue::Entry, AioError> {
    if let [v] = iovecs {
        if let Ok(n) = u32::try_from(v.iov_len) {
            let p = v.iov_base.cast::<u8>();
            return Ok(if op == Op::Read {
                opcode::Read::new(fd, p, n).offset(offset).build()
            } else {
                opcode::Write::new(fd, p, n).offset(offset).build()
            });
        }
    }
    let n = u32::try_from(iovecs.len()).map_err(|_| AioError::TooManySegments(iovecs.len()))?;
    Ok(if op == Op::Read {
        opcode::Readv::new(fd, iovecs.as_ptr(), n)
            .offset(offset)
            .build()
    } else {
        opcode::Writev::new(fd, iovecs.as_ptr(), n)
            .offset(offset)
            .build()
    })
}

/// The calling thread's id, cached: `bind` asks for it on every request.
fn current_thread() -> std::thread::ThreadId {
    thread_local!(static ID: std::thread::ThreadId = std::thread::current().id());
    ID.with(|id| *id)
}

fn errno_result(res: i32) -> io::Result<u32> {
    u32::try_from(res).map_err(|_| io::Error::from_raw_os_error(res.saturating_neg()))
}

/// Drops the first `n` bytes from `iovecs`.
fn skip_iovecs(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut first = 0;
    for v in iovecs.iter_mut() {
        if n < v.iov_len {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        first += 1;
    }
    iovecs.drain(..first);
}

/// Zeroes what `iovecs` still describe after skipping `skip` bytes.
fn zero_iovecs_from(iovecs: &mut Vec<libc::iovec>, skip: usize) {
    skip_iovecs(iovecs, skip);
    for v in iovecs.iter() {
        // SAFETY: the iovecs describe writable memory valid until completion (read contract).
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
    }
}

/// BLKDISCARD on a block device.
fn blk_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64s from the pointer, which lives across the call; the fd
    // is valid while `file` lives.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `len` zero bytes at `offset` (for file systems without FALLOC_FL_ZERO_RANGE).
fn write_zeroes_sync(file: &File, offset: u64, len: u64, align: Option<usize>) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let chunk = usize::try_from(len).map_or(CHUNK, |l| l.min(CHUNK));
    let buf = AlignedBuf::new(chunk, align.unwrap_or(4096).max(4096))
        .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(chunk, |r| r.min(chunk));
        file.write_all_at(&buf.as_slice()[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// An engine on a buffered 1 MiB file under /var/tmp (a disk file system, as for a
    /// real image), and whether that file system refuses non-blocking buffered writes.
    fn engine() -> (tempfile::TempDir, Arc<File>, UringEngine, bool) {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("disk.raw");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let one = [0u8; 512];
        let v = libc::iovec {
            iov_base: one.as_ptr().cast_mut().cast(),
            iov_len: one.len(),
        };
        // SAFETY: one iovec over a local buffer that outlives the call.
        let rc = unsafe { libc::pwritev2(file.as_raw_fd(), &v, 1, 0, libc::RWF_NOWAIT) };
        let refuses = rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP);
        let file = Arc::new(file);
        let e = UringEngine::new(file.clone(), FileKind::Regular, None, 8).unwrap();
        (dir, file, e, refuses)
    }

    /// Submits what is queued and waits (up to 5 s) for the one completion.
    fn submit_and_wait(e: &mut UringEngine) -> Completion {
        e.submit().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(c) = e.next_completion() {
                return c;
            }
            assert!(Instant::now() < deadline, "the request never completed");
            std::thread::yield_now();
        }
    }

    /// Queues a write of `data` at `offset`; returns whether it had finished before submit.
    fn write(e: &mut UringEngine, offset: u64, data: &[u8], ud: u64) -> bool {
        let v = [libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        }];
        // SAFETY: `data` outlives the request: its completion is collected below.
        unsafe { e.write_vectored(offset, &v, ud) }.unwrap();
        let at_once = e.ready.len() == 1;
        let c = submit_and_wait(e);
        assert_eq!(c.user_data, ud);
        assert_eq!(c.result.unwrap(), data.len());
        at_once
    }

    fn contents(file: &File, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn buffered_writes_run_inline_where_io_uring_would_hand_them_to_workers() {
        let (_dir, file, mut e, refuses) = engine();
        for (offset, i) in [0u64, 8192, 4096 + 100].into_iter().zip(0u8..) {
            let data: Vec<u8> = (0..=255u8).cycle().take(4096).map(|b| b ^ i).collect();
            let at_once = write(&mut e, offset, &data, u64::from(i));
            assert_eq!(contents(&file, offset, data.len()), data);
            if refuses {
                assert_eq!(e.buffered, BufferedWrites::Inline);
                assert!(at_once, "write {i} went through the ring");
            } else {
                // This file system takes non-blocking buffered writes: io_uring does them
                // inline itself.
                assert_eq!(e.buffered, BufferedWrites::Ring);
            }
        }
    }

    /// Reads `bufs` (as one request) at `offset`; what each buffer got.
    fn read(e: &mut UringEngine, offset: u64, mut bufs: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let v: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let total: usize = bufs.iter().map(Vec::len).sum();
        // SAFETY: `bufs` outlives the request: its completion is collected below.
        unsafe { e.read_vectored(offset, &v, 7) }.unwrap();
        let c = submit_and_wait(e);
        assert_eq!(c.user_data, 7);
        assert_eq!(c.result.unwrap(), total);
        bufs
    }

    #[test]
    fn reads_past_the_end_of_the_file_fill_with_zeroes() {
        let (_dir, file, mut e, _) = engine();
        let data: Vec<u8> = (0..=255u8).cycle().take(6000).collect();
        file.write_all_at(&data, 0).unwrap();
        file.set_len(6000).unwrap();
        // One segment (a plain read) and two (a vectored one), each crossing the end of the
        // file: the short read's remainder goes back to the ring and then reads as zeroes.
        let one = read(&mut e, 4096, vec![vec![0xffu8; 4096]]);
        let mut want = data[4096..].to_vec();
        want.resize(4096, 0);
        assert_eq!(one, vec![want.clone()]);
        let two = read(&mut e, 4096, vec![vec![0xffu8; 1000], vec![0xffu8; 3096]]);
        assert_eq!(two, vec![want[..1000].to_vec(), want[1000..].to_vec()]);
        // A plain write through the ring, after the end, grows the file.
        e.buffered = BufferedWrites::Ring;
        assert!(!write(&mut e, 8192, &[0x5a; 512], 8));
        assert_eq!(contents(&file, 8192, 512), vec![0x5a; 512]);
    }

    #[test]
    fn a_slow_inline_write_sends_the_next_ones_to_the_ring_for_a_while() {
        let (_dir, file, mut e, refuses) = engine();
        e.slow_inline_write = Duration::ZERO;
        let data = vec![0xa5u8; 4096];
        let first = write(&mut e, 0, &data, 1);
        if !refuses {
            assert_eq!(e.buffered, BufferedWrites::Ring);
            return;
        }
        assert!(first, "the first write went through the ring");
        assert!(e.inline_paused_until.is_some());
        // Counted slow (the threshold is zero): the next write goes through the ring.
        assert!(!write(&mut e, 4096, &data, 2));
        assert_eq!(contents(&file, 0, 8192), vec![0xa5u8; 8192]);
        // After the pause, writes run inline again.
        e.inline_paused_until = Some(Instant::now());
        e.slow_inline_write = SLOW_INLINE_WRITE;
        assert!(write(&mut e, 8192, &data, 3));
    }
}
