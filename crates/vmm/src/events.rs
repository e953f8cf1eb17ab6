//! Events from vCPUs and devices to the VMM thread: a channel plus an eventfd that wakes
//! the VMM thread's epoll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use kiln_devices::{ExitHandle, ExitRequest};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::VcpuStop;

/// Something the VMM thread must react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off or asked for a reset.
    Exit(ExitRequest),
    /// A vCPU stopped because of an error.
    VcpuStopped(VcpuStop),
    /// A vCPU acknowledged a pause.
    VcpuPaused(u32),
    /// A vCPU acknowledged a resume.
    VcpuResumed(u32),
}

/// The sending side, cloned into every vCPU and device.
#[derive(Clone)]
pub struct VmEvents {
    tx: Sender<VmEvent>,
    wake: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
}

impl VmEvents {
    /// A new channel; the receiver goes to the VMM thread, with the eventfd it polls.
    pub fn new() -> std::io::Result<(VmEvents, Receiver<VmEvent>, Arc<EventFd>)> {
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok((
            VmEvents {
                tx,
                wake: wake.clone(),
                stopping: Arc::new(AtomicBool::new(false)),
            },
            rx,
            wake,
        ))
    }

    /// Whether the VM is ending (power-off, reset or a vCPU error was reported): vCPUs then
    /// stop running guest code at once rather than let the guest go on.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Sends `ev` and wakes the VMM thread.
    pub fn send(&self, ev: VmEvent) {
        if matches!(ev, VmEvent::Exit(_) | VmEvent::VcpuStopped(_)) {
            self.stopping.store(true, Ordering::Release);
        }
        if self.tx.send(ev).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

impl ExitHandle for VmEvents {
    fn request(&self, req: ExitRequest) {
        self.send(VmEvent::Exit(req));
    }
}
