//! kiln devices: address-range buses, the one trait every device implements, and the legacy
//! PC devices (16550 serial, i8042, CMOS RTC, ACPI power management).
//!
//! Devices know nothing about KVM. They raise interrupts through [`IrqLine`] (edge) or
//! [`LevelIrqLine`] (level, with [`Resample`]): eventfds the VMM wires to irqfds. They ask
//! for power-off or reset through [`ExitHandle`].

pub mod bus;
pub mod hooks;
mod irq;
pub mod legacy;
pub mod pci;
pub mod ratelimit;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use irq::{IrqLine, LevelIrqLine, Resample};

use std::sync::Arc;

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
