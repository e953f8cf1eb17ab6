//! KVM interrupt routing and ioeventfds for devices: [`KvmHooks`] implements the device
//! crate's [`MsiRouter`] (a GSI per MSI-X vector, its irqfd, and `KVM_SET_GSI_ROUTING`) and
//! [`IoEvents`] (`KVM_IOEVENTFD`).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every update carries KVM's default
//! routes (GSIs 0-15 to the PICs and the IOAPIC, 16-23 to the IOAPIC) followed by the MSI
//! routes. GSIs for MSI start at 24.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kiln_arch::layout::IOAPIC_PINS;
use kiln_devices::bus::lock;
use kiln_devices::hooks::{IoEventAddress, IoEvents, MsiMessage, MsiRouter};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{NoDatamatch, VmFd};
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

/// Highest GSI handed out (KVM allows 4096 routes).
const GSI_LAST: u32 = 4095;

/// KVM's default routes for the legacy interrupt controllers.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    v
}

/// Address bits 11:5 of an MSI in compatibility format: APIC id bits 14:8 when the guest
/// uses the extended destination ID.
const ADDR_EXT_DEST_ID: u32 = 0xfe0;
/// Address bit 4: remappable format (an IOMMU's interrupt remapping, which kiln lacks).
const ADDR_REMAPPABLE: u32 = 1 << 4;

/// An MSI address (low, high word) as KVM's route wants it. With the x2APIC API KVM reads
/// APIC id bits 31:8 from the high word; a guest offered KVM_FEATURE_MSI_EXT_DEST_ID writes
/// bits 14:8 into low-word bits 11:5 instead. With `ext_dest_id` those bits move to the high
/// word; a remappable-format message, or one that already uses the high word, stays as it is.
pub fn kvm_msi_address(lo: u32, hi: u32, ext_dest_id: bool) -> (u32, u32) {
    let ext = lo & ADDR_EXT_DEST_ID;
    if !ext_dest_id || ext == 0 || lo & ADDR_REMAPPABLE != 0 || hi != 0 {
        return (lo, hi);
    }
    // Bits 11:5 to high-word bits 14:8.
    (lo & !ADDR_EXT_DEST_ID, ext << 3)
}

/// The full routing table: the defaults, then `msi` in GSI order (addresses translated as
/// [`kvm_msi_address`] says).
pub fn routing_table(
    msi: &BTreeMap<u32, MsiMessage>,
    ext_dest_id: bool,
) -> Vec<kvm_irq_routing_entry> {
    let mut v = default_routes();
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        let (lo, hi) = kvm_msi_address(m.addr_lo, m.addr_hi, ext_dest_id);
        e.u.msi.address_lo = lo;
        e.u.msi.address_hi = hi;
        e.u.msi.data = m.data;
        v.push(e);
    }
    v
}

struct Routes {
    gsis: IdAllocator,
    msi: BTreeMap<u32, MsiMessage>,
}

/// Interrupt routing and ioeventfds over one VM.
pub struct KvmHooks {
    vm: Arc<VmFd>,
    routes: Mutex<Routes>,
    ext_dest_id: bool,
}

fn os(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

impl KvmHooks {
    /// Hooks for `vm`; nothing is changed until a device asks. `ext_dest_id`: the VM runs
    /// with KVM's x2APIC API and offers the guest the extended destination ID, which the
    /// routes translate ([`kvm_msi_address`]).
    pub fn new(vm: Arc<VmFd>, ext_dest_id: bool) -> Self {
        KvmHooks {
            vm,
            ext_dest_id,
            routes: Mutex::new(Routes {
                // The range is valid, so this cannot fail.
                gsis: IdAllocator::new(IOAPIC_PINS, GSI_LAST)
                    .unwrap_or_else(|_| unreachable!("valid GSI range")),
                msi: BTreeMap::new(),
            }),
        }
    }

    fn commit(&self, msi: &BTreeMap<u32, MsiMessage>) -> std::io::Result<()> {
        let table = routing_table(msi, self.ext_dest_id);
        let mut routing =
            KvmIrqRouting::new(0).map_err(|_| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        for e in table {
            routing
                .push(e)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        }
        self.vm.set_gsi_routing(&routing).map_err(os)
    }
}

impl MsiRouter for KvmHooks {
    fn add_vector(&self, irqfd: &EventFd) -> std::io::Result<u32> {
        let gsi = lock(&self.routes)
            .gsis
            .allocate_id()
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ENOSPC))?;
        if let Err(e) = self.vm.register_irqfd(irqfd, gsi) {
            let _ = lock(&self.routes).gsis.free_id(gsi);
            return Err(os(e));
        }
        Ok(gsi)
    }

    fn set_route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
        let mut r = lock(&self.routes);
        let old = r.msi.insert(gsi, msg);
        let result = self.commit(&r.msi);
        if result.is_err() {
            match old {
                Some(m) => r.msi.insert(gsi, m),
                None => r.msi.remove(&gsi),
            };
        }
        result
    }

    fn remove_vector(&self, gsi: u32, irqfd: &EventFd) -> std::io::Result<()> {
        let unregistered = self.vm.unregister_irqfd(irqfd, gsi).map_err(os);
        let mut r = lock(&self.routes);
        let _ = r.gsis.free_id(gsi);
        if r.msi.remove(&gsi).is_some() {
            self.commit(&r.msi)?;
        }
        unregistered
    }
}

fn kvm_addr(a: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match a {
        IoEventAddress::Mmio(x) => kvm_ioctls::IoEventAddress::Mmio(x),
        IoEventAddress::Pio(x) => kvm_ioctls::IoEventAddress::Pio(x),
    }
}

impl IoEvents for KvmHooks {
    fn register(
        &self,
        evt: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> std::io::Result<()> {
        let a = kvm_addr(addr);
        match datamatch {
            None => self.vm.register_ioevent(evt, &a, NoDatamatch),
            Some(v) => self.vm.register_ioevent(evt, &a, v),
        }
        .map_err(os)
    }

    fn unregister(
        &self,
        evt: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> std::io::Result<()> {
        let a = kvm_addr(addr);
        match datamatch {
            None => self.vm.unregister_ioevent(evt, &a, NoDatamatch),
            Some(v) => self.vm.unregister_ioevent(evt, &a, v),
        }
        .map_err(os)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_destination_ids_move_to_the_high_address_word() {
        // APIC 0x123: bits 7:0 in address bits 19:12, bits 14:8 in bits 11:5.
        let lo = 0xfee0_0000 | (0x23 << 12) | (0x1 << 5);
        assert_eq!(kvm_msi_address(lo, 0, true), (0xfee2_3000, 0x100));
        // The highest id the extension reaches: 0x7fff.
        let lo = 0xfee0_0000 | (0xff << 12) | (0x7f << 5);
        let (lo2, hi2) = kvm_msi_address(lo, 0, true);
        assert_eq!(((lo2 >> 12) & 0xff) | (hi2 >> 8) << 8, 0x7fff);
        // Left alone: the VM does not offer the extension, nothing in bits 11:5, the
        // remappable format, or a high word already in use.
        assert_eq!(kvm_msi_address(0xfee0_0020, 0, false), (0xfee0_0020, 0));
        assert_eq!(kvm_msi_address(0xfee4_5008, 0, true), (0xfee4_5008, 0));
        assert_eq!(kvm_msi_address(0xfee0_0030, 0, true), (0xfee0_0030, 0));
        assert_eq!(
            kvm_msi_address(0xfee0_0020, 0x200, true),
            (0xfee0_0020, 0x200)
        );
        // The routing table carries the translated address.
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                addr_lo: 0xfee0_0000 | (0x20 << 12) | (0x1 << 5),
                addr_hi: 0,
                data: 0x45,
            },
        );
        let e = *routing_table(&msi, true).last().unwrap();
        // SAFETY: MSI entries carry the msi member.
        let (lo, hi) = unsafe { (e.u.msi.address_lo, e.u.msi.address_hi) };
        assert_eq!((lo, hi), (0xfee2_0000, 0x100));
    }

    #[test]
    fn table_keeps_the_legacy_routes_before_msi() {
        let mut msi = BTreeMap::new();
        msi.insert(
            25,
            MsiMessage {
                addr_lo: 0xfee0_0000,
                addr_hi: 0,
                data: 0x41,
            },
        );
        let t = routing_table(&msi, false);
        assert_eq!(t.len(), 24 + 16 + 1);
        let chips: Vec<(u32, u32, u32)> = t
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries carry the irqchip member.
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(chips.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(chips.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(chips.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!chips.iter().any(|c| c.0 == 16 && c.1 != KVM_IRQCHIP_IOAPIC));
        let last = t.last().unwrap();
        assert_eq!((last.gsi, last.type_), (25, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the msi member.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.data), (0xfee0_0000, 0x41));
    }

    /// Needs /dev/kvm: fails, loudly, without it.
    #[test]
    fn kvm_accepts_routes_irqfds_and_ioeventfds() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let hooks = KvmHooks::new(vm, false);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let gsi = hooks.add_vector(&fd).unwrap();
        assert_eq!(gsi, 24);
        hooks
            .set_route(
                gsi,
                MsiMessage {
                    addr_lo: 0xfee0_0000,
                    addr_hi: 0,
                    data: 0x30,
                },
            )
            .unwrap();
        let fd2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert_eq!(hooks.add_vector(&fd2).unwrap(), 25);
        hooks.remove_vector(gsi, &fd).unwrap();
        assert_eq!(hooks.add_vector(&fd).unwrap(), 24, "freed GSIs are reused");
        let n = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let addr = IoEventAddress::Mmio(0xc000_3000);
        hooks.register(&n, addr, None).unwrap();
        assert!(hooks.register(&n, addr, None).is_err(), "twice");
        hooks.unregister(&n, addr, None).unwrap();
        hooks
            .register(&n, IoEventAddress::Mmio(0xf000_0050), Some(1))
            .unwrap();
    }
}
