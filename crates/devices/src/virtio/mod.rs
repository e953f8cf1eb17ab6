//! The virtio device model: what a device (block, net, rng, console, ...) implements, and
//! what a transport (virtio-pci, virtio-mmio) gives it.
//!
//! A transport owns everything the driver configures through it (feature negotiation,
//! device status, queue addresses and sizes, interrupt vectors). When the driver sets
//! DRIVER_OK, the transport calls [`VirtioDevice::activate`] with the negotiated features,
//! guest memory, one [`ActiveQueue`] per enabled queue (the `virtio-queue` state plus the
//! eventfd the guest's notifications arrive on; the VMM registers it as a KVM ioeventfd)
//! and a [`VirtioInterrupt`] to signal the driver. The device then serves its queues,
//! usually on its own I/O thread, until [`VirtioDevice::reset`].
//!
//! The guest is hostile: a device checks every descriptor through `virtio-queue` and guest
//! memory accessors. A malformed request that cannot be answered makes the device call
//! [`VirtioInterrupt::needs_reset`]; the transport then sets DEVICE_NEEDS_RESET and the
//! driver must reset the device. Nothing a guest does may panic or stop the VMM.

pub mod mmio;
pub mod pci;
pub mod transport;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap;

/// Device IDs (virtio 1.2, section 5).
pub mod ids {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// vsock.
    pub const VSOCK: u32 = 19;
}

/// Feature bits shared by all devices (virtio 1.2, section 6).
pub mod features {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// A modern (1.x) device. Every kiln device offers it; transports require it.
    pub const VERSION_1: u64 = 1 << 32;
    /// The device honours the platform's IOMMU (not offered by kiln).
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueues (not offered by kiln).
    pub const RING_PACKED: u64 = 1 << 34;
    /// Buffers are used in the order they were made available.
    pub const IN_ORDER: u64 = 1 << 35;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: the device may run.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from; the driver must reset it.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// What a device asks its transport to deliver to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device configuration changed (e.g. a disk was resized).
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// Signals the driver. Implemented by each transport: virtio-pci maps queues to MSI-X
/// vectors, virtio-mmio raises its interrupt line and sets the ISR bits.
pub trait VirtioInterrupt: Send + Sync {
    /// Delivers `kind` (or marks it pending while its vector is masked).
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
    /// The device cannot go on: the transport sets DEVICE_NEEDS_RESET in the device status
    /// and sends a configuration interrupt. `reason` is logged (rate-limited).
    fn needs_reset(&self, reason: &str);
}

/// One queue the driver enabled, handed to the device at activation.
pub struct ActiveQueue {
    /// Queue index within the device.
    pub index: u16,
    /// The queue as the driver configured it.
    pub queue: virtio_queue::Queue,
    /// Signalled on each driver notification for this queue (a KVM ioeventfd).
    pub notify: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemory,
    /// Features both sides agreed on.
    pub features: u64,
    /// The driver's enabled queues, in index order.
    pub queues: Vec<ActiveQueue>,
    /// How to signal the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// Device errors.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The driver activated the device with a configuration it cannot run with.
    #[error("cannot activate {device}: {reason}")]
    BadActivation {
        /// Device name.
        device: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The device's worker could not be started or stopped.
    #[error("{device} worker: {reason}")]
    Worker {
        /// Device name.
        device: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Saving or restoring state failed.
    #[error("{device} state: {reason}")]
    State {
        /// Device name.
        device: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// An I/O error in the backend.
    #[error("{device} backend")]
    Io {
        /// Device name.
        device: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`ids`]).
    fn device_type(&self) -> u32;

    /// A short name for logs and errors (`"virtio-blk"`).
    fn name(&self) -> &'static str;

    /// The largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features the device offers (must include [`features::VERSION_1`]).
    fn features(&self) -> u64;

    /// Reads the device-specific configuration space. Bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space. Writes to read-only fields are
    /// ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: start serving `activation.queues`.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;

    /// The driver reset the device: stop serving queues and drop them, so the device can
    /// be activated again.
    fn reset(&mut self) -> Result<(), VirtioError>;

    /// Stops processing (workers idle, in-flight I/O finished) so that state can be saved.
    fn pause(&mut self) -> Result<(), VirtioError>;

    /// Resumes processing after [`VirtioDevice::pause`].
    fn resume(&mut self) -> Result<(), VirtioError>;

    /// The device's own state (configuration, backend position, queue progress kept by the
    /// worker) as serde data. Must only be called while paused. Transports save their own
    /// part (features, status, queue configuration) next to it.
    fn save_state(&self) -> Result<serde_json::Value, VirtioError>;

    /// Restores what [`VirtioDevice::save_state`] returned, before activation.
    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), VirtioError>;
}
