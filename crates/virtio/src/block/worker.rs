//! The I/O thread of one virtio-blk queue.
//!
//! Each wake-up (a driver notification, disk completions, or a stop request) does the same
//! round: collect finished disk requests into the used ring, take every available chain the
//! engine has room for (with driver notifications suppressed while doing so), starting them a
//! few at a time as they are built, collect what finished inline (page-cache hits), then
//! signal the driver once if it wants to be told. After a round that did work and left
//! requests at the disk, the thread keeps polling the available ring and the engine until a
//! window passes without work, with notifications still suppressed: a driver that keeps
//! the disk busy never has to exit to notify, and completions are caught without a wake-up.
//! Where worker threads run the disk's requests, it yields its CPU to them now and then.
//! The window adapts, up to `poll_us`, to the gaps the queue sees (see [`PollWindow`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_devices::virtio::{GuestMemory, VirtioInterrupt};
use kiln_devices::warn_ratelimited;
use kiln_disk::aio::{AioError, AsyncIo};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, status, Action, DiskLimits, Request};
use crate::common::chain::{self, Desc};
use crate::common::worker::{Poller, StopSignal};
use crate::common::{has_avail, signal_used};

/// Most discard/write-zeroes segments one request may carry (engine slots it can take).
pub(crate) const MAX_ZERO_SEGMENTS: u32 = 16;
/// Most descriptors in one chain.
const MAX_DESCS: usize = 1024;
/// Most iovecs in one engine request.
const MAX_IOVECS: usize = 1024;
/// Requests started together (see `serve`).
const SUBMIT_BATCH: usize = 4;
/// Where the disk's requests run on worker threads ([`DiskImage::completes_in_kernel`] is
/// false), a polling thread offers its CPU to other threads once every this many looks at
/// the rings: the worker that finishes the requests polled for may be waiting for that CPU,
/// and spinning on would delay it. With nothing else to run, the call returns at once.
/// Measured (4K, depth 32, alternated runs, 2 cores): on a tmpfs file with O_DIRECT, whose
/// requests io_uring hands to a worker, reads went from 171-196K to 264-306K IOPS and writes
/// from 170-180K to 237-299K (not polling at all: 246-293K and 262-299K). Where the kernel
/// finishes requests by itself, yielding only gave CPU time away: 4K writes to an ext4 file
/// lost 2.5 % (20 alternated pairs, every 64th look; as much at every look or every 256th).
///
/// [`DiskImage::completes_in_kernel`]: kiln_disk::aio::DiskImage::completes_in_kernel
const YIELD_EVERY: u32 = 64;

const TOKEN_QUEUE: u64 = 0;
const TOKEN_DISK: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// Counters for benchmarks and tests.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Times the thread woke from sleep.
    pub wakeups: AtomicU64,
    /// Interrupts sent to the driver.
    pub interrupts: AtomicU64,
}

/// What the queues of one device share.
pub(crate) struct Shared {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub limits: DiskLimits,
    pub poll: Duration,
    /// Polling yields the CPU now and then (see [`YIELD_EVERY`]).
    pub yields: bool,
    pub stats: Arc<BlockStats>,
    pub path: String,
}

/// One queue with everything its thread owns; handed back when the thread stops.
pub(crate) struct BlockQueue {
    pub index: u16,
    pub queue: Queue,
    pub notify: EventFd,
    pub engine: Box<dyn AsyncIo>,
    /// The driver broke the protocol; nothing more is taken until reset.
    pub broken: bool,
}

struct Inflight {
    head: u16,
    status_addr: GuestAddress,
    status: u8,
    used_len: u32,
    pending: u32,
}

struct QueueWorker {
    q: BlockQueue,
    shared: Arc<Shared>,
    slots: Vec<Option<Inflight>>,
    free: Vec<u32>,
    descs: Vec<Desc>,
    iovecs: Vec<libc::iovec>,
    used_added: bool,
    /// Keep driver notifications off at the end of a round (busy polling).
    polling: bool,
    window: PollWindow,
    /// When the thread last did work before it went to sleep with requests at the disk.
    idle_since: Option<Instant>,
}

/// How long a queue's thread busy-polls after its last work: adapted, between 0 and the
/// disk's `poll_us`, to the gaps between work that the queue actually sees, in the way of
/// QEMU's adaptive polling.
/// - Work that came after the thread gave up, but within `max` of its last work, would have
///   been caught by a longer window: the window doubles (from [`PollWindow::MIN`]).
/// - A wait longer than `max` could not have been caught at all: the window halves, and
///   under [`PollWindow::MIN`] polling stops until gaps shorten again.
///
/// A disk kept busy (gaps of a disk's latency) therefore polls for up to `max`. Sparse I/O
/// alternates a short wait (the disk's latency, which grows the window) with a long one (the
/// guest's think time, which halves it): the window settles between one and two latencies,
/// so each request costs a few latencies of spinning, and an idle disk none.
///
/// Measured on a virtualised host disk (4K at depth 32 through io_uring): completions often
/// come 100-200 µs apart there, and a fixed 50 µs window slept through them: 5-10 % fewer
/// IOPS than 200 µs.
#[derive(Debug, Clone, Copy)]
struct PollWindow {
    max: Duration,
    now: Duration,
}

impl PollWindow {
    /// The smallest window that polls.
    const MIN: Duration = Duration::from_micros(8);

    /// A window that starts at `max` (0: never poll).
    fn new(max: Duration) -> Self {
        PollWindow { max, now: max }
    }

    /// Adapts to a sleep that ended `gap` after the thread's last work.
    fn waited(&mut self, gap: Duration) {
        if gap > self.max {
            self.now /= 2;
            if self.now < Self::MIN {
                self.now = Duration::ZERO;
            }
        } else if gap > self.now {
            self.now = (self.now * 2).max(Self::MIN).min(self.max);
        }
    }
}

/// Serves `q` until `stop` is requested, then finishes what is in flight and hands `q` back.
pub(crate) fn run(q: BlockQueue, shared: Arc<Shared>, stop: &StopSignal) -> BlockQueue {
    let slots = usize::from(q.queue.size().max(1));
    let window = PollWindow::new(shared.poll);
    let mut w = QueueWorker {
        shared,
        slots: (0..slots).map(|_| None).collect(),
        free: (0..u32::try_from(slots).unwrap_or(u32::MAX))
            .rev()
            .collect(),
        descs: Vec::with_capacity(16),
        iovecs: Vec::with_capacity(16),
        used_added: false,
        polling: false,
        window,
        idle_since: None,
        q,
    };
    let disk_fd = w.q.engine.notifier();
    let mut poller = match Poller::new().and_then(|p| {
        p.add(w.q.notify.as_raw_fd(), TOKEN_QUEUE)?;
        p.add(disk_fd, TOKEN_DISK)?;
        p.add(stop.fd(), TOKEN_STOP)?;
        Ok(p)
    }) {
        Ok(p) => p,
        Err(e) => {
            w.fail(&format!("virtio-blk queue {}: cannot poll: {e}", w.q.index));
            return w.q;
        }
    };
    // Requests may already be waiting (resume, restore).
    w.round();
    'serve: loop {
        let events = match poller.wait(-1) {
            Ok(ev) => ev,
            Err(e) => {
                w.fail(&format!("virtio-blk queue {}: epoll: {e}", w.q.index));
                break;
            }
        };
        w.shared.stats.wakeups.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = w.idle_since.take() {
            w.window.waited(t.elapsed());
        }
        let mut stopping = false;
        for (token, _) in events {
            match token {
                TOKEN_QUEUE => {
                    let _ = w.q.notify.read();
                }
                TOKEN_DISK => drain_eventfd(disk_fd),
                _ => stopping |= stop.requested(),
            }
        }
        if stopping {
            break 'serve;
        }
        if w.round() {
            w.busy_poll();
        }
    }
    w.drain(disk_fd);
    w.q
}

impl QueueWorker {
    /// One round; returns whether it moved any request.
    fn round(&mut self) -> bool {
        let mut moved = self.reap();
        if !self.q.broken && self.serve() {
            // What it took may have finished at once (page-cache hits).
            self.reap();
            moved = true;
        }
        self.signal();
        moved
    }

    /// After a round that left requests at the disk, polls the rings instead of sleeping,
    /// until the poll window passes without work: a completion due within microseconds is
    /// caught without a wake-up, and the driver's next request without a notification.
    /// After a round that finished everything at once (page-cache hits) the thread sleeps
    /// as before: nothing it could catch is due, and spinning would only take CPU time.
    fn busy_poll(&mut self) {
        if self.window.max.is_zero() || self.q.broken || self.q.engine.in_flight() == 0 {
            return;
        }
        let window = self.window.now;
        let mut last_work = Instant::now();
        if !window.is_zero() {
            self.polling = true;
            let _ = self.q.queue.disable_notification(&self.shared.mem);
            let mut looks = 0u32;
            while !self.q.broken {
                let work =
                    self.q.engine.in_flight() > 0 || has_avail(&self.q.queue, &self.shared.mem);
                if work && self.round() {
                    last_work = Instant::now();
                }
                looks = looks.wrapping_add(1);
                if looks.is_multiple_of(32) && last_work.elapsed() >= window {
                    break;
                }
                if self.shared.yields && looks.is_multiple_of(YIELD_EVERY) {
                    // SAFETY: sched_yield takes no arguments and touches no memory of ours.
                    unsafe { libc::sched_yield() };
                } else {
                    std::hint::spin_loop();
                }
            }
            self.polling = false;
            // Re-enables notifications and catches anything that raced with that.
            if self.round() {
                return;
            }
        }
        // The wake-up will tell how long polling would have had to go on.
        self.idle_since = Some(last_work);
    }

    /// Whether one more chain fits (an inflight slot, and engine room for its largest
    /// request).
    fn has_room(&self) -> bool {
        !self.free.is_empty()
            && self.q.engine.in_flight() + MAX_ZERO_SEGMENTS as usize <= self.q.engine.depth()
    }

    /// Takes available chains while there is room; returns whether it took any.
    fn serve(&mut self) -> bool {
        // Polling looks here over and over, with notifications already off: most looks
        // find nothing, and need not touch the shared Arc's count.
        if self.polling && !has_avail(&self.q.queue, &self.shared.mem) {
            return false;
        }
        // Cloning the Arc, not the GuestMemory (whose clone allocates a region list).
        let shared = Arc::clone(&self.shared);
        let mem = &shared.mem;
        let mut took = false;
        let mut unsubmitted = 0usize;
        loop {
            if let Err(e) = self.q.queue.disable_notification(mem) {
                self.fail(&format!(
                    "virtio-blk queue {}: used ring: {e}",
                    self.q.index
                ));
                return took;
            }
            while self.has_room() {
                match chain::pop(&mut self.q.queue, mem, self.q.index) {
                    Ok(Some(c)) => {
                        took = true;
                        if let Err(reason) = self.take(c) {
                            self.fail(&reason);
                            return took;
                        }
                        // Start requests a few at a time: one big batch holds its first
                        // request back in the host's block layer until the last is built
                        // (measured: 60 us more latency per request at depth 32), while one
                        // system call and one host disk notification per request cost CPU
                        // (4K random writes: 0.53 x host fio one at a time, 0.75 four at a
                        // time; reads 0.99 and 0.97).
                        unsubmitted += 1;
                        if unsubmitted == SUBMIT_BATCH {
                            unsubmitted = 0;
                            if let Err(e) = self.q.engine.submit() {
                                self.engine_failed(&e);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(&format!("virtio-blk: {e}"));
                        return took;
                    }
                }
            }
            if let Err(e) = self.q.engine.submit() {
                self.engine_failed(&e);
            }
            if !self.has_room() || self.polling {
                // Completions will bring us back; the driver need not notify meanwhile.
                return took;
            }
            match self.q.queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => return took,
                Err(e) => {
                    self.fail(&format!(
                        "virtio-blk queue {}: used ring: {e}",
                        self.q.index
                    ));
                    return took;
                }
            }
        }
    }

    /// Checks one chain and starts it (or answers it at once).
    fn take(&mut self, c: virtio_queue::DescriptorChain<&GuestMemory>) -> Result<(), String> {
        let mem = &self.shared.mem;
        let head = chain::collect(c, MAX_DESCS, self.q.index, &mut self.descs)
            .map_err(|e| format!("virtio-blk: {e}"))?;
        let req = request::parse(mem, &self.descs, head, &self.shared.limits)
            .map_err(|e| format!("virtio-blk queue {}: {e}", self.q.index))?;
        match req.action.clone() {
            Action::Answer(s) => self.finish(&req, s),
            Action::GetId { len } => {
                let serial = self.shared.limits.serial;
                let s = match chain::write_stream(mem, &self.descs, &serial[..len]) {
                    Ok(()) => status::OK,
                    Err(_) => status::IOERR,
                };
                self.finish(&req, s);
            }
            Action::Read { len: 0, .. } | Action::Write { len: 0, .. } => {
                self.finish(&req, status::OK)
            }
            Action::Read { offset, len } => self.start_rw(&req, false, offset, len),
            Action::Write { offset, len } => self.start_rw(&req, true, offset, len),
            Action::Flush if self.shared.limits.read_only => self.finish(&req, status::OK),
            Action::Flush => {
                let slot = self.alloc(&req, 1);
                if let Err(e) = self.q.engine.flush(u64::from(slot)) {
                    self.sub_failed(slot, &e);
                }
            }
            Action::Discard(ranges) | Action::WriteZeroes(ranges, _) => {
                let unmap = match &req.action {
                    Action::WriteZeroes(_, unmap) => Some(*unmap),
                    _ => None,
                };
                let n = u32::try_from(ranges.len()).unwrap_or(u32::MAX);
                let slot = self.alloc(&req, n);
                for r in ranges {
                    let ud = u64::from(slot);
                    let res = match unmap {
                        None => self.q.engine.discard(r.offset, r.len, ud),
                        Some(u) => self.q.engine.write_zeroes(r.offset, r.len, u, ud),
                    };
                    if let Err(e) = res {
                        self.sub_failed(slot, &e);
                    }
                }
            }
        }
        Ok(())
    }

    fn start_rw(&mut self, req: &Request, write: bool, offset: u64, len: u64) {
        self.iovecs.clear();
        // Reads fill the writable data; writes take the readable data after the header.
        let (from_writable, skip) = if write { (false, 16) } else { (true, 0) };
        let mapped = chain::stream_iovecs(
            &self.shared.mem,
            &self.descs,
            from_writable,
            skip,
            len,
            &mut self.iovecs,
        );
        if mapped.is_err() || self.iovecs.len() > MAX_IOVECS {
            warn_ratelimited!(
                "virtio-blk queue {}: request {} has buffers outside guest RAM or too many \
                 segments",
                self.q.index,
                req.head
            );
            self.finish(req, status::IOERR);
            return;
        }
        let slot = self.alloc(req, 1);
        let ud = u64::from(slot);
        // SAFETY: the iovecs point into guest memory, which stays mapped while `shared.mem`
        // (held by this thread until every request has completed, see `drain`) lives; kiln
        // never holds Rust references into guest RAM, only volatile accessors.
        let res = unsafe {
            if write {
                self.q.engine.write_vectored(offset, &self.iovecs, ud)
            } else {
                self.q.engine.read_vectored(offset, &self.iovecs, ud)
            }
        };
        if let Err(e) = res {
            self.sub_failed(slot, &e);
        }
    }

    fn alloc(&mut self, req: &Request, pending: u32) -> u32 {
        // has_room() guaranteed a free slot.
        let slot = self.free.pop().unwrap_or(0);
        self.slots[slot as usize] = Some(Inflight {
            head: req.head,
            status_addr: req.status,
            status: status::OK,
            used_len: req.used_len,
            pending,
        });
        slot
    }

    /// An engine refused part of a request: the request fails once its other parts finish.
    fn sub_failed(&mut self, slot: u32, e: &AioError) {
        warn_ratelimited!("virtio-blk {}: {e}", self.shared.path);
        self.account(slot, false);
    }

    /// Accounts one finished part of the request in `slot`.
    fn account(&mut self, slot: u32, ok: bool) {
        let Some(Some(inf)) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if !ok {
            inf.status = status::IOERR;
        }
        inf.pending = inf.pending.saturating_sub(1);
        if inf.pending > 0 {
            return;
        }
        if let Some(inf) = self.slots[slot as usize].take() {
            self.free.push(slot);
            let len = if inf.status == status::OK {
                inf.used_len
            } else {
                1
            };
            self.complete(inf.head, inf.status_addr, inf.status, len);
        }
    }

    /// Collects finished engine requests; returns whether any finished.
    fn reap(&mut self) -> bool {
        let mut any = false;
        while let Some(c) = self.q.engine.next_completion() {
            any = true;
            if let Err(e) = &c.result {
                warn_ratelimited!("virtio-blk {}: I/O error: {e}", self.shared.path);
            }
            let slot = u32::try_from(c.user_data).unwrap_or(u32::MAX);
            self.account(slot, c.result.is_ok());
        }
        any
    }

    fn finish(&mut self, req: &Request, s: u8) {
        let len = if s == status::OK { req.used_len } else { 1 };
        self.complete(req.head, req.status, s, len);
    }

    fn complete(&mut self, head: u16, status_addr: GuestAddress, s: u8, len: u32) {
        let mem = &self.shared.mem;
        // The address was checked when the request was parsed.
        let _ = mem.write_obj(s, status_addr);
        if let Err(e) = self.q.queue.add_used(mem, head, len) {
            let reason = format!("virtio-blk queue {}: used ring: {e}", self.q.index);
            self.fail(&reason);
            return;
        }
        self.used_added = true;
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn signal(&mut self) {
        if std::mem::take(&mut self.used_added)
            && signal_used(
                &mut self.q.queue,
                &self.shared.mem,
                &self.shared.interrupt,
                self.q.index,
            )
        {
            self.shared.stats.interrupts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The engine could not start its queued requests now; they stay queued and the next
    /// submit retries them.
    fn engine_failed(&mut self, e: &AioError) {
        warn_ratelimited!("virtio-blk {}: {e}", self.shared.path);
    }

    /// The driver broke the protocol: stop taking requests and ask for a reset.
    fn fail(&mut self, reason: &str) {
        if !self.q.broken {
            self.q.broken = true;
            self.shared.interrupt.needs_reset(reason);
        }
    }

    /// Waits for every request in flight, so that no I/O touches guest memory afterwards.
    fn drain(&mut self, disk_fd: RawFd) {
        let _ = self.q.engine.submit();
        while self.q.engine.in_flight() > 0 {
            if !self.reap() {
                let mut pfd = libc::pollfd {
                    fd: disk_fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one pollfd that lives across the call.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                drain_eventfd(disk_fd);
            }
        }
        self.reap();
        self.signal();
    }
}

/// Clears an eventfd's counter.
fn drain_eventfd(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from a non-blocking eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_poll_window_grows_to_catch_gaps_within_its_maximum() {
        let mut w = PollWindow::new(200 * US);
        assert_eq!(w.now, 200 * US);
        // A long wait halves it, down to nothing.
        let mut seen = Vec::new();
        while !w.now.is_zero() {
            w.waited(5000 * US);
            seen.push(w.now.as_micros());
        }
        assert_eq!(seen, [100, 50, 25, 12, 0]);
        // Work 150 us after the last: it doubles from the minimum until it covers that gap.
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.waited(150 * US);
            seen.push(w.now.as_micros());
        }
        assert_eq!(seen, [8, 16, 32, 64, 128, 200]);
        // A gap the window covers changes nothing; one just past it grows it, within max.
        w.waited(120 * US);
        assert_eq!(w.now, 200 * US);
        w.waited(200 * US);
        assert_eq!(w.now, 200 * US);
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        for gap in [0, 1, 50, 5000] {
            w.waited(gap * US);
            assert!(w.now.is_zero(), "after a {gap} us gap");
        }
    }
}
