//! The thread of one virtio-net queue pair: frames from the tap into the receive queue, frames
//! from the transmit queue to the tap, and (on pair 0) the control queue.
//!
//! Frames move with one readv/writev straight between the tap and guest buffers; the
//! virtio-net header the guest sees is the one the tap reads and writes (12 bytes). With
//! MRG_RXBUF a frame may fill several receive chains; the thread takes chains until a
//! largest-possible frame fits, reads, uses what the frame filled and gives the rest back.
//! The tap is watched for input only while receive buffers exist, and for output only while
//! the tap refuses frames, so the thread sleeps when there is nothing it can do.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use kiln_devices::virtio::{GuestMemory, VirtioInterrupt};
use kiln_devices::warn_ratelimited;
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::batch::{Sent, TapRing, RX_SLOT};
use super::tap::{Tap, VNET_HDR_LEN};
use crate::common::chain::{self, read_stream, Desc, Taken};
use crate::common::worker::{Poller, StopSignal};
use crate::common::{push_iovecs, signal_used};

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_CTRL: u64 = 2;
const TOKEN_TAP: u64 = 3;
const TOKEN_STOP: u64 = 4;

/// Most iovecs handed to one readv/writev.
const MAX_IOVECS: usize = 1024;
/// Most descriptors in one chain.
const MAX_DESCS: usize = 1024;
/// Most transmit chains taken in one pass over the available ring.
const TX_BATCH: usize = 64;
/// Most receive chains filled in one batch.
const RX_BATCH: usize = 64;
/// Fewest receive chains tried in one batch.
const RX_BATCH_MIN: usize = 4;
/// Largest frame without TSO (Ethernet with a VLAN tag), plus the header.
const SMALL_FRAME: usize = VNET_HDR_LEN + 1518;
/// Largest TSO frame, plus the header.
const BIG_FRAME: usize = VNET_HDR_LEN + 65550;

/// Counters.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (headers included).
    pub rx_bytes: AtomicU64,
    /// Frames sent to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes sent to the tap (headers included).
    pub tx_bytes: AtomicU64,
    /// Frames dropped (either way).
    pub dropped: AtomicU64,
}

/// What the pairs of one device share.
pub(crate) struct Shared {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub taps: Vec<Arc<Tap>>,
    pub mrg_rxbuf: bool,
    pub big_frames: bool,
    pub mq: bool,
    pub active_pairs: Arc<AtomicU16>,
    pub stats: Arc<NetStats>,
}

/// One virtqueue.
pub(crate) struct NetQueue {
    pub index: u16,
    pub queue: Queue,
    pub notify: EventFd,
}

/// A queue pair (and the control queue on pair 0) with everything its thread owns.
pub(crate) struct NetPair {
    pub pair: u16,
    pub rx: Option<NetQueue>,
    pub tx: Option<NetQueue>,
    pub ctrl: Option<NetQueue>,
    pub broken: bool,
}

/// A receive chain taken but not yet used.
struct RxChain {
    head: u16,
    iovecs: usize,
    capacity: usize,
}

struct PairWorker {
    p: NetPair,
    shared: Arc<Shared>,
    tap: Arc<Tap>,
    descs: Vec<Desc>,
    /// Transmit chains of the current batch (their descriptors are in `descs`).
    taken: Vec<Taken>,
    /// Batched transmission (`None`: one writev per frame).
    txring: Option<TapRing>,
    /// Batched reception (`None`: one readv per frame).
    rxring: Option<TapRing>,
    /// Receive chains to try in the next batch.
    rx_batch: usize,
    /// Receive chains of the current batch and their descriptors.
    rx_taken: Vec<Taken>,
    rx_descs: Vec<Desc>,
    /// Room to move a frame between two receive chains.
    scratch: Vec<u8>,
    /// Transmit chains the tap refused for now, in order: sent before any other.
    tx_retry: std::collections::VecDeque<(u16, Vec<Desc>)>,
    iovecs: Vec<libc::iovec>,
    pool: Vec<RxChain>,
    pool_capacity: usize,
    /// Watching the tap for input (receive buffers exist).
    want_in: bool,
    /// Watching the tap for output (it refused a frame).
    want_out: bool,
}

/// Serves `p` until `stop` is requested, then hands it back.
pub(crate) fn run(p: NetPair, shared: Arc<Shared>, stop: &StopSignal) -> NetPair {
    let tap = shared.taps[usize::from(p.pair)].clone();
    let mut w = PairWorker {
        p,
        shared,
        tap,
        descs: Vec::with_capacity(16),
        taken: Vec::with_capacity(TX_BATCH),
        // Made here, on the thread that uses it.
        txring: TapRing::new(TX_BATCH),
        rxring: TapRing::for_reception(RX_BATCH),
        rx_batch: RX_BATCH_MIN,
        rx_taken: Vec::with_capacity(RX_BATCH),
        rx_descs: Vec::with_capacity(RX_BATCH),
        scratch: Vec::new(),
        tx_retry: std::collections::VecDeque::new(),
        iovecs: Vec::with_capacity(64),
        pool: Vec::new(),
        pool_capacity: 0,
        want_in: true,
        want_out: false,
    };
    let mut poller = match w.poller(stop) {
        Ok(p) => p,
        Err(e) => {
            w.fail(&format!("virtio-net pair {}: cannot poll: {e}", w.p.pair));
            return w.p;
        }
    };
    w.serve_tx();
    w.serve_rx();
    w.serve_ctrl();
    w.update_interest(&poller);
    let mut events = [(0u64, EventSet::empty()); 8];
    loop {
        let n = match poller.wait(-1) {
            Ok(ev) => {
                let mut n = 0;
                for e in ev.take(events.len()) {
                    events[n] = e;
                    n += 1;
                }
                n
            }
            Err(e) => {
                w.fail(&format!("virtio-net pair {}: epoll: {e}", w.p.pair));
                break;
            }
        };
        let mut stopping = false;
        for &(token, set) in &events[..n] {
            match token {
                TOKEN_RX => {
                    drain(&w.p.rx);
                    w.want_in = true;
                }
                TOKEN_TX => {
                    drain(&w.p.tx);
                    w.serve_tx();
                }
                TOKEN_CTRL => {
                    drain(&w.p.ctrl);
                    w.serve_ctrl();
                }
                TOKEN_TAP => {
                    if set.contains(EventSet::OUT) {
                        w.want_out = false;
                        w.serve_tx();
                    }
                }
                _ => stopping |= stop.requested(),
            }
        }
        if stopping {
            w.drop_retries();
            break;
        }
        if w.want_in {
            w.serve_rx();
        }
        w.update_interest(&poller);
    }
    w.p
}

fn drain(q: &Option<NetQueue>) {
    if let Some(q) = q {
        let _ = q.notify.read();
    }
}

impl PairWorker {
    fn poller(&self, stop: &StopSignal) -> std::io::Result<Poller> {
        let p = Poller::new()?;
        for (q, token) in [
            (&self.p.rx, TOKEN_RX),
            (&self.p.tx, TOKEN_TX),
            (&self.p.ctrl, TOKEN_CTRL),
        ] {
            if let Some(q) = q {
                p.add(q.notify.as_raw_fd(), token)?;
            }
        }
        p.add_events(self.tap.fd(), TOKEN_TAP, EventSet::empty())?;
        p.add(stop.fd(), TOKEN_STOP)?;
        Ok(p)
    }

    fn update_interest(&self, poller: &Poller) {
        let mut set = EventSet::empty();
        if self.want_in && self.p.rx.is_some() && !self.p.broken {
            set |= EventSet::IN;
        }
        if self.want_out && !self.p.broken {
            set |= EventSet::OUT;
        }
        if let Err(e) = poller.modify(self.tap.fd(), TOKEN_TAP, set) {
            warn_ratelimited!("virtio-net: tap {}: epoll: {e}", self.tap.name());
        }
    }

    /// The driver broke the protocol: stop and ask for a reset.
    fn fail(&mut self, reason: &str) {
        if !self.p.broken {
            self.p.broken = true;
            self.shared.interrupt.needs_reset(reason);
        }
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn serve_rx(&mut self) {
        if self.p.broken {
            return;
        }
        let Some(mut rxq) = self.p.rx.take() else {
            return;
        };
        let need = if self.shared.big_frames {
            BIG_FRAME
        } else {
            SMALL_FRAME
        };
        let mut delivered = false;
        // While buffers last, the driver need not say when it adds more.
        let _ = rxq.queue.disable_notification(&self.shared.mem);
        let mut dry = false;
        if self.rxring.is_some() {
            (delivered, dry) = self.rx_batches(&mut rxq, need);
        }
        while !dry && !self.p.broken {
            if let Err(reason) = self.fill_pool(&mut rxq, need) {
                self.fail(&reason);
                break;
            }
            if self.pool.is_empty() {
                // Out of buffers: stop watching the tap until the driver adds some.
                match rxq.queue.enable_notification(&self.shared.mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => self.fail(&format!("virtio-net rx: used ring: {e}")),
                }
                self.want_in = false;
                break;
            }
            let iov_end = if self.shared.mrg_rxbuf {
                self.iovecs.len()
            } else {
                self.pool[0].iovecs
            };
            match self.tap.read_frame(&self.iovecs[..iov_end]) {
                Ok(None) => break,
                Ok(Some(n)) if n < VNET_HDR_LEN => {
                    self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(n)) => {
                    if let Err(reason) = self.use_rx(&mut rxq, n) {
                        self.fail(&reason);
                        break;
                    }
                    delivered = true;
                }
                Err(e) => {
                    // The frame did not fit (EFAULT/EINVAL) or the tap failed: it is gone.
                    self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    warn_ratelimited!("virtio-net: tap {}: read: {e}", self.tap.name());
                    if !matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL)) {
                        break;
                    }
                }
            }
        }
        // Give back what was taken but not used.
        let unused = u16::try_from(self.pool.len()).unwrap_or(u16::MAX);
        rxq.queue
            .set_next_avail(rxq.queue.next_avail().wrapping_sub(unused));
        self.pool.clear();
        self.iovecs.clear();
        self.pool_capacity = 0;
        if delivered {
            signal_used(
                &mut rxq.queue,
                &self.shared.mem,
                &self.shared.interrupt,
                rxq.index,
            );
        }
        self.p.rx = Some(rxq);
    }

    /// The batched receive path: takes up to RX_BATCH chains, reads one frame into each in
    /// one system call, and uses them in order. Returns (whether it delivered a frame,
    /// whether the tap ran dry or the queue broke); otherwise (out of buffers, a chain that
    /// cannot hold a whole frame on its own, no ring) the one-at-a-time path goes on.
    fn rx_batches(&mut self, rxq: &mut NetQueue, need: usize) -> (bool, bool) {
        // Cloning the Arc, not the GuestMemory (whose clone allocates a region list).
        let shared = Arc::clone(&self.shared);
        let mem = &shared.mem;
        let mut delivered = false;
        loop {
            let n = match chain::pop_batch(
                &mut rxq.queue,
                mem,
                rxq.index,
                self.rx_batch,
                MAX_DESCS,
                &mut self.rx_descs,
                &mut self.rx_taken,
            ) {
                Ok(0) => return (delivered, false),
                Ok(n) => n,
                Err(e) => {
                    self.fail(&format!("virtio-net: {e}"));
                    return (delivered, true);
                }
            };
            let back = |rxq: &mut NetQueue, k: usize| {
                let k = u16::try_from(k).unwrap_or(u16::MAX);
                rxq.queue
                    .set_next_avail(rxq.queue.next_avail().wrapping_sub(k));
            };
            if let Some(t) = self.rx_taken[..n]
                .iter()
                .find(|t| self.rx_descs[t.descs.clone()].iter().any(|d| !d.writable))
            {
                let reason = format!(
                    "virtio-net queue {}: receive chain {} has a device-readable buffer",
                    rxq.index, t.head
                );
                self.fail(&reason);
                return (delivered, true);
            }
            let Some(ring) = self.rxring.as_mut() else {
                back(rxq, n);
                return (delivered, false);
            };
            // Every chain must hold a whole frame on its own, inside guest RAM.
            let mut fits = true;
            let mut capacity = [0usize; RX_BATCH];
            for (i, t) in self.rx_taken[..n].iter().enumerate() {
                let v = ring.frame(i);
                for d in &self.rx_descs[t.descs.clone()] {
                    let len = usize::try_from(d.len).unwrap_or(usize::MAX);
                    fits &= push_iovecs(mem, d.addr, len, v).is_ok();
                    capacity[i] = capacity[i].saturating_add(len);
                }
                fits &= capacity[i] >= need && v.len() <= MAX_IOVECS;
                if !fits {
                    break;
                }
            }
            if !fits {
                back(rxq, n);
                return (delivered, false);
            }
            // Frames that fit the ring's slots land there first (see `TapRing::read_slots`);
            // larger ones (negotiated offloads) go straight into the chains.
            let slots = ring.has_slots() && need <= RX_SLOT;
            let read = if slots {
                ring.read_slots(self.tap.fd(), n)
            } else {
                // SAFETY: the iovecs point into guest memory, mapped while `mem` lives.
                unsafe { ring.run_batch(self.tap.fd(), n, true, false) }
            };
            if let Err(e) = read {
                warn_ratelimited!(
                    "virtio-net: tap {}: batched reception failed ({e}); reading frames one \
                     at a time from now on",
                    self.tap.name()
                );
                self.rxring = None;
                back(rxq, n);
                return (delivered, false);
            }
            let mut results = [None; RX_BATCH];
            for (i, r) in results[..n].iter_mut().enumerate() {
                *r = ring.result(i);
            }
            // Chains 0..used get the frames in order; a frame read after an empty read (one
            // that arrived meanwhile) moves down, so the unused chains are the batch's tail.
            let mut used = 0usize;
            let mut bytes = 0u64;
            let (mut dry, mut give_up) = (false, false);
            for (j, r) in results[..n].iter().enumerate() {
                match *r {
                    // The tap cuts a frame that does not fit to the buffer's size: a read that
                    // fills a whole slot may be such a frame, and is dropped.
                    Some(Sent::Done(len))
                        if len >= VNET_HDR_LEN
                            && len <= capacity[used]
                            && if slots {
                                len < RX_SLOT
                            } else {
                                len <= capacity[j]
                            } =>
                    {
                        // num_buffers, bytes 10..12 of the header.
                        let count = 1u16.to_le_bytes();
                        if slots {
                            ring.slot(j, len)[10..12].copy_from_slice(&count);
                            ring.deliver(j, used, len);
                        } else {
                            if j != used {
                                ring.move_frame(j, used, len, &mut self.scratch);
                            }
                            write_iovecs(ring.iovecs(used), 10, &count);
                        }
                        let head = self.rx_taken[used].head;
                        if let Err(e) =
                            rxq.queue
                                .add_used(mem, head, u32::try_from(len).unwrap_or(u32::MAX))
                        {
                            self.fail(&format!("virtio-net rx: used ring: {e}"));
                            return (delivered, true);
                        }
                        bytes += len as u64;
                        used += 1;
                        delivered = true;
                    }
                    Some(Sent::Again) => dry = true,
                    Some(Sent::Refused(libc::EOPNOTSUPP)) => give_up = true,
                    Some(Sent::Done(_) | Sent::Refused(_)) => {
                        // Too short, did not fit or a tap error: that frame is gone.
                        self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    // Reads are never linked: nothing was read.
                    Some(Sent::Cancelled) | None => {}
                }
            }
            // Counted once per batch: these counters are shared with the VMM thread.
            self.shared
                .stats
                .rx_frames
                .fetch_add(used as u64, Ordering::Relaxed);
            self.shared
                .stats
                .rx_bytes
                .fetch_add(bytes, Ordering::Relaxed);
            back(rxq, n - used);
            // A read past the last frame still costs a trip through the tap: size the next
            // batch by what this one found.
            self.rx_batch = if used == n {
                (self.rx_batch * 2).min(RX_BATCH)
            } else {
                (used + 1).next_power_of_two().clamp(RX_BATCH_MIN, RX_BATCH)
            };
            if give_up {
                // A kernel whose tap cannot answer RWF_NOWAIT: readv from now on.
                self.rxring = None;
                return (delivered, false);
            }
            if dry {
                return (delivered, true);
            }
        }
    }

    /// Takes receive chains until `need` bytes fit (one chain without MRG_RXBUF).
    fn fill_pool(&mut self, rxq: &mut NetQueue, need: usize) -> Result<(), String> {
        // Cloning the Arc, not the GuestMemory (whose clone allocates a region list).
        let shared = Arc::clone(&self.shared);
        let mem = &shared.mem;
        loop {
            let enough = if self.shared.mrg_rxbuf {
                self.pool_capacity >= need
            } else {
                !self.pool.is_empty()
            };
            if enough || self.iovecs.len() >= MAX_IOVECS {
                return Ok(());
            }
            let Some(c) = chain::pop(&mut rxq.queue, mem, rxq.index)
                .map_err(|e| format!("virtio-net: {e}"))?
            else {
                return Ok(());
            };
            let head = chain::collect(c, MAX_DESCS, rxq.index, &mut self.descs)
                .map_err(|e| format!("virtio-net: {e}"))?;
            if self.descs.iter().any(|d| !d.writable) {
                return Err(format!(
                    "virtio-net queue {}: receive chain {head} has a device-readable buffer",
                    rxq.index
                ));
            }
            let before = self.iovecs.len();
            let mut capacity = 0usize;
            let mut ok = true;
            for d in &self.descs {
                let len = usize::try_from(d.len).unwrap_or(usize::MAX);
                if push_iovecs(mem, d.addr, len, &mut self.iovecs).is_err() {
                    ok = false;
                    break;
                }
                capacity += len;
            }
            if !ok || capacity < VNET_HDR_LEN || self.iovecs.len() > MAX_IOVECS {
                // Unusable buffer: hand it back empty.
                self.iovecs.truncate(before);
                warn_ratelimited!(
                    "virtio-net queue {}: receive chain {head} is unusable (outside RAM or \
                     shorter than the header)",
                    rxq.index
                );
                rxq.queue
                    .add_used(mem, head, 0)
                    .map_err(|e| format!("virtio-net rx: used ring: {e}"))?;
                continue;
            }
            self.pool.push(RxChain {
                head,
                iovecs: self.iovecs.len() - before,
                capacity,
            });
            self.pool_capacity += capacity;
        }
    }

    /// Marks the first chains of the pool used by a frame of `n` bytes.
    fn use_rx(&mut self, rxq: &mut NetQueue, n: usize) -> Result<(), String> {
        let mem = &self.shared.mem;
        let mut left = n;
        let mut used = 0usize;
        let mut iovs = 0usize;
        while left > 0 && used < self.pool.len() {
            let c = &self.pool[used];
            left -= left.min(c.capacity);
            iovs += c.iovecs;
            used += 1;
        }
        let used = used.max(1);
        // num_buffers, bytes 10..12 of the header (in the first chain).
        let count = u16::try_from(used).unwrap_or(u16::MAX).to_le_bytes();
        write_iovecs(&self.iovecs[..self.pool[0].iovecs], 10, &count);
        let mut left = n;
        for c in &self.pool[..used] {
            let len = left.min(c.capacity);
            left -= len;
            rxq.queue
                .add_used(mem, c.head, u32::try_from(len).unwrap_or(u32::MAX))
                .map_err(|e| format!("virtio-net rx: used ring: {e}"))?;
            self.pool_capacity -= c.capacity;
        }
        self.pool.drain(..used);
        self.iovecs.drain(..iovs);
        self.shared.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.shared
            .stats
            .rx_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sends every available transmit chain to the tap, until the tap refuses one.
    fn serve_tx(&mut self) {
        if self.p.broken || self.want_out {
            return;
        }
        let Some(mut txq) = self.p.tx.take() else {
            return;
        };
        // Cloning the Arc, not the GuestMemory (whose clone allocates a region list).
        let shared = Arc::clone(&self.shared);
        let mem = &shared.mem;
        let mut sent = false;
        'outer: loop {
            if !self.retry_tx(&mut txq, mem, &mut sent) {
                break;
            }
            let _ = txq.queue.disable_notification(mem);
            loop {
                let n = match chain::pop_batch(
                    &mut txq.queue,
                    mem,
                    txq.index,
                    TX_BATCH,
                    MAX_DESCS,
                    &mut self.descs,
                    &mut self.taken,
                ) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        self.fail(&format!("virtio-net: {e}"));
                        break 'outer;
                    }
                };
                if let Some(t) = self.taken[..n]
                    .iter()
                    .find(|t| self.descs[t.descs.clone()].iter().any(|d| d.writable))
                {
                    let reason = format!(
                        "virtio-net queue {}: transmit chain {} has a device-writable buffer",
                        txq.index, t.head
                    );
                    self.fail(&reason);
                    break 'outer;
                }
                let more = if self.txring.is_some() {
                    self.send_batch(&mut txq, mem, n, &mut sent)
                } else {
                    self.send_each(&mut txq, mem, n, &mut sent)
                };
                if !more {
                    break 'outer;
                }
            }
            match txq.queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.fail(&format!("virtio-net tx: used ring: {e}"));
                    break;
                }
            }
        }
        if sent {
            signal_used(&mut txq.queue, mem, &self.shared.interrupt, txq.index);
        }
        self.p.tx = Some(txq);
    }

    /// Sends the `n` chains of the batch one writev each; false when the tap is full (the
    /// rest of the batch goes back to the available ring) or the queue broke.
    fn send_each(
        &mut self,
        txq: &mut NetQueue,
        mem: &GuestMemory,
        n: usize,
        sent: &mut bool,
    ) -> bool {
        for i in 0..n {
            let Taken { head, descs } = self.taken[i].clone();
            match self.send_one(txq, mem, head, descs, sent) {
                Ok(true) => {}
                Ok(false) => {
                    // Retry this chain and the rest of the batch when the tap can take more.
                    let back = u16::try_from(n - i).unwrap_or(u16::MAX);
                    txq.queue
                        .set_next_avail(txq.queue.next_avail().wrapping_sub(back));
                    self.want_out = true;
                    return false;
                }
                Err(()) => return false,
            }
        }
        true
    }

    /// Sends the chain whose descriptors are `self.descs[descs]` with one writev and returns
    /// it to the driver (also when its frame is dropped); `Ok(false)` when the tap cannot
    /// take it now (the chain stays unused), `Err` when the queue broke.
    fn send_one(
        &mut self,
        txq: &mut NetQueue,
        mem: &GuestMemory,
        head: u16,
        descs: std::ops::Range<usize>,
        sent: &mut bool,
    ) -> Result<bool, ()> {
        match self.send(head, descs) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(()) => {
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.tx_used(txq, mem, head, sent) {
            Ok(true)
        } else {
            Err(())
        }
    }

    /// Sends the `n` chains of the batch through the transmit ring in one system call;
    /// false when the tap refused some for now (they wait in `tx_retry`) or the queue broke.
    fn send_batch(
        &mut self,
        txq: &mut NetQueue,
        mem: &GuestMemory,
        n: usize,
        sent: &mut bool,
    ) -> bool {
        let Some(ring) = self.txring.as_mut() else {
            return self.send_each(txq, mem, n, sent);
        };
        let mut sizes = [0usize; TX_BATCH];
        for (i, t) in self.taken[..n].iter().enumerate() {
            let v = ring.frame(i);
            match map_frame(mem, &self.descs[t.descs.clone()], t.head, v) {
                Ok(len) => sizes[i] = len,
                // Dropped: left out of the batch.
                Err(()) => v.clear(),
            }
        }
        // A tap whose send buffer is limited can refuse a frame and take the next: keep
        // the batch in order there (the default, unlimited, tap never refuses for room).
        let in_order = self.tap.send_buffer_limited();
        // SAFETY: the iovecs point into guest memory, which stays mapped while `mem` lives.
        if let Err(e) = unsafe { ring.run_batch(self.tap.fd(), n, false, in_order) } {
            warn_ratelimited!(
                "virtio-net: tap {}: batched transmission failed ({e}); writing frames one at \
                 a time from now on",
                self.tap.name()
            );
            self.txring = None;
            // What this batch became is unknown: it counts as dropped.
            for i in 0..n {
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                if !self.tx_used(txq, mem, self.taken[i].head, sent) {
                    return false;
                }
            }
            return true;
        }
        // Read out first: the loop may give up the ring.
        let mut results = [None; TX_BATCH];
        for (i, r) in results[..n].iter_mut().enumerate() {
            *r = ring.result(i);
        }
        for (i, (result, size)) in results[..n].iter().zip(sizes).enumerate() {
            let head = self.taken[i].head;
            match *result {
                Some(Sent::Done(_)) => {
                    self.shared.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .stats
                        .tx_bytes
                        .fetch_add(size as u64, Ordering::Relaxed);
                }
                Some(Sent::Again | Sent::Cancelled) => {
                    // Sent again first, in order, once the tap can take more (a refused
                    // frame, or one an in-order batch did not try after it).
                    let descs = self.descs[self.taken[i].descs.clone()].to_vec();
                    self.tx_retry.push_back((head, descs));
                    self.want_out = true;
                    continue;
                }
                Some(Sent::Refused(libc::EOPNOTSUPP)) => {
                    // A kernel whose tap cannot say EAGAIN without blocking: writev instead.
                    self.txring = None;
                    let descs = self.taken[i].descs.clone();
                    match self.send(head, descs.clone()) {
                        Ok(true) => {}
                        Ok(false) => {
                            let descs = self.descs[descs].to_vec();
                            self.tx_retry.push_back((head, descs));
                            self.want_out = true;
                            continue;
                        }
                        Err(()) => {
                            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some(Sent::Refused(errno)) => {
                    // The tap refuses malformed frames (a bad GSO header, say): drop it.
                    warn_ratelimited!(
                        "virtio-net: tap {}: write: {}",
                        self.tap.name(),
                        std::io::Error::from_raw_os_error(errno)
                    );
                    self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !self.tx_used(txq, mem, head, sent) {
                return false;
            }
        }
        !self.want_out
    }

    /// Sends the chains the tap refused earlier, in order; false while it still refuses
    /// them or the queue broke.
    fn retry_tx(&mut self, txq: &mut NetQueue, mem: &GuestMemory, sent: &mut bool) -> bool {
        while let Some((head, descs)) = self.tx_retry.pop_front() {
            self.descs.clear();
            self.descs.extend_from_slice(&descs);
            match self.send_one(txq, mem, head, 0..descs.len(), sent) {
                Ok(true) => {}
                Ok(false) => {
                    self.tx_retry.push_front((head, descs));
                    self.want_out = true;
                    return false;
                }
                Err(()) => return false,
            }
        }
        true
    }

    /// Returns transmit chain `head` to the driver.
    fn tx_used(
        &mut self,
        txq: &mut NetQueue,
        mem: &GuestMemory,
        head: u16,
        sent: &mut bool,
    ) -> bool {
        *sent = true;
        if let Err(e) = txq.queue.add_used(mem, head, 0) {
            self.fail(&format!("virtio-net tx: used ring: {e}"));
            return false;
        }
        true
    }

    /// On stop: frames still waiting for the tap are dropped, so the driver gets its buffers
    /// back.
    fn drop_retries(&mut self) {
        if self.tx_retry.is_empty() {
            return;
        }
        let Some(mut txq) = self.p.tx.take() else {
            return;
        };
        // Cloning the Arc, not the GuestMemory (whose clone allocates a region list).
        let shared = Arc::clone(&self.shared);
        let mem = &shared.mem;
        let mut sent = false;
        while let Some((head, _)) = self.tx_retry.pop_front() {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if !self.tx_used(&mut txq, mem, head, &mut sent) {
                break;
            }
        }
        if sent {
            signal_used(&mut txq.queue, mem, &self.shared.interrupt, txq.index);
        }
        self.p.tx = Some(txq);
    }

    /// Writes the frame in `self.descs[descs]`; `Ok(false)` when the tap cannot take it now,
    /// `Err` when the frame is dropped.
    fn send(&mut self, head: u16, descs: std::ops::Range<usize>) -> Result<bool, ()> {
        let total = map_frame(&self.shared.mem, &self.descs[descs], head, &mut self.iovecs)?;
        let r = self.tap.write_frame(&self.iovecs);
        self.iovecs.clear();
        match r {
            Ok(None) => Ok(false),
            Ok(Some(_)) => {
                self.shared.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .stats
                    .tx_bytes
                    .fetch_add(total as u64, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                // The tap refuses malformed frames (a bad GSO header, say): drop this one.
                warn_ratelimited!("virtio-net: tap {}: write: {e}", self.tap.name());
                Err(())
            }
        }
    }

    /// Answers control-queue commands (only VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET is supported).
    fn serve_ctrl(&mut self) {
        if self.p.broken {
            return;
        }
        let Some(mut cq) = self.p.ctrl.take() else {
            return;
        };
        // Cloning the Arc, not the GuestMemory (whose clone allocates a region list).
        let shared = Arc::clone(&self.shared);
        let mem = &shared.mem;
        let mut answered = false;
        loop {
            let c = match chain::pop(&mut cq.queue, mem, cq.index) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    self.fail(&format!("virtio-net: {e}"));
                    break;
                }
            };
            let head = match chain::collect(c, MAX_DESCS, cq.index, &mut self.descs) {
                Ok(h) => h,
                Err(e) => {
                    self.fail(&format!("virtio-net: {e}"));
                    break;
                }
            };
            let Some(ack) = ack_address(&self.descs) else {
                self.fail(&format!(
                    "virtio-net control queue: command {head} has no writable ack byte"
                ));
                break;
            };
            let status = self.command();
            let _ = mem.write_obj(status, ack);
            if let Err(e) = cq.queue.add_used(mem, head, 1) {
                self.fail(&format!("virtio-net control queue: used ring: {e}"));
                break;
            }
            answered = true;
        }
        if answered {
            signal_used(&mut cq.queue, mem, &self.shared.interrupt, cq.index);
        }
        self.p.ctrl = Some(cq);
    }

    /// Runs the command in `self.descs`; returns the ack byte.
    fn command(&self) -> u8 {
        const OK: u8 = 0;
        const ERR: u8 = 1;
        let mut cmd = [0u8; 4];
        if read_stream(&self.shared.mem, &self.descs, 0, &mut cmd).is_err() {
            return ERR;
        }
        let (class, code) = (u32::from(cmd[0]), u32::from(cmd[1]));
        if class != vn::VIRTIO_NET_CTRL_MQ || code != vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {
            return ERR;
        }
        let pairs = u16::from_le_bytes([cmd[2], cmd[3]]);
        let max = u16::try_from(self.shared.taps.len()).unwrap_or(u16::MAX);
        if !self.shared.mq || pairs == 0 || pairs > max {
            return ERR;
        }
        set_active_pairs(&self.shared.taps, pairs);
        self.shared.active_pairs.store(pairs, Ordering::Release);
        OK
    }
}

/// Attaches the first `pairs` tap queues and detaches the rest.
pub(crate) fn set_active_pairs(taps: &[Arc<Tap>], pairs: u16) {
    for (i, t) in taps.iter().enumerate() {
        let on = i < usize::from(pairs);
        if let Err(e) = t.set_queue_enabled(on) {
            warn_ratelimited!("virtio-net: {e}");
        }
    }
}

/// The last byte of the chain, if it is device-writable.
fn ack_address(descs: &[Desc]) -> Option<GuestAddress> {
    let last = descs.last()?;
    if !last.writable || last.len == 0 {
        return None;
    }
    last.addr
        .0
        .checked_add(u64::from(last.len) - 1)
        .map(GuestAddress)
}

/// Maps a transmit chain's buffers into `out` (cleared first); returns the frame's length
/// with its header, or `Err` (logged) when a buffer lies outside RAM or the length is wrong.
fn map_frame(
    mem: &GuestMemory,
    descs: &[Desc],
    head: u16,
    out: &mut Vec<libc::iovec>,
) -> Result<usize, ()> {
    out.clear();
    let mut total = 0usize;
    for d in descs {
        let len = usize::try_from(d.len).unwrap_or(usize::MAX);
        if push_iovecs(mem, d.addr, len, out).is_err() {
            warn_ratelimited!("virtio-net: transmit chain {head} has a buffer outside RAM");
            return Err(());
        }
        total = total.saturating_add(len);
    }
    if !(VNET_HDR_LEN..=BIG_FRAME).contains(&total) || out.len() > MAX_IOVECS {
        warn_ratelimited!("virtio-net: transmit chain {head} has a bad length {total}");
        return Err(());
    }
    Ok(total)
}

/// Writes `data` at byte `offset` of the memory `iovecs` describe.
fn write_iovecs(iovecs: &[libc::iovec], mut offset: usize, data: &[u8]) {
    let mut done = 0;
    for v in iovecs {
        if done == data.len() {
            return;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(data.len() - done);
        for i in 0..n {
            // SAFETY: the iovec describes writable guest memory (mapped while the worker holds
            // `mem`) and offset + i < iov_len; volatile because the guest may look at it.
            unsafe {
                std::ptr::write_volatile(v.iov_base.cast::<u8>().add(offset + i), data[done + i])
            };
        }
        done += n;
        offset = 0;
    }
}
