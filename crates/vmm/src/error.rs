//! Errors building or running a VM.

use kiln_arch::{acpi, boot, cpuid, regs};

use crate::loader::LoaderError;
use crate::memory::MemoryError;
use crate::vcpu::VcpuStop;
use crate::vcpu_state::VcpuStateError;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device cannot be used.
    #[error("cannot open {path} ({source}): kiln needs KVM: load the kvm module and make {path} readable and writable by this user")]
    KvmUnavailable {
        /// The device path (`/dev/kvm`, or `KILN_KVM_DEVICE`).
        path: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks something kiln needs.
    #[error("KVM on this host lacks {0}")]
    MissingCapability(&'static str),
    /// A KVM call failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than KVM allows.
    #[error("--cpus {asked}: KVM on this host allows at most {max} vCPUs")]
    TooManyCpus {
        /// Asked.
        asked: u32,
        /// KVM's limit.
        max: usize,
    },
    /// More RAM than the host can address.
    #[error("--memory {memory}: guest RAM would end at {end:#x}, beyond this host's {bits}-bit physical address space")]
    MemoryBeyondPhysBits {
        /// Memory size as given.
        memory: crate::config::MemorySize,
        /// End of guest RAM.
        end: u64,
        /// Host physical address bits.
        bits: u32,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel or initrd.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Boot information.
    #[error(transparent)]
    BootInfo(#[from] boot::BootInfoError),
    /// Boot registers.
    #[error(transparent)]
    BootRegs(#[from] regs::BootWriteError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// The in-kernel interrupt controllers and timers.
    #[error(transparent)]
    Chips(#[from] crate::chips::ChipsError),
    /// Device wiring.
    #[error("device setup: {0}")]
    Bus(#[from] kiln_devices::BusError),
    /// A `--disk`.
    #[error("--disk {}", path.display())]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: kiln_virtio::block::BlockError,
    },
    /// A `--net`.
    #[error("--net tap={tap}")]
    Net {
        /// The tap.
        tap: String,
        /// Why.
        #[source]
        source: kiln_virtio::net::NetError,
    },
    /// The `--console`.
    #[error("--console")]
    Console(#[source] kiln_virtio::console::ConsoleError),
    /// PCI or virtio devices.
    #[error(transparent)]
    Devices(#[from] crate::devices::DeviceError),
    /// A virtio device failed to pause, resume or report its state.
    #[error(transparent)]
    Virtio(#[from] kiln_devices::virtio::VirtioError),
    /// The serial output file.
    #[error("cannot open serial output file {path}")]
    SerialFile {
        /// File.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An OS call failed.
    #[error("{what}")]
    Os {
        /// What kiln was doing.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU stopped on an error.
    #[error(transparent)]
    Vcpu(#[from] VcpuStop),
    /// vCPU state could not be read or written.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// Saved state does not fit this VM.
    #[error("saved state does not fit this VM: {0}")]
    StateMismatch(String),
    /// vCPUs did not acknowledge a pause or resume.
    #[error("{0} vCPUs did not acknowledge within 10 s")]
    VcpuTimeout(usize),
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub(crate) fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}
