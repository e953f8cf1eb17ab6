//! Device worker threads: started on activation or resume, stopped on pause or reset. A worker
//! owns what it serves (queues, backend handles) and hands it back when it stops, so pause is
//! "stop and keep", resume is "start again with what was kept", and reset is "stop and drop".

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_devices::virtio::VirtioError;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Asks a worker to stop: a flag, and an eventfd the worker polls.
#[derive(Debug)]
pub(crate) struct StopSignal {
    evt: EventFd,
    flag: AtomicBool,
}

impl StopSignal {
    fn new() -> std::io::Result<Self> {
        Ok(StopSignal {
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            flag: AtomicBool::new(false),
        })
    }

    /// A signal already raised: a worker given it serves what is waiting once, finishes
    /// what it started and returns (the fuzzing entry points run workers this way).
    pub fn raised() -> std::io::Result<Self> {
        let s = Self::new()?;
        s.request();
        Ok(s)
    }

    /// The eventfd to poll.
    pub fn fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// Whether a stop was asked (also clears the eventfd).
    pub fn requested(&self) -> bool {
        let _ = self.evt.read();
        self.flag.load(Ordering::Acquire)
    }

    fn request(&self) {
        self.flag.store(true, Ordering::Release);
        // If the write fails the counter is already at its maximum: the worker wakes anyway.
        let _ = self.evt.write(1);
    }
}

/// A running worker that returns a `T` when stopped.
pub(crate) struct Worker<T> {
    stop: Arc<StopSignal>,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> Worker<T> {
    /// Starts `body` on a new thread called `name`.
    pub fn spawn(
        device: &'static str,
        name: String,
        body: impl FnOnce(&StopSignal) -> T + Send + 'static,
    ) -> Result<Self, VirtioError> {
        let err = |e: std::io::Error| VirtioError::Worker {
            device,
            reason: format!("cannot start {name}: {e}"),
        };
        let stop = Arc::new(StopSignal::new().map_err(err)?);
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || body(&s))
            .map_err(err)?;
        Ok(Worker { stop, handle })
    }

    /// Asks the worker to stop and waits for what it hands back.
    pub fn stop(self, device: &'static str) -> Result<T, VirtioError> {
        self.stop.request();
        self.handle.join().map_err(|_| VirtioError::Worker {
            device,
            reason: "worker thread panicked".into(),
        })
    }
}

/// Stops every worker, returning what each handed back (the first failure wins, after all
/// were stopped).
pub(crate) fn stop_all<T: Send + 'static>(
    workers: Vec<Worker<T>>,
    device: &'static str,
) -> Result<Vec<T>, VirtioError> {
    for w in &workers {
        w.stop.request();
    }
    let mut out = Vec::with_capacity(workers.len());
    let mut first_err = None;
    for w in workers {
        match w.stop(device) {
            Ok(t) => out.push(t),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// A small epoll wrapper with u64 tokens.
pub(crate) struct Poller {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl Poller {
    /// An empty poller.
    pub fn new() -> std::io::Result<Self> {
        Ok(Poller {
            epoll: Epoll::new()?,
            events: vec![EpollEvent::default(); 16],
        })
    }

    /// Watches `fd` for input.
    pub fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        self.add_events(fd, token, EventSet::IN)
    }

    /// Watches `fd` for `events`.
    pub fn add_events(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes what `fd` is watched for (an empty set pauses it).
    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stops watching `fd` (a no-op for a descriptor already closed).
    pub fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Waits up to `timeout_ms` (-1: forever) and returns the ready (token, events) pairs.
    pub fn wait(
        &mut self,
        timeout_ms: i32,
    ) -> std::io::Result<impl Iterator<Item = (u64, EventSet)> + '_> {
        let n = loop {
            match self.epoll.wait(timeout_ms, &mut self.events) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        Ok(self.events[..n].iter().map(|e| (e.data(), e.event_set())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_worker_hands_back_its_state() {
        let w = Worker::spawn("test", "t".into(), |stop: &StopSignal| {
            let mut p = Poller::new().unwrap();
            p.add(stop.fd(), 1).unwrap();
            let mut wakes = 0u32;
            loop {
                wakes += u32::try_from(p.wait(-1).unwrap().count()).unwrap();
                if stop.requested() {
                    return wakes;
                }
            }
        })
        .unwrap();
        assert!(w.stop("test").unwrap() >= 1);
    }

    #[test]
    fn panicking_worker_is_an_error_not_a_panic() {
        let w = Worker::spawn("test", "t".into(), |_: &StopSignal| -> u32 {
            panic!("boom");
        })
        .unwrap();
        assert!(matches!(w.stop("test"), Err(VirtioError::Worker { .. })));
    }
}
