//! PCI: the configuration header every function has ([`config`]), the root bus with its host
//! bridge, the 0xCF8/0xCFC ports and ECAM ([`root`]), and MSI-X ([`msix`]).
//!
//! kiln emulates one bus (bus 0). 00:00.0 is the host bridge; each device is function 0 of
//! its own slot. BARs are memory BARs that the VMM places at build time; a guest that moves
//! a BAR is followed (bus range and ioeventfds move with it) when the new place lies in a
//! PCI window and overlaps nothing, and otherwise the BAR stops decoding until the guest
//! puts it somewhere valid.

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarKind, BarSpec, PciConfig, PciConfigState, PciHeader};
pub use msix::{Msix, MsixState};
pub use root::{PciConfigIo, PciEcam, PciRoot, PciRootState, PciWindows};

/// PCI errors.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A BAR the header cannot hold.
    #[error("BAR {index} of {size:#x} bytes is not a valid BAR")]
    BadBar {
        /// BAR index.
        index: usize,
        /// Size asked for.
        size: u64,
    },
    /// The capability list is full.
    #[error("no room in configuration space for capability {id:#x} ({len} bytes)")]
    CapabilitySpace {
        /// Capability ID.
        id: u8,
        /// Its length.
        len: usize,
    },
    /// All 31 device slots of bus 0 are taken.
    #[error("PCI bus 0 is full")]
    BusFull,
    /// No room for a BAR in the PCI windows.
    #[error("no room for a {size:#x}-byte BAR in the PCI MMIO windows")]
    NoBarSpace {
        /// BAR size.
        size: u64,
    },
    /// A BAR could not be put on the MMIO bus.
    #[error("cannot map a BAR")]
    Bus(#[source] crate::BusError),
    /// MSI-X setup or routing failed.
    #[error("MSI-X: {what}")]
    Msix {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Saved state does not fit the device.
    #[error("saved PCI state does not fit: {0}")]
    BadState(String),
}

/// A PCI function. The root does the generic part of configuration space (through
/// [`PciDevice::config`]); a device reacts to its own capabilities in
/// [`PciDevice::write_config`] and serves its BARs.
pub trait PciDevice: Send {
    /// The configuration header.
    fn config(&self) -> &PciConfig;

    /// The configuration header, mutably.
    fn config_mut(&mut self) -> &mut PciConfig;

    /// A guest read of configuration space; `offset + data.len()` is within 4 KiB and
    /// naturally aligned.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    /// A guest write of configuration space.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }

    /// A guest read at `offset` in BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// A guest write at `offset` in BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// BAR `bar` now decodes at `addr` (or nowhere): move what depends on the address, such
    /// as ioeventfds.
    fn bar_moved(&mut self, bar: usize, addr: Option<u64>);
}

/// The host bridge at 00:00.0: a header and nothing else.
pub struct HostBridge {
    config: PciConfig,
}

/// Red Hat's vendor ID, and its ID for a generic PCIe host bridge: no operating system has
/// quirks for it.
const HOST_BRIDGE: PciHeader = PciHeader {
    vendor_id: 0x1b36,
    device_id: 0x0008,
    revision: 0,
    class: 0x06_0000,
    subsystem_vendor_id: 0x1b36,
    subsystem_id: 0,
};

impl HostBridge {
    /// The bridge.
    pub fn new() -> Self {
        HostBridge {
            config: PciConfig::new(&HOST_BRIDGE),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn bar_moved(&mut self, _bar: usize, _addr: Option<u64>) {}
}
