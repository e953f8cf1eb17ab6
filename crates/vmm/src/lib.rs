//! kiln's VMM: the VM description ([`config::VmConfig`]), the builder that turns it into a
//! running VM ([`vm::Vm`]), vCPU threads and the event loop.

mod builder;
pub mod chips;
pub mod config;
pub mod console;
pub mod decompress;
pub mod devices;
pub mod error;
pub mod events;
pub mod interrupts;
pub mod loader;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

pub use config::{PartialConfig, VmConfig};
pub use error::VmError;
pub use vm::{run, Vm, VmOutcome};
