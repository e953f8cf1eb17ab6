//! Legacy PC devices.

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod serial;

pub use acpi_pm::{AcpiPm, AcpiPmState};
pub use cmos::{Cmos, CmosState};
pub use i8042::{I8042State, I8042};
pub use serial::{SerialPort, SerialPortState};
