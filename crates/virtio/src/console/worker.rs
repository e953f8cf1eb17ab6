//! The console's thread: guest output (transmit queue) to the backend, backend input into
//! the receive queue, and socket clients coming and going.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_devices::virtio::{GuestMemory, VirtioInterrupt};
use kiln_devices::warn_ratelimited;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::Backend;
use crate::common::chain::{self, write_stream, Desc};
use crate::common::signal_used;
use crate::common::worker::{Poller, StopSignal};

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_INPUT: u64 = 2;
const TOKEN_LISTEN: u64 = 3;
const TOKEN_STOP: u64 = 4;

/// Most descriptors in one chain.
const MAX_DESCS: usize = 256;
/// Bytes moved per copy.
const CHUNK: usize = 4096;

/// One virtqueue.
pub(crate) struct ConsoleQueue {
    pub index: u16,
    pub queue: Queue,
    pub notify: EventFd,
}

/// The queues and what the thread owns; handed back when it stops.
pub(crate) struct ConsoleQueues {
    pub rx: Option<ConsoleQueue>,
    pub tx: Option<ConsoleQueue>,
    pub broken: bool,
}

/// What the thread shares with the device (the backend also serves emergency writes).
pub(crate) struct Shared {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub backend: Arc<Mutex<Backend>>,
}

impl Shared {
    fn backend(&self) -> MutexGuard<'_, Backend> {
        // A panic while writing leaves the backend usable.
        self.backend.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct ConsoleWorker {
    q: ConsoleQueues,
    shared: Arc<Shared>,
    descs: Vec<Desc>,
    buf: Vec<u8>,
    /// Receive buffers exist: watch the input.
    want_in: bool,
    /// The input descriptor (and its generation) registered with epoll.
    input: Option<(RawFd, u64)>,
}

/// Serves the console queues until `stop` is requested.
pub(crate) fn run(q: ConsoleQueues, shared: Arc<Shared>, stop: &StopSignal) -> ConsoleQueues {
    let mut w = ConsoleWorker {
        q,
        shared,
        descs: Vec::with_capacity(8),
        buf: vec![0u8; CHUNK],
        want_in: true,
        input: None,
    };
    let mut poller = match w.poller(stop) {
        Ok(p) => p,
        Err(e) => {
            w.fail(&format!("virtio-console: cannot poll: {e}"));
            return w.q;
        }
    };
    let mut events = [(0u64, EventSet::empty()); 8];
    loop {
        w.shared.backend().accept();
        w.serve_tx();
        if w.want_in {
            w.serve_rx();
        }
        w.update_interest(&poller);
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
                w.fail(&format!("virtio-console: epoll: {e}"));
                break;
            }
        };
        let mut stopping = false;
        for &(token, set) in &events[..n] {
            match token {
                TOKEN_RX => {
                    drain(&w.q.rx);
                    w.want_in = true;
                }
                TOKEN_TX => drain(&w.q.tx),
                TOKEN_INPUT => {
                    // Input (or its end, read as EOF) is taken by serve_rx while receive
                    // buffers exist; the descriptor is not watched otherwise.
                    if set.contains(EventSet::OUT) {
                        w.shared.backend().flush();
                    }
                }
                TOKEN_LISTEN => {}
                _ => stopping |= stop.requested(),
            }
        }
        if stopping {
            break;
        }
    }
    w.q
}

fn drain(q: &Option<ConsoleQueue>) {
    if let Some(q) = q {
        let _ = q.notify.read();
    }
}

impl ConsoleWorker {
    fn poller(&self, stop: &StopSignal) -> std::io::Result<Poller> {
        let p = Poller::new()?;
        if let Some(q) = &self.q.rx {
            p.add(q.notify.as_raw_fd(), TOKEN_RX)?;
        }
        if let Some(q) = &self.q.tx {
            p.add(q.notify.as_raw_fd(), TOKEN_TX)?;
        }
        if let Some(fd) = self.shared.backend().listener_fd() {
            p.add(fd, TOKEN_LISTEN)?;
        }
        p.add(stop.fd(), TOKEN_STOP)?;
        Ok(p)
    }

    /// Watches the current input descriptor for what the thread can act on.
    fn update_interest(&mut self, poller: &Poller) {
        let b = self.shared.backend();
        let current = b.input_fd().map(|fd| (fd, b.input_generation()));
        let mut set = EventSet::empty();
        if self.want_in && self.q.rx.is_some() && !self.q.broken {
            set |= EventSet::IN;
        }
        if b.output_blocked() {
            set |= EventSet::OUT;
        }
        drop(b);
        // With nothing to watch for, the descriptor is not registered at all: a hang-up is
        // reported whatever the interest, and unread input must wait for receive buffers.
        let wanted = current.filter(|_| !set.is_empty());
        if wanted != self.input {
            if let Some((fd, _)) = self.input.take() {
                poller.remove(fd);
            }
            if let Some((fd, _)) = wanted {
                if poller.add_events(fd, TOKEN_INPUT, set).is_ok() {
                    self.input = wanted;
                }
            }
        } else if let Some((fd, _)) = wanted {
            let _ = poller.modify(fd, TOKEN_INPUT, set);
        }
    }

    fn fail(&mut self, reason: &str) {
        if !self.q.broken {
            self.q.broken = true;
            self.shared.interrupt.needs_reset(reason);
        }
    }

    /// Sends guest output to the backend while it takes it.
    fn serve_tx(&mut self) {
        if self.q.broken {
            return;
        }
        let Some(mut tq) = self.q.tx.take() else {
            return;
        };
        // Cloning the Arc, not the GuestMemory (whose clone allocates a region list).
        let shared = Arc::clone(&self.shared);
        let mem = &shared.mem;
        let mut used = false;
        'outer: loop {
            let _ = tq.queue.disable_notification(mem);
            loop {
                if !self.shared.backend().can_take_output() {
                    // The client is not reading: continue when it does.
                    break 'outer;
                }
                let c = match chain::pop(&mut tq.queue, mem, tq.index) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(&format!("virtio-console: {e}"));
                        break 'outer;
                    }
                };
                let head = match chain::collect(c, MAX_DESCS, tq.index, &mut self.descs) {
                    Ok(h) => h,
                    Err(e) => {
                        self.fail(&format!("virtio-console: {e}"));
                        break 'outer;
                    }
                };
                if self.descs.iter().any(|d| d.writable) {
                    self.fail(&format!(
                        "virtio-console: transmit chain {head} has a device-writable buffer"
                    ));
                    break 'outer;
                }
                self.output(head);
                if let Err(e) = tq.queue.add_used(mem, head, 0) {
                    self.fail(&format!("virtio-console: used ring: {e}"));
                    break 'outer;
                }
                used = true;
            }
            match tq.queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.fail(&format!("virtio-console: used ring: {e}"));
                    break;
                }
            }
        }
        if used {
            signal_used(&mut tq.queue, mem, &self.shared.interrupt, tq.index);
        }
        self.q.tx = Some(tq);
    }

    /// Copies the readable buffers of the chain in `self.descs` to the backend.
    fn output(&mut self, head: u16) {
        let mem = &self.shared.mem;
        let mut backend = self.shared.backend();
        for d in &self.descs {
            let mut off = 0u64;
            let len = u64::from(d.len);
            while off < len {
                let n = usize::try_from(len - off).map_or(CHUNK, |r| r.min(CHUNK));
                let Some(addr) = d.addr.0.checked_add(off) else {
                    break;
                };
                if mem
                    .read_slice(&mut self.buf[..n], vm_memory::GuestAddress(addr))
                    .is_err()
                {
                    warn_ratelimited!(
                        "virtio-console: transmit chain {head} has a buffer outside RAM"
                    );
                    return;
                }
                if let Err(e) = backend.write(&self.buf[..n]) {
                    warn_ratelimited!("virtio-console: output: {e}");
                    return;
                }
                off += n as u64;
            }
        }
    }

    /// Moves backend input into receive buffers while both last.
    fn serve_rx(&mut self) {
        if self.q.broken || self.shared.backend().input_fd().is_none() {
            return;
        }
        let Some(mut rq) = self.q.rx.take() else {
            return;
        };
        // Cloning the Arc, not the GuestMemory (whose clone allocates a region list).
        let shared = Arc::clone(&self.shared);
        let mem = &shared.mem;
        let mut used = false;
        loop {
            let _ = rq.queue.disable_notification(mem);
            let c = match chain::pop(&mut rq.queue, mem, rq.index) {
                Ok(Some(c)) => c,
                Ok(None) => match rq.queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {
                        // Out of buffers: stop watching the input until the driver adds some.
                        self.want_in = false;
                        break;
                    }
                    Err(e) => {
                        self.fail(&format!("virtio-console: used ring: {e}"));
                        break;
                    }
                },
                Err(e) => {
                    self.fail(&format!("virtio-console: {e}"));
                    break;
                }
            };
            let head = match chain::collect(c, MAX_DESCS, rq.index, &mut self.descs) {
                Ok(h) => h,
                Err(e) => {
                    self.fail(&format!("virtio-console: {e}"));
                    break;
                }
            };
            if self.descs.iter().any(|d| !d.writable) {
                self.fail(&format!(
                    "virtio-console: receive chain {head} has a device-readable buffer"
                ));
                break;
            }
            let room: u64 = self.descs.iter().map(|d| u64::from(d.len)).sum();
            let room = usize::try_from(room).map_or(CHUNK, |r| r.min(CHUNK));
            let got = self.shared.backend().read(&mut self.buf[..room]);
            let Some(n) = got.filter(|&n| n > 0) else {
                // Nothing to read: give the chain back.
                rq.queue
                    .set_next_avail(rq.queue.next_avail().wrapping_sub(1));
                break;
            };
            let n = if write_stream(mem, &self.descs, &self.buf[..n]).is_ok() {
                n
            } else {
                warn_ratelimited!("virtio-console: receive chain {head} is outside RAM");
                0
            };
            if let Err(e) = rq.queue.add_used(mem, head, u32::try_from(n).unwrap_or(0)) {
                self.fail(&format!("virtio-console: used ring: {e}"));
                break;
            }
            used = true;
        }
        if used {
            signal_used(&mut rq.queue, mem, &self.shared.interrupt, rq.index);
        }
        self.q.rx = Some(rq);
    }
}
