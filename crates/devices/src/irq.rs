//! Interrupt lines: eventfds the VMM registers with KVM as irqfds.
//!
//! - [`IrqLine`] is an edge: each write to the eventfd pulses the GSI (KVM raises and lowers
//!   it at once). The 16550 and the i8042 use it: they sit on ISA IRQs that the MADT leaves
//!   edge-triggered, and their drivers loop on the device's status until nothing is pending,
//!   so a pulse that arrives while the guest is still in the handler is not lost.
//! - [`LevelIrqLine`] is a level-triggered line (PCI INTx, virtio-mmio): the irqfd is
//!   registered with `KVM_IRQFD_FLAG_RESAMPLE`. A write to the trigger eventfd raises the GSI
//!   and KVM holds it high; when the guest EOIs the interrupt, KVM lowers the line and
//!   signals the resample eventfd. Whoever watches that eventfd (the VMM thread) calls
//!   [`Resample::resample`], which raises the line again if the device still has an
//!   interrupt pending. That is what a level-triggered pin means: an interrupt that arrives
//!   while the guest is still handling the previous one on the pin is delivered after its
//!   EOI instead of being lost, and one the driver acknowledged (read the ISR) is not.

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line: an eventfd the VMM registers as a plain KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The eventfd, to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A level-triggered interrupt line: a trigger eventfd and a resample eventfd that the VMM
/// registers together as a KVM resample irqfd (see the module documentation).
#[derive(Debug)]
pub struct LevelIrqLine {
    trigger: EventFd,
    resample: EventFd,
}

impl LevelIrqLine {
    /// A line raised through `trigger`; KVM signals `resample` after each EOI.
    pub fn new(trigger: EventFd, resample: EventFd) -> Self {
        Self { trigger, resample }
    }

    /// Raises the line; KVM keeps it high until the guest EOIs the interrupt.
    pub fn assert(&self) -> std::io::Result<()> {
        self.trigger.write(1)
    }

    /// The trigger eventfd, to register with KVM.
    pub fn trigger_fd(&self) -> &EventFd {
        &self.trigger
    }

    /// The resample eventfd, to register with KVM and to watch.
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }
}

/// A device's side of a level-triggered line: it knows whether it still asserts the line.
/// The VMM polls [`LevelIrqLine::resample_fd`] of [`Resample::line`] and calls
/// [`Resample::resample`] when it becomes readable.
pub trait Resample: Send + Sync {
    /// The line.
    fn line(&self) -> &LevelIrqLine;

    /// Whether the device asserts the line now (an interrupt is pending and not masked).
    fn pending(&self) -> bool;

    /// The guest EOI'd the line and KVM lowered it: consumes the resample event, then raises
    /// the line again if the device still has an interrupt pending. Returns whether it did.
    ///
    /// The event is consumed before `pending` is read, so an interrupt raised in between is
    /// never lost: either it raised the line itself (KVM had already lowered it) or it is
    /// seen here.
    fn resample(&self) -> std::io::Result<bool> {
        match self.line().resample_fd().read() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if self.pending() {
            self.line().assert()?;
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    struct Fake {
        line: LevelIrqLine,
        pending: AtomicBool,
    }

    impl Resample for Fake {
        fn line(&self) -> &LevelIrqLine {
            &self.line
        }
        fn pending(&self) -> bool {
            self.pending.load(Ordering::Acquire)
        }
    }

    fn efd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn resample_reasserts_only_while_pending_and_consumes_the_event() {
        let f = Fake {
            line: LevelIrqLine::new(efd(), efd()),
            pending: AtomicBool::new(true),
        };
        f.line.resample_fd().write(1).unwrap();
        assert!(f.resample().unwrap());
        assert_eq!(f.line.trigger_fd().read().unwrap(), 1);
        assert!(f.line.resample_fd().read().is_err(), "event consumed");
        f.pending.store(false, Ordering::Release);
        f.line.resample_fd().write(1).unwrap();
        assert!(!f.resample().unwrap());
        assert!(f.line.trigger_fd().read().is_err(), "no trigger");
    }
}
