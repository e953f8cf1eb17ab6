//! What devices ask of the VMM beyond the buses: MSI routes with their irqfds, and ioeventfds.
//! Devices know nothing about KVM; the VMM implements these traits over its VM file
//! descriptor, and tests implement them with recorders.

use vmm_sys_util::eventfd::EventFd;

/// An MSI message, as the guest programs it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    /// Message address, low 32 bits.
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
}

/// Routes interrupt vectors to MSI messages. Each vector is a GSI with an eventfd
/// registered as its irqfd: writing the eventfd delivers the routed message without a
/// round trip through a vCPU thread.
pub trait MsiRouter: Send + Sync {
    /// Allocates a GSI and registers `irqfd` as its irqfd. No route yet.
    fn add_vector(&self, irqfd: &EventFd) -> std::io::Result<u32>;
    /// Routes `gsi` to `msg`.
    fn set_route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()>;
    /// Unregisters `irqfd` and frees `gsi` with its route.
    fn remove_vector(&self, gsi: u32, irqfd: &EventFd) -> std::io::Result<()>;
}

/// Where an ioeventfd listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    /// A guest-physical MMIO address.
    Mmio(u64),
    /// An I/O port.
    Pio(u64),
}

/// Registers eventfds that the hypervisor signals on guest writes to an address, so that a
/// queue notification never waits for a vCPU userspace exit.
pub trait IoEvents: Send + Sync {
    /// Signals `evt` on writes to `addr` (of any length when `datamatch` is `None`; of 4
    /// bytes with this value otherwise).
    fn register(
        &self,
        evt: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> std::io::Result<()>;
    /// Undoes [`IoEvents::register`] with the same arguments.
    fn unregister(
        &self,
        evt: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> std::io::Result<()>;
}

/// Test doubles for the hooks.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    /// Records routes and ioeventfds; GSIs count up from 24.
    #[derive(Default)]
    pub struct Recorder {
        pub routes: Mutex<BTreeMap<u32, Option<MsiMessage>>>,
        pub route_calls: Mutex<usize>,
        pub ioevents: Mutex<Vec<(IoEventAddress, Option<u32>)>>,
    }

    impl MsiRouter for Recorder {
        fn add_vector(&self, _irqfd: &EventFd) -> std::io::Result<u32> {
            let mut r = self.routes.lock().unwrap();
            let gsi = 24 + u32::try_from(r.len()).unwrap();
            r.insert(gsi, None);
            Ok(gsi)
        }
        fn set_route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
            *self.route_calls.lock().unwrap() += 1;
            self.routes.lock().unwrap().insert(gsi, Some(msg));
            Ok(())
        }
        fn remove_vector(&self, gsi: u32, _irqfd: &EventFd) -> std::io::Result<()> {
            self.routes.lock().unwrap().remove(&gsi);
            Ok(())
        }
    }

    impl IoEvents for Recorder {
        fn register(
            &self,
            _evt: &EventFd,
            addr: IoEventAddress,
            datamatch: Option<u32>,
        ) -> std::io::Result<()> {
            let mut v = self.ioevents.lock().unwrap();
            if v.contains(&(addr, datamatch)) {
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            v.push((addr, datamatch));
            Ok(())
        }
        fn unregister(
            &self,
            _evt: &EventFd,
            addr: IoEventAddress,
            datamatch: Option<u32>,
        ) -> std::io::Result<()> {
            let mut v = self.ioevents.lock().unwrap();
            let i = v
                .iter()
                .position(|e| *e == (addr, datamatch))
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
            v.remove(i);
            Ok(())
        }
    }
}
