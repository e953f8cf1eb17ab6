//! The interrupt controllers and timers KVM emulates in the kernel for the whole VM (both
//! 8259 PICs, the IOAPIC, the PIT) and the kvm-clock base, as one serde struct: a guest's
//! IOAPIC redirection table, its PIC masks and its PIT programming are guest state that a
//! snapshot must carry like any device's.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Saving or loading the in-kernel chips failed.
#[derive(Debug, thiserror::Error)]
pub enum ChipsError {
    /// A KVM call failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved state names the wrong chip for its field.
    #[error("saved in-kernel chip state: {field} holds chip id {found}, expected {expected}")]
    WrongChip {
        /// The field.
        field: &'static str,
        /// Its chip id.
        found: u32,
        /// The id it must have.
        expected: u32,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ChipsError {
    move |source| ChipsError::Kvm { what, source }
}

/// The in-kernel chips of a paused VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChipsState {
    /// 8259 PIC for IRQs 0-7.
    pub pic_master: kvm_irqchip,
    /// 8259 PIC for IRQs 8-15.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC: redirection table, IRR, id and base.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT's channels.
    pub pit: kvm_pit_state2,
    /// kvm-clock's base (nanoseconds), so guest time goes on from where it stopped.
    pub clock: kvm_clock_data,
}

fn chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, ChipsError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm(what))?;
    Ok(c)
}

/// Reads the chips of `vm` (whose vCPUs are paused).
pub fn save(vm: &VmFd) -> Result<ChipsState, ChipsError> {
    Ok(ChipsState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP(PIC master)")?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP(PIC slave)")?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP(IOAPIC)")?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Loads `s` into `vm` (built from the same configuration, vCPUs paused). A field holding
/// the wrong chip is refused before anything is loaded.
pub fn restore(vm: &VmFd, s: &ChipsState) -> Result<(), ChipsError> {
    let chips = [
        (
            &s.pic_master,
            KVM_IRQCHIP_PIC_MASTER,
            "pic_master",
            "KVM_SET_IRQCHIP(PIC master)",
        ),
        (
            &s.pic_slave,
            KVM_IRQCHIP_PIC_SLAVE,
            "pic_slave",
            "KVM_SET_IRQCHIP(PIC slave)",
        ),
        (
            &s.ioapic,
            KVM_IRQCHIP_IOAPIC,
            "ioapic",
            "KVM_SET_IRQCHIP(IOAPIC)",
        ),
    ];
    for &(c, expected, field, _) in &chips {
        if c.chip_id != expected {
            return Err(ChipsError::WrongChip {
                field,
                found: c.chip_id,
                expected,
            });
        }
    }
    for (c, _, _, what) in chips {
        vm.set_irqchip(c).map_err(kvm(what))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // Only the clock value: the flags KVM_GET_CLOCK reports (TSC stable, host TSC) are
    // facts about the host it ran on, not settings.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with the in-kernel irqchip and PIT, as kiln builds them.
    fn vm() -> VmFd {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .unwrap();
        vm
    }

    #[test]
    fn the_guests_ioapic_and_pic_programming_survive_a_save_and_a_restore_elsewhere() {
        let a = vm();
        // What a guest would have programmed: IOAPIC pin 11 to vector 0x51, level, unmasked,
        // APIC 3; the master PIC's mask; kvm-clock well along.
        let mut io = chip(&a, KVM_IRQCHIP_IOAPIC, "get").unwrap();
        // SAFETY: the IOAPIC member is the one chip_id names (KVM filled it).
        unsafe {
            io.chip.ioapic.redirtbl[11].bits = 0x51 | (1 << 15) | (3u64 << 56);
            io.chip.ioapic.id = 0;
        }
        a.set_irqchip(&io).unwrap();
        let mut pic = chip(&a, KVM_IRQCHIP_PIC_MASTER, "get").unwrap();
        // SAFETY: the PIC member is the one chip_id names.
        let imr = unsafe { &mut pic.chip.pic.imr };
        *imr = 0xfb;
        a.set_irqchip(&pic).unwrap();
        a.set_clock(&kvm_clock_data {
            clock: 5_000_000_000,
            ..Default::default()
        })
        .unwrap();

        let saved = save(&a).unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: ChipsState = serde_json::from_str(&json).unwrap();

        let b = vm();
        restore(&b, &back).unwrap();
        let got = save(&b).unwrap();
        // SAFETY: as above, for the chips KVM filled in `b`.
        unsafe {
            assert_eq!(
                got.ioapic.chip.ioapic.redirtbl[11].bits,
                0x51 | (1 << 15) | (3u64 << 56)
            );
            assert_eq!(got.pic_master.chip.pic.imr, 0xfb);
        }
        for (x, y) in [
            (&got.pic_master, &saved.pic_master),
            (&got.pic_slave, &saved.pic_slave),
            (&got.ioapic, &saved.ioapic),
        ] {
            assert_eq!(
                serde_json::to_string(x).unwrap(),
                serde_json::to_string(y).unwrap()
            );
        }
        // The PIT's programming (its load times are host timestamps, re-based on load).
        let program = |p: &kvm_pit_state2| -> Vec<_> {
            p.channels
                .iter()
                .map(|c| (c.count, c.mode, c.rw_mode, c.bcd, c.gate, c.status))
                .collect()
        };
        assert_eq!(program(&got.pit), program(&saved.pit));
        // Guest time goes on from the saved value, not from zero.
        assert!(got.clock.clock >= 5_000_000_000, "{}", got.clock.clock);
    }

    #[test]
    fn a_state_with_chips_in_the_wrong_fields_is_refused_before_anything_loads() {
        let a = vm();
        let mut s = save(&a).unwrap();
        std::mem::swap(&mut s.pic_master, &mut s.ioapic);
        let e = restore(&a, &s).unwrap_err().to_string();
        assert!(e.contains("pic_master holds chip id 2, expected 0"), "{e}");
    }
}
