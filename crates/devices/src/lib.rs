//! kiln devices: address-range buses, the one trait every device implements, and the legacy
//! PC devices (16550 serial, i8042, CMOS RTC, ACPI power management).
//!
//! Devices know nothing about KVM. They raise interrupts through [`IrqLine`] (an eventfd the
//! VMM wires to an irqfd) and ask for power-off or reset through [`ExitHandle`].

pub mod bus;
pub mod hooks;
pub mod legacy;
pub mod pci;
pub mod ratelimit;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// What a device may ask of the whole VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitRequest {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or i8042 pulse).
    Reset,
}

/// Receives exit requests from devices; the VMM implements it.
pub trait ExitHandle: Send + Sync {
    /// Records `req` and wakes whoever ends the VM.
    fn request(&self, req: ExitRequest);
}

/// Shared handle to the VM's exit handler.
pub type SharedExitHandle = Arc<dyn ExitHandle>;

/// Test helpers shared by the device tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Mutex;

    use crate::{ExitHandle, ExitRequest};

    /// Records every exit request a device makes.
    #[derive(Default)]
    pub struct Exits(pub Mutex<Vec<ExitRequest>>);

    impl ExitHandle for Exits {
        fn request(&self, r: ExitRequest) {
            self.0.lock().unwrap().push(r);
        }
    }
}

/// An edge-triggered interrupt line: an eventfd the VMM registers as a KVM irqfd.
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
