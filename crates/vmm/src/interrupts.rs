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

/// The full routing table: the defaults, then `msi` in GSI order.
pub fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut v = default_routes();
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.addr_lo;
        e.u.msi.address_hi = m.addr_hi;
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
}

fn os(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

impl KvmHooks {
    /// Hooks for `vm`; nothing is changed until a device asks.
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmHooks {
            vm,
            routes: Mutex::new(Routes {
                // The range is valid, so this cannot fail.
                gsis: IdAllocator::new(IOAPIC_PINS, GSI_LAST)
                    .unwrap_or_else(|_| unreachable!("valid GSI range")),
                msi: BTreeMap::new(),
            }),
        }
    }

    fn commit(&self, msi: &BTreeMap<u32, MsiMessage>) -> std::io::Result<()> {
        let table = routing_table(msi);
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
        let t = routing_table(&msi);
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
        let hooks = KvmHooks::new(vm);
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
