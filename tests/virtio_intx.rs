//! INTx from inside the guest: with MSI-X off, the probe routes kiln's virtio-rng INTA# to a
//! level-triggered IOAPIC entry and, holding interrupts off with the task priority, checks
//! that the device's interrupt reaches the local APIC, that one raised while the first is
//! still in service (ISR already read) is delivered again after the EOI (KVM resample
//! irqfd), and that nothing more arrives once the ISR was read before the EOI.

mod common;

use common::ProbeRun;
use std::time::Duration;

#[test]
fn virtio_rng_inta_is_level_triggered_and_loses_no_interrupt() {
    let r = ProbeRun::boot(
        &["--rng", "--cmdline", "probe.checks=pci,intx"],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert_eq!(r.field("intx", "dev"), "00:01.0");
    // Slot 1's INTA#, as the DSDT's _PRT routes it.
    assert_eq!(r.field("intx", "gsi"), "17");
    assert_eq!(r.field("intx", "vector"), "0x51");
    assert_eq!(r.field("intx", "isr"), "0x1,0x1");
    assert_eq!(r.field("intx", "redelivered"), "yes");
    assert_eq!(r.field("intx", "after_ack"), "clear");
}

#[test]
fn intx_works_after_the_msix_check_used_the_same_function() {
    let r = ProbeRun::boot(
        &["--rng", "--cmdline", "probe.checks=pci,msix,intx"],
        Duration::from_secs(60),
    );
    r.assert_clean();
    r.ok("msix");
    assert_eq!(r.field("intx", "redelivered"), "yes");
}
