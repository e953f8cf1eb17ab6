//! The `intx` check: a virtio-pci function's INTA# behaves as a
//! level-triggered IOAPIC line, so an interrupt that comes in while the
//! previous one on the pin is still being handled is not lost.
//!
//! Like `msix`, the probe never runs a real handler: the task priority is
//! raised to 0xF0, so a delivered vector stays pending in the local APIC's
//! IRR where ring 3 sees it, and the IOAPIC entry's remote IRR stays set (the
//! pin counts as in service) until the vector is EOI'd. The EOI is done by
//! lowering the task priority until the vector leaves the IRR: the CPU then
//! takes it, and the shared ring-0 handler for vectors 32..255 writes the
//! xAPIC EOI register (so the check needs xAPIC mode).
//!
//! With MSI-X disabled on the first virtio-rng PCI function, its interrupt
//! pin's redirection entry (the GSI in the interrupt line register, on the
//! first IOAPIC, GSI base 0) is programmed level-triggered, active low (what
//! a GSI in the ACPI `_PRT` means) with [`VECTOR`] to this APIC. Then:
//!
//! 1. a read request with interrupts wanted: the vector must reach the IRR;
//! 2. the driver's handler reads the ISR (1), and a second request completes
//!    before the EOI: the pin is already high, so nothing new is signalled;
//! 3. EOI: the device still has an interrupt pending, so the vector must be
//!    delivered again (a VMM that pulses the line loses it here);
//! 4. the ISR is read (1), EOI: nothing is pending, so the vector must not
//!    arrive again.

use crate::clock::Clock;
use crate::dma::Dma;
use crate::io::{mmio_read32, mmio_write32};
use crate::lapic::{Lapic, TPR_BLOCK_ALL};
use crate::pci::{Bdf, Pci, CAP_MSIX, CMD_INTX_DISABLE};
use crate::util::Reason;
use crate::{emit, reason};

use super::{msix, open, request, Dev, DevId, Devs, Seg, TYPE_RNG};

/// The vector INTA# is routed to.
pub const VECTOR: u8 = 0x51;
/// How long a signalled vector may take to show in the IRR.
const DELIVER_MS: u64 = 1000;
/// How long a vector that must not arrive is watched for.
const HOLD_MS: u64 = 200;
/// Bytes per read request.
const READ: u32 = 64;

const PCI_COMMAND: u16 = 0x04;
const PCI_INTERRUPT_LINE: u16 = 0x3c;
const PCI_INTERRUPT_PIN: u16 = 0x3d;

/// IOAPIC redirection entry bits (low dword).
const RTE_ACTIVE_LOW: u32 = 1 << 13;
const RTE_LEVEL: u32 = 1 << 15;
const RTE_MASKED: u32 = 1 << 16;
/// IOAPIC pins.
const IOAPIC_PINS: u8 = 24;

/// The low and high dwords of a redirection entry: fixed delivery, physical
/// destination `apic_id`, level-triggered, active low, unmasked.
pub fn redirection_entry(vector: u8, apic_id: u32) -> (u32, u32) {
    (u32::from(vector) | RTE_ACTIVE_LOW | RTE_LEVEL, apic_id << 24)
}

/// The IOAPIC register index of the low dword of pin `pin`'s entry.
pub fn rte_index(pin: u8) -> u32 {
    0x10 + 2 * u32::from(pin)
}

/// An IOAPIC by its (identity-mapped) MMIO base.
struct Ioapic(u64);

impl Ioapic {
    fn write(&self, index: u32, value: u32) {
        // SAFETY: the IOAPIC's register window (IOREGSEL at +0, IOWIN at
        // +0x10) from the MADT, below 4 GiB and identity mapped; only
        // redirection entries of the pin under test are written.
        unsafe {
            mmio_write32(self.0, index);
            mmio_write32(self.0 + 0x10, value);
        }
    }

    fn read(&self, index: u32) -> u32 {
        // SAFETY: as in `write`; reading a register has no side effects.
        unsafe {
            mmio_write32(self.0, index);
            mmio_read32(self.0 + 0x10)
        }
    }

    fn program(&self, pin: u8, (low, high): (u32, u32)) {
        self.write(rte_index(pin), RTE_MASKED);
        self.write(rte_index(pin) + 1, high);
        self.write(rte_index(pin), low);
    }

    fn mask(&self, pin: u8) {
        self.write(rte_index(pin), RTE_MASKED);
    }
}

/// Lets the CPU take `vector` (the ring-0 handler EOIs it), then holds
/// interrupts off again.
fn eoi(apic: &Lapic, vector: u8, clock: &Clock) -> Result<(), Reason> {
    apic.set_tpr(0);
    let d = clock.deadline_ms(DELIVER_MS);
    while apic.irr_has(vector) {
        if d.expired() {
            apic.set_tpr(TPR_BLOCK_ALL);
            return Err(reason!("vector {:#x} stayed in the IRR with the task priority at 0", vector));
        }
        clock.sleep_us(10);
    }
    apic.set_tpr(TPR_BLOCK_ALL);
    Ok(())
}

struct Report {
    gsi: u8,
    isr: [u32; 2],
}

fn exercise(pci: &Pci, ioapic: u64, dev: &Dev, dma: &mut Dma, clock: &Clock) -> Result<Report, Reason> {
    let DevId::Pci(bdf) = dev.id else {
        return Err(reason!("{}: not a PCI function", dev.id));
    };
    let cfg = &pci.config;
    let pin = cfg.read8(bdf, PCI_INTERRUPT_PIN);
    let gsi = cfg.read8(bdf, PCI_INTERRUPT_LINE);
    if pin != 1 {
        return Err(reason!("{}: interrupt pin {} (INTA# is 1)", bdf, pin));
    }
    if gsi >= IOAPIC_PINS {
        return Err(reason!("{}: interrupt line {} is not an IOAPIC pin", bdf, gsi));
    }
    let apic = Lapic::current()?;
    if !matches!(apic, Lapic::X(_)) {
        return Err(reason!(
            "the ring-0 handler EOIs through the xAPIC page; the APIC is in {} mode",
            apic.mode_name()
        ));
    }
    apic.software_enable();
    apic.set_tpr(TPR_BLOCK_ALL);
    if apic.irr_has(VECTOR) {
        return Err(reason!("vector {:#x} already pending in the IRR before the device was set up", VECTOR));
    }
    msix_off(pci, bdf);
    let command = cfg.read16(bdf, PCI_COMMAND);
    cfg.write16(bdf, PCI_COMMAND, command & !CMD_INTX_DISABLE);

    let mut d = open::<1>(dev, 0, 16, dma, clock)?;
    let buf = dma.alloc(u64::from(READ), 64).ok_or_else(|| reason!("out of DMA memory"))?;
    let ioapic = Ioapic(ioapic);
    ioapic.program(gsi, redirection_entry(VECTOR, apic.id()));
    let result = (|| {
        let q = &mut d.queues[0];
        q.want_interrupts();
        request(&d.t, q, &[Seg::inp(buf, READ)], clock, 2000)?;
        if !apic.wait_irr(VECTOR, DELIVER_MS, clock) {
            return Err(reason!(
                "{}: used ring moved but vector {:#x} (GSI {}, entry {:#x}) was not in the IRR within {} ms",
                bdf,
                VECTOR,
                gsi,
                ioapic.read(rte_index(gsi)),
                DELIVER_MS
            ));
        }
        // The handler reads the ISR; more work completes before its EOI.
        let first = d.t.isr();
        q.want_interrupts();
        request(&d.t, q, &[Seg::inp(buf, READ)], clock, 2000)?;
        eoi(&apic, VECTOR, clock)?;
        if !apic.wait_irr(VECTOR, DELIVER_MS, clock) {
            return Err(reason!(
                "{}: interrupt lost: a request completed while vector {:#x} was in service (ISR read {:#x} before it), \
                 and after the EOI the vector was not delivered again",
                bdf,
                VECTOR,
                first
            ));
        }
        // Acknowledged before the EOI: no further delivery.
        let second = d.t.isr();
        eoi(&apic, VECTOR, clock)?;
        if apic.wait_irr(VECTOR, HOLD_MS, clock) {
            return Err(reason!(
                "{}: vector {:#x} delivered again after the ISR was read ({:#x}) and EOI'd",
                bdf,
                VECTOR,
                second
            ));
        }
        Ok([first, second])
    })();
    ioapic.mask(gsi);
    let reset = d.t.reset(clock);
    // INTx off again, as the other checks expect it.
    cfg.write16(bdf, PCI_COMMAND, command);
    let isr = result?;
    reset?;
    Ok(Report { gsi, isr })
}

/// Disables MSI-X if the function has it (INTx is only used without).
fn msix_off(pci: &Pci, bdf: Bdf) {
    let cfg = &pci.config;
    let Some(f) = pci.functions().iter().find(|f| f.bdf == bdf) else {
        return;
    };
    if let Some(cap) = f.caps().iter().find(|c| c.id == CAP_MSIX) {
        let ctrl = u16::from(cap.off) + 2;
        cfg.write16(bdf, ctrl, cfg.read16(bdf, ctrl) & !msix::CONTROL_ENABLE);
    }
}

pub fn check(pci: Option<&Pci>, ioapic: Option<u64>, devs: &Devs, dma: &mut Dma, clock: &Clock) -> bool {
    let Some(pci) = pci else {
        emit!("PROBE intx fail PCI was not enumerated");
        return false;
    };
    let Some(ioapic) = ioapic else {
        emit!("PROBE intx fail no IOAPIC in the MADT");
        return false;
    };
    let Some(dev) = devs.of_type(TYPE_RNG).find(|d| matches!(d.id, DevId::Pci(_))) else {
        emit!("PROBE intx fail no virtio-rng PCI function");
        return false;
    };
    match exercise(pci, ioapic, dev, dma, clock) {
        Ok(r) => {
            emit!(
                "PROBE intx ok dev={} gsi={} vector={:#x} isr={:#x},{:#x} redelivered=yes after_ack=clear",
                dev.id,
                r.gsi,
                VECTOR,
                r.isr[0],
                r.isr[1]
            );
            true
        }
        Err(r) => {
            emit!("PROBE intx fail {}", r);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirection_entries_are_level_active_low_and_unmasked() {
        assert_eq!(redirection_entry(0x51, 0), (0xa051, 0));
        assert_eq!(redirection_entry(0x51, 3).1, 0x0300_0000);
        assert_eq!(redirection_entry(0x51, 0).0 & RTE_MASKED, 0);
        assert_eq!(rte_index(0), 0x10);
        assert_eq!(rte_index(17), 0x32);
    }
}
