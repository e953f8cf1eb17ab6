//! The virtio-rng queue thread.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kiln_devices::virtio::{GuestMemory, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::MAX_BYTES_PER_REQUEST;
use crate::common::chain::{self, Desc};
use crate::common::signal_used;
use crate::common::worker::{Poller, StopSignal};

const TOKEN_QUEUE: u64 = 0;
const TOKEN_STOP: u64 = 1;
/// Most descriptors in one chain.
const MAX_DESCS: usize = 256;

/// The queue and what serving it needs; handed back when the thread stops.
pub(crate) struct RngQueue {
    pub queue: Queue,
    pub notify: EventFd,
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The driver broke the queue: nothing is served until a reset.
    pub broken: bool,
}

/// Fills `len` bytes of guest memory at `addr` with random bytes. False when the range is
/// not all guest RAM or the host has no entropy to give.
fn fill_random(mem: &GuestMemory, addr: GuestAddress, len: usize) -> bool {
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let Ok(slice) = slice else {
            return false;
        };
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < slice.len() {
            // SAFETY: `base..base + slice.len()` is a mapping of guest RAM that `guard` keeps
            // alive; getrandom writes at most the `slice.len() - done` bytes it is given.
            let n = unsafe { libc::getrandom(base.add(done).cast(), slice.len() - done, 0) };
            match usize::try_from(n) {
                Ok(n) if n > 0 => done += n,
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => return false,
            }
        }
    }
    true
}

impl RngQueue {
    /// Serves the queue until asked to stop.
    pub fn run(mut self, stop: &StopSignal) -> Self {
        let poller = Poller::new().and_then(|p| {
            p.add(self.notify.as_raw_fd(), TOKEN_QUEUE)?;
            p.add(stop.fd(), TOKEN_STOP)?;
            Ok(p)
        });
        let mut poller = match poller {
            Ok(p) => p,
            Err(e) => {
                self.interrupt
                    .needs_reset(&format!("cannot poll the queue: {e}"));
                return self;
            }
        };
        let mut descs = Vec::with_capacity(16);
        // Serving first also answers what the driver posted before activation.
        loop {
            if !self.broken {
                self.serve(&mut descs);
            }
            let Ok(events) = poller.wait(-1) else {
                return self;
            };
            let woke_for_stop = events.into_iter().any(|(t, _)| t == TOKEN_STOP);
            if woke_for_stop && stop.requested() {
                return self;
            }
            let _ = self.notify.read();
        }
    }

    /// Answers every available request.
    pub fn serve(&mut self, descs: &mut Vec<Desc>) {
        loop {
            // Notifications off while working; back on once the ring looks empty.
            let _ = self.queue.disable_notification(&self.mem);
            let served = match self.drain(descs) {
                Ok(n) => n,
                Err(reason) => {
                    self.broken = true;
                    self.interrupt.needs_reset(&reason);
                    return;
                }
            };
            if served > 0 {
                signal_used(&mut self.queue, &self.mem, &self.interrupt, 0);
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    self.broken = true;
                    self.interrupt.needs_reset(&format!("queue 0: {e}"));
                    return;
                }
            }
        }
    }

    fn drain(&mut self, descs: &mut Vec<Desc>) -> Result<usize, String> {
        let mut served = 0;
        while let Some(c) = chain::pop(&mut self.queue, &self.mem, 0).map_err(|e| e.to_string())? {
            let head = chain::collect(c, MAX_DESCS, 0, descs).map_err(|e| e.to_string())?;
            let mut budget = MAX_BYTES_PER_REQUEST;
            let mut written = 0u32;
            for d in descs.iter().filter(|d| d.writable) {
                let n = d.len.min(budget);
                if n == 0 {
                    break;
                }
                if !fill_random(&self.mem, d.addr, n as usize) {
                    return Err(format!(
                        "queue 0: buffer at {:#x} ({} bytes) is not in guest RAM",
                        d.addr.0, d.len
                    ));
                }
                written += n;
                budget -= n;
            }
            self.queue
                .add_used(&self.mem, head, written)
                .map_err(|e| format!("queue 0: {e}"))?;
            served += 1;
        }
        Ok(served)
    }
}
