//! The VM's PCI root and virtio devices: the root bus with its configuration ports and
//! ECAM, and one generic way to plug a virtio device into either transport
//! ([`DeviceManager::attach_virtio`]).
//!
//! INTx and virtio-mmio interrupts are level-triggered lines: resample irqfds
//! ([`register_level_irq`]) whose resample eventfds the VMM thread watches
//! ([`DeviceManager::level_irqs`], served in `vm.rs`).

use std::sync::{Arc, Mutex};

use kiln_arch::acpi::PciHostConfig;
use kiln_arch::layout::{
    self, PCI_BUS_LAST, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
    VIRTIO_MMIO_AREA, VIRTIO_MMIO_GSIS, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use kiln_devices::bus::lock;
use kiln_devices::pci::{PciConfigIo, PciEcam, PciError, PciRoot, PciRootState, PciWindows};
use kiln_devices::virtio::mmio::{VirtioMmio, VirtioMmioState};
use kiln_devices::virtio::pci::{VirtioPci, VirtioPciState};
use kiln_devices::virtio::{VirtioDevice, VirtioError};
use kiln_devices::{Bus, BusError, LevelIrqLine, Resample};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::config::Transport;
use crate::interrupts::KvmHooks;
use crate::memory::GuestMemory;

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// PCI.
    #[error("PCI: cannot attach {device}")]
    Pci {
        /// Device name.
        device: &'static str,
        /// Why.
        #[source]
        source: PciError,
    },
    /// The virtio transport.
    #[error("cannot attach {device}")]
    Virtio {
        /// Device name.
        device: &'static str,
        /// Why.
        #[source]
        source: VirtioError,
    },
    /// A bus range.
    #[error("cannot place {what} on a bus")]
    Bus {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: BusError,
    },
    /// All virtio-mmio slots or interrupt lines are taken.
    #[error("no virtio-mmio slot left for {0}")]
    MmioFull(&'static str),
    /// An interrupt line could not be set up.
    #[error("cannot set up the interrupt of {device}")]
    Irq {
        /// Device name.
        device: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state does not fit the devices.
    #[error("device state does not fit: {0}")]
    State(String),
}

/// A virtio device on its transport.
#[derive(Clone)]
pub enum VirtioHandle {
    /// On PCI, in this slot.
    Pci(u8, Arc<Mutex<VirtioPci>>),
    /// On virtio-mmio at this address.
    Mmio(u64, Arc<Mutex<VirtioMmio>>),
}

/// One device's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// A virtio-pci device in this slot.
    Pci {
        /// PCI slot.
        slot: u8,
        /// Its state.
        state: VirtioPciState,
    },
    /// A virtio-mmio device at this address.
    Mmio {
        /// Base address.
        base: u64,
        /// Its state.
        state: VirtioMmioState,
    },
}

/// Everything [`DeviceManager::save`] saves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The PCI root (host bridge).
    pub pci_root: PciRootState,
    /// The 0xCF8 address register.
    pub config_address: u32,
    /// Each virtio device, in the order they were attached.
    pub virtio: Vec<VirtioDeviceState>,
}

/// The PCI root and the virtio devices of a VM.
pub struct DeviceManager {
    root: Arc<Mutex<PciRoot>>,
    config_io: Arc<Mutex<PciConfigIo>>,
    host: PciHostConfig,
    hooks: Arc<KvmHooks>,
    vm: Arc<VmFd>,
    mem: GuestMemory,
    mmio_bus: Arc<Bus>,
    virtio: Vec<VirtioHandle>,
    mmio_slots: usize,
    cmdline: Vec<String>,
    level_irqs: Vec<Arc<dyn Resample>>,
}

impl DeviceManager {
    /// The PCI root on `pio` (0xCF8) and `mmio` (ECAM), with its windows for a guest of
    /// `mem_size` bytes on a host with `phys_bits` address bits. `ext_dest_id`: the VM runs
    /// with KVM's x2APIC API and MSIs may carry an extended destination ID (see
    /// [`KvmHooks::new`]).
    pub fn new(
        vm: Arc<VmFd>,
        mem: GuestMemory,
        mem_size: u64,
        phys_bits: u32,
        pio: &Bus,
        mmio: &Arc<Bus>,
        ext_dest_id: bool,
    ) -> Result<Self, DeviceError> {
        let windows = PciWindows {
            mmio32: (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            mmio64: layout::pci_mmio64_window(mem_size, phys_bits),
        };
        let root = PciRoot::new(mmio, windows).map_err(|source| DeviceError::Pci {
            device: "the PCI root",
            source,
        })?;
        let root = Arc::new(Mutex::new(root));
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
        pio.insert(config_io.clone(), 0xcf8, 8)
            .map_err(|source| DeviceError::Bus {
                what: "the PCI configuration ports",
                source,
            })?;
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
        )
        .map_err(|source| DeviceError::Bus {
            what: "PCI ECAM",
            source,
        })?;
        Ok(DeviceManager {
            root,
            config_io,
            host: PciHostConfig {
                ecam_base: PCI_ECAM_START,
                bus_last: PCI_BUS_LAST,
                mmio32: windows.mmio32,
                mmio64: windows.mmio64,
            },
            hooks: Arc::new(KvmHooks::new(vm.clone(), ext_dest_id)),
            vm,
            mem,
            mmio_bus: mmio.clone(),
            virtio: Vec::new(),
            mmio_slots: 0,
            cmdline: Vec::new(),
            level_irqs: Vec::new(),
        })
    }

    /// What the ACPI tables say about the host bridge.
    pub fn pci_host(&self) -> PciHostConfig {
        self.host
    }

    /// Words the kernel command line needs (virtio-mmio devices).
    pub fn cmdline_additions(&self) -> &[String] {
        &self.cmdline
    }

    /// The virtio devices, in the order they were attached.
    pub fn virtio_devices(&self) -> &[VirtioHandle] {
        &self.virtio
    }

    /// The devices' level-triggered interrupt lines. Whoever runs the VM polls each one's
    /// resample eventfd and calls [`Resample::resample`] when it is readable (after every
    /// EOI of the line), or interrupts that arrive during the guest's handler are lost.
    pub fn level_irqs(&self) -> &[Arc<dyn Resample>] {
        &self.level_irqs
    }

    /// Plugs `device` into `transport`: a PCI slot with its BAR and MSI-X vectors, or a
    /// virtio-mmio slot with an IOAPIC line (and a command-line word announcing it).
    pub fn attach_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        transport: Transport,
    ) -> Result<VirtioHandle, DeviceError> {
        let name = device.name();
        let handle = match transport {
            Transport::Pci => {
                let full = || DeviceError::Pci {
                    device: name,
                    source: PciError::BusFull,
                };
                let slot = lock(&self.root).next_free_slot().ok_or_else(full)?;
                let gsi = layout::pci_intx_gsi(slot, 0);
                let intx = self.level_irq(name, gsi)?;
                let pci = VirtioPci::new(
                    device,
                    self.mem.clone(),
                    self.hooks.clone(),
                    self.hooks.clone(),
                    Some((intx, u8::try_from(gsi).unwrap_or(0xff))),
                )
                .map_err(|source| DeviceError::Pci {
                    device: name,
                    source,
                })?;
                let pci = Arc::new(Mutex::new(pci));
                let placed = lock(&self.root).add_device(pci.clone()).map_err(|source| {
                    DeviceError::Pci {
                        device: name,
                        source,
                    }
                })?;
                if placed != slot {
                    return Err(full());
                }
                self.level_irqs.extend(lock(&pci).intx());
                log::debug!("{name}: PCI 00:{slot:02x}.0, INTA# on GSI {gsi}");
                VirtioHandle::Pci(slot, pci)
            }
            Transport::Mmio => {
                let n = self.mmio_slots;
                let base = VIRTIO_MMIO_START + n as u64 * VIRTIO_MMIO_SIZE;
                let gsi = *VIRTIO_MMIO_GSIS.get(n).ok_or(DeviceError::MmioFull(name))?;
                if (n as u64 + 1) * VIRTIO_MMIO_SIZE > VIRTIO_MMIO_AREA {
                    return Err(DeviceError::MmioFull(name));
                }
                let irq = self.level_irq(name, gsi)?;
                let dev = VirtioMmio::new(device, self.mem.clone(), base, irq, self.hooks.clone())
                    .map_err(|source| DeviceError::Virtio {
                        device: name,
                        source,
                    })?;
                self.level_irqs.push(dev.irq());
                let dev = Arc::new(Mutex::new(dev));
                self.mmio_bus
                    .insert(dev.clone(), base, VIRTIO_MMIO_SIZE)
                    .map_err(|source| DeviceError::Bus { what: name, source })?;
                self.mmio_slots += 1;
                self.cmdline
                    .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
                log::debug!("{name}: virtio-mmio at {base:#x}, GSI {gsi}");
                VirtioHandle::Mmio(base, dev)
            }
        };
        self.virtio.push(handle.clone());
        Ok(handle)
    }

    /// A level-triggered line on IOAPIC pin `gsi`.
    fn level_irq(&self, device: &'static str, gsi: u32) -> Result<LevelIrqLine, DeviceError> {
        register_level_irq(&self.vm, gsi).map_err(|source| DeviceError::Irq { device, source })
    }

    /// Pauses every device (workers stop, in-flight work finishes).
    pub fn pause(&self) -> Result<(), VirtioError> {
        for d in &self.virtio {
            match d {
                VirtioHandle::Pci(_, p) => lock(p).pause()?,
                VirtioHandle::Mmio(_, m) => lock(m).pause()?,
            }
        }
        Ok(())
    }

    /// Resumes every device.
    pub fn resume(&self) -> Result<(), VirtioError> {
        for d in &self.virtio {
            match d {
                VirtioHandle::Pci(_, p) => lock(p).resume()?,
                VirtioHandle::Mmio(_, m) => lock(m).resume()?,
            }
        }
        Ok(())
    }

    /// The PCI root's and every device's state; the devices must be paused.
    pub fn save(&self) -> Result<DeviceStates, VirtioError> {
        Ok(DeviceStates {
            pci_root: lock(&self.root).state(),
            config_address: lock(&self.config_io).address(),
            virtio: self.save_virtio()?,
        })
    }

    fn save_virtio(&self) -> Result<Vec<VirtioDeviceState>, VirtioError> {
        self.virtio
            .iter()
            .map(|d| {
                Ok(match d {
                    VirtioHandle::Pci(slot, p) => VirtioDeviceState::Pci {
                        slot: *slot,
                        state: lock(p).state()?,
                    },
                    VirtioHandle::Mmio(base, m) => VirtioDeviceState::Mmio {
                        base: *base,
                        state: lock(m).state()?,
                    },
                })
            })
            .collect()
    }

    /// Restores [`DeviceManager::save`] into the same devices, attached in the same order.
    pub fn restore(&self, all: DeviceStates) -> Result<(), DeviceError> {
        let states = all.virtio;
        if states.len() != self.virtio.len() {
            return Err(DeviceError::State(format!(
                "{} device states for {} devices",
                states.len(),
                self.virtio.len()
            )));
        }
        for (d, s) in self.virtio.iter().zip(states) {
            let (name, result) = match (d, s) {
                (VirtioHandle::Pci(slot, p), VirtioDeviceState::Pci { slot: s, state })
                    if *slot == s =>
                {
                    let mut p = lock(p);
                    (p.core().device().name(), p.restore(state))
                }
                (VirtioHandle::Mmio(base, m), VirtioDeviceState::Mmio { base: b, state })
                    if *base == b =>
                {
                    let mut m = lock(m);
                    (m.core().device().name(), m.restore(state))
                }
                _ => return Err(DeviceError::State("devices differ".into())),
            };
            result.map_err(|source| DeviceError::Virtio {
                device: name,
                source,
            })?;
        }
        let mut root = lock(&self.root);
        root.restore(&all.pci_root)
            .map_err(|source| DeviceError::Pci {
                device: "the host bridge",
                source,
            })?;
        root.sync_all_bars();
        lock(&self.config_io).set_address(all.config_address);
        Ok(())
    }

    /// Stops every device for good (the VM is ending).
    pub fn shutdown(&self) {
        for d in &self.virtio {
            match d {
                VirtioHandle::Pci(_, p) => lock(p).shutdown(),
                VirtioHandle::Mmio(_, m) => lock(m).shutdown(),
            }
        }
    }
}

/// A level-triggered line on `gsi`: a trigger and a resample eventfd registered as a KVM
/// resample irqfd (`KVM_IRQFD_FLAG_RESAMPLE`). Every resample irqfd on a GSI shares one
/// level in KVM, so devices that share a PCI INTx pin see their line lowered together at
/// the EOI and each raises it again if it still has an interrupt pending: the wired-OR of a
/// shared PCI interrupt line.
pub fn register_level_irq(vm: &VmFd, gsi: u32) -> std::io::Result<LevelIrqLine> {
    let efd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
    let line = LevelIrqLine::new(efd()?, efd()?);
    vm.register_irqfd_with_resample(line.trigger_fd(), line.resample_fd(), gsi)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use kiln_devices::virtio::status as st;
    use kiln_virtio::rng::Rng;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    /// Needs /dev/kvm: fails, loudly, without it.
    fn manager() -> (DeviceManager, Bus, Arc<Bus>, GuestMemory) {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        manager_on(vm)
    }

    fn manager_on(vm: Arc<VmFd>) -> (DeviceManager, Bus, Arc<Bus>, GuestMemory) {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let pio = Bus::new();
        let mmio = Arc::new(Bus::new());
        let m = DeviceManager::new(vm, mem.clone(), 16 << 20, 48, &pio, &mmio, false).unwrap();
        (m, pio, mmio, mem)
    }

    fn read32(bus: &Bus, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(bus.read(addr, &mut b), "nothing at {addr:#x}");
        u32::from_le_bytes(b)
    }

    fn write32(bus: &Bus, addr: u64, v: u32) {
        assert!(bus.write(addr, &v.to_le_bytes()));
    }

    #[test]
    fn pci_devices_answer_through_cf8_and_ecam() {
        let (mut m, pio, mmio, _) = manager();
        m.attach_virtio(Box::new(Rng::new()), Transport::Pci)
            .unwrap();
        write32(&pio, 0xcf8, 0x8000_0800);
        assert_eq!(read32(&pio, 0xcfc), 0x1044_1af4);
        assert_eq!(read32(&mmio, PCI_ECAM_START + (1 << 15)), 0x1044_1af4);
        assert_eq!(read32(&mmio, PCI_ECAM_START), 0x0008_1b36);
        // INTA#, on the GSI the DSDT's _PRT gives slot 1.
        let int = read32(&mmio, PCI_ECAM_START + (1 << 15) + 0x3c);
        assert_eq!(int & 0xffff, 0x0100 | layout::pci_intx_gsi(1, 0));
        assert!(m.cmdline_additions().is_empty());
        let host = m.pci_host();
        assert_eq!(host.ecam_base, PCI_ECAM_START);
        assert_eq!(host.mmio64, Some((4 << 30, 1 << 40)));
    }

    /// Writes a split queue of 8 at 0x10000 with one 32-byte device-writable buffer at
    /// 0x20000 published; returns (desc, avail, used).
    fn one_request(mem: &GuestMemory) -> (u64, u64, u64) {
        let (desc, avail, used, buf) = (0x10000u64, 0x10080u64, 0x10100u64, 0x20000u64);
        mem.write_obj(buf, GuestAddress(desc)).unwrap();
        mem.write_obj(32u32, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap(); // WRITE
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // ring[0] = 0
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // idx = 1
        (desc, avail, used)
    }

    /// Drives virtio-rng on PCI with BAR 0 at `bar` as a driver would: VERSION_1, queue 0
    /// (8 entries, MSI-X `vector`) holding [`one_request`], DRIVER_OK, then a notification.
    /// Returns the used ring's address.
    fn drive_one_request(mmio: &Bus, mem: &GuestMemory, bar: u64, vector: u16) -> u64 {
        let (desc, avail, used) = one_request(mem);
        let c = bar; // common configuration
        let w8 = |off: u64, v: u8| assert!(mmio.write(c + off, &[v]));
        let w16 = |off: u64, v: u16| assert!(mmio.write(c + off, &v.to_le_bytes()));
        w8(0x14, st::ACKNOWLEDGE | st::DRIVER);
        write32(mmio, c + 0x08, 1);
        write32(mmio, c + 0x0c, 1); // VERSION_1
        w8(0x14, st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK);
        w16(0x16, 0);
        w16(0x18, 8);
        w16(0x1a, vector);
        write32(mmio, c + 0x20, u32::try_from(desc).unwrap());
        write32(mmio, c + 0x28, u32::try_from(avail).unwrap());
        write32(mmio, c + 0x30, u32::try_from(used).unwrap());
        w16(0x1c, 1);
        w8(
            0x14,
            st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK,
        );
        let mut status = [0u8];
        mmio.read(c + 0x14, &mut status);
        assert_eq!(status[0], 0xf);
        w16(0x3000, 0); // notify queue 0
        used
    }

    /// The in-kernel IOAPIC's state.
    fn ioapic(vm: &VmFd) -> kvm_bindings::kvm_ioapic_state {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: KVM filled the IOAPIC member, the one chip_id names.
        unsafe { chip.chip.ioapic }
    }

    /// Whether IOAPIC pin `gsi`'s input is high (its IRR bit), waiting up to `wait` for it
    /// (KVM raises a resample irqfd's GSI from a work item, not in the write).
    fn pin_high(vm: &VmFd, gsi: u32, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if ioapic(vm).irr & (1 << gsi) != 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lowers pin `gsi`'s IRR bit as the guest's EOI would (KVM then signals the resample
    /// eventfd, which this test does by hand). The pin's line state in KVM stays high, so
    /// a new trigger sets the bit again: that is what the IRR bit shows afterwards.
    fn lower_pin(vm: &VmFd, gsi: u32) {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: KVM filled the IOAPIC member, the one chip_id names.
        unsafe { chip.chip.ioapic.irr &= !(1 << gsi) };
        vm.set_irqchip(&chip).unwrap();
        assert!(!pin_high(vm, gsi, Duration::ZERO));
    }

    /// INTA# of virtio-rng on PCI, on real KVM: a resample irqfd on the slot's PCI GSI; the
    /// device's interrupt holds the IOAPIC pin high (a plain irqfd would pulse it: its IRR
    /// bit would read clear again). After an EOI the transport raises the pin again while
    /// the ISR is set, and not once the driver has read the ISR.
    #[test]
    fn inta_is_a_level_line_that_the_device_raises_again_after_eoi() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let (mut m, _, mmio, mem) = manager_on(vm.clone());
        m.attach_virtio(Box::new(Rng::new()), Transport::Pci)
            .unwrap();
        let gsi = layout::pci_intx_gsi(1, 0);
        assert!((16..24).contains(&gsi), "a PCI INTx pin");
        assert_eq!(m.level_irqs().len(), 1);
        let intx = m.level_irqs()[0].clone();
        let ecam = PCI_ECAM_START + (1 << 15);
        write32(&mmio, ecam + 4, 0x6); // memory decoding, bus master; INTx enabled
        let bar = u64::from(read32(&mmio, ecam + 0x10) & !0xf);
        assert!(!pin_high(&vm, gsi, Duration::ZERO));

        // MSI-X off: the used buffer sets the ISR and raises INTA#, and KVM holds it high.
        let used = drive_one_request(&mmio, &mem, bar, kiln_devices::virtio::pci::NO_VECTOR);
        assert!(
            pin_high(&vm, gsi, Duration::from_secs(5)),
            "INTA# never raised GSI {gsi}"
        );
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(pin_high(&vm, gsi, Duration::ZERO), "the pin stays high");

        // EOI with the ISR still set: raised again.
        lower_pin(&vm, gsi);
        intx.line().resample_fd().write(1).unwrap();
        assert!(intx.resample().unwrap());
        assert!(
            pin_high(&vm, gsi, Duration::from_secs(5)),
            "not raised again after the EOI"
        );

        // The driver reads the ISR (which clears it); after the EOI the pin stays low.
        let mut isr = [0u8];
        assert!(mmio.read(bar + 0x1000, &mut isr));
        assert_eq!(isr[0], 1, "used-buffer interrupt");
        lower_pin(&vm, gsi);
        intx.line().resample_fd().write(1).unwrap();
        assert!(!intx.resample().unwrap());
        assert!(!pin_high(&vm, gsi, Duration::from_millis(100)));
        m.shutdown();
    }

    /// The whole interrupt path on real KVM: a driver (this test, through ECAM and the BAR)
    /// sets virtio-rng on PCI up with MSI-X vector 1 for its queue, programmed to deliver
    /// vector 0x45 to APIC 0; the device fills a buffer and signals; the interrupt lands in
    /// the vCPU's local APIC (IRR), through the irqfd and the GSI route.
    #[test]
    fn msix_interrupt_reaches_the_vcpus_local_apic() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        // Software-enable the local APIC (spurious vector register, bit 8).
        lapic.regs[0xf1] |= 1;
        vcpu.set_lapic(&lapic).unwrap();
        let (mut m, _, mmio, mem) = manager_on(vm);
        m.attach_virtio(Box::new(Rng::new()), Transport::Pci)
            .unwrap();
        let ecam = PCI_ECAM_START + (1 << 15);
        write32(&mmio, ecam + 4, 0x6); // memory decoding, bus master
        let bar = u64::from(read32(&mmio, ecam + 0x10) & !0xf);
        // MSI-X: enable (capability found by walking the list).
        let mut cap = u64::from(read32(&mmio, ecam + 0x34) & 0xff);
        while read32(&mmio, ecam + cap) & 0xff != 0x11 {
            cap = u64::from((read32(&mmio, ecam + cap) >> 8) & 0xff);
        }
        write32(&mmio, ecam + cap, 0x8000 << 16 | 0x11);
        // Table entry 1: APIC 0, vector 0x45, unmasked.
        write32(&mmio, bar + 0x4010, 0xfee0_0000);
        write32(&mmio, bar + 0x4014, 0);
        write32(&mmio, bar + 0x4018, 0x45);
        write32(&mmio, bar + 0x401c, 0);
        let used = drive_one_request(&mmio, &mem, bar, 1);

        let irr = |l: &kvm_bindings::kvm_lapic_state| {
            // IRR bit 0x45 (69): register 0x200 + 0x10 * (69 / 32), bit 69 % 32 = 5.
            (l.regs[0x220] as u8) & (1 << 5) != 0
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let l = vcpu.get_lapic().unwrap();
            if irr(&l) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "vector 0x45 never reached the LAPIC"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        m.shutdown();
    }

    #[test]
    fn mmio_devices_are_announced_on_the_command_line() {
        let (mut m, _, mmio, _) = manager();
        m.attach_virtio(Box::new(Rng::new()), Transport::Mmio)
            .unwrap();
        m.attach_virtio(Box::new(Rng::new()), Transport::Mmio)
            .unwrap();
        assert_eq!(
            m.cmdline_additions(),
            &[
                "virtio_mmio.device=4K@0xf0000000:5".to_string(),
                "virtio_mmio.device=4K@0xf0001000:6".to_string()
            ]
        );
        assert_eq!(read32(&mmio, VIRTIO_MMIO_START), 0x7472_6976);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_START + 0x1008), 4);
    }

    #[test]
    fn virtio_mmio_rng_serves_a_request_end_to_end() {
        let (mut m, _, mmio, mem) = manager();
        m.attach_virtio(Box::new(Rng::new()), Transport::Mmio)
            .unwrap();
        let b = VIRTIO_MMIO_START;
        let (desc, avail, used) = one_request(&mem);
        let buf = 0x20000u64;
        write32(&mmio, b + 0x70, u32::from(st::ACKNOWLEDGE | st::DRIVER));
        write32(&mmio, b + 0x24, 1);
        write32(&mmio, b + 0x20, 1);
        write32(
            &mmio,
            b + 0x70,
            u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
        );
        write32(&mmio, b + 0x38, 8);
        write32(&mmio, b + 0x80, u32::try_from(desc).unwrap());
        write32(&mmio, b + 0x90, u32::try_from(avail).unwrap());
        write32(&mmio, b + 0xa0, u32::try_from(used).unwrap());
        write32(&mmio, b + 0x44, 1);
        let all = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK;
        write32(&mmio, b + 0x70, u32::from(all));
        assert_eq!(read32(&mmio, b + 0x70), u32::from(all));
        write32(&mmio, b + 0x50, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() != 1 {
            assert!(Instant::now() < deadline, "no used buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 32);
        let mut got = [0u8; 32];
        mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
        assert_ne!(got, [0u8; 32]);
        assert_eq!(read32(&mmio, b + 0x60), 1, "used-buffer interrupt status");

        m.pause().unwrap();
        let states = m.save().unwrap();
        m.restore(states.clone()).unwrap();
        assert_eq!(m.save().unwrap(), states);
        let mut wrong = states.clone();
        wrong.virtio.clear();
        assert!(m.restore(wrong).is_err());
        m.shutdown();
    }
}
