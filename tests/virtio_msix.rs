//! MSI-X from inside the guest: the probe enables MSI-X on kiln's virtio-rng PCI function,
//! aims a table entry at its own local APIC and checks, with the task priority raised so
//! nothing is delivered, that the vector lands in the APIC's IRR once the device completes a
//! request (KVM MSI route + irqfd), that a masked entry holds it back with its PBA bit set
//! until it is unmasked, that the function mask does the same for an unmasked entry (a second
//! message while masked is not lost), that a message for APIC 1 reaches CPU 1's IRR and not
//! CPU 0's (and, with 288 vCPUs, that one for an APIC id above 255 gets there through the
//! extended destination ID), that a queue the guest breaks makes the device signal NEEDS_RESET on the
//! configuration vector, and that nothing arrives while MSI-X is disabled.

mod common;

use common::ProbeRun;
use std::time::Duration;

/// Boots the probe with virtio-rng and `cpus` vCPUs, running `cmdline`.
fn boot_rng_cpus(cpus: u32, cmdline: &str, secs: u64) -> ProbeRun {
    ProbeRun::boot(
        &["--rng", "--cpus", &cpus.to_string(), "--cmdline", cmdline],
        Duration::from_secs(secs),
    )
}

#[test]
fn virtio_rng_msix_vector_reaches_the_local_apic() {
    let r = ProbeRun::boot(
        &["--rng", "--cmdline", "probe.checks=pci,rng,msix"],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert_eq!(r.field("msix", "dev"), "00:01.0");
    assert_eq!(r.field("msix", "enable"), "1");
    assert_eq!(r.field("msix", "vector"), "0x41");
    assert_eq!(r.field("msix", "masked_vector"), "0x42");
    // Two vectors (queue 0 and configuration): the probe uses entry 1.
    assert_eq!(r.field("msix", "entry"), "1");
    assert_eq!(r.field("msix", "apic"), "xapic:0");
    assert_eq!(
        r.field("msix", "pba"),
        "set",
        "kiln keeps a masked vector's pending bit"
    );
    // Then the function mask with the entry unmasked: two reads held back (the pending bit
    // set after each), one delivery when the mask is cleared.
    assert_eq!(r.field("msix", "fmask_vector"), "0x43");
    assert_eq!(
        r.field("msix", "fmask_pba"),
        "set",
        "kiln keeps the pending bit of a vector held by the function mask"
    );
    // One vCPU: no other APIC to aim at.
    assert_eq!(r.field("msix", "other_apic"), "none");
    // Last, a head past the descriptor table: NEEDS_RESET, a new config_generation, and the
    // configuration vector in the IRR.
    assert_eq!(r.field("msix", "config_vector"), "0x45");
}

#[test]
fn msix_message_for_apic_1_reaches_cpu_1_only() {
    let r = boot_rng_cpus(2, "probe.checks=smp,pci,msix", 60);
    r.assert_clean();
    assert_eq!(r.field("smp", "cpus"), "2");
    assert_eq!(r.field("msix", "apic"), "xapic:0");
    assert_eq!(r.field("msix", "other_vector"), "0x44");
    // In APIC 1's IRR (read by CPU 1 itself), and not in APIC 0's.
    assert_eq!(r.field("msix", "other_apic"), "1");
}

#[test]
fn msix_message_reaches_an_apic_id_above_255_through_the_extended_destination_id() {
    // 288 vCPUs: kiln offers KVM_FEATURE_MSI_EXT_DEST_ID and moves the id's bits 14:8 from
    // address bits 11:5 to where KVM's x2APIC routes read them. The probe aims the entry at
    // an AP past 255 (its BSP switches to x2APIC to reach that AP by NMI).
    let r = boot_rng_cpus(288, "probe.checks=smp,pci,msix", 120);
    r.assert_clean();
    assert_eq!(r.field("smp", "cpus"), "288");
    assert_eq!(r.field("msix", "apic"), "x2apic:0");
    let other: u32 = r.field("msix", "other_apic").parse().unwrap();
    assert!((256..288).contains(&other), "other_apic={other}");
    assert_eq!(r.field("msix", "config_vector"), "0x45");
}

#[test]
fn msix_still_works_after_hostile_queues_and_with_several_vcpus() {
    let r = boot_rng_cpus(4, "probe.checks=smp,pci,hostile,msix probe.hostile=rng", 60);
    r.assert_clean();
    r.ok("hostile");
    assert_eq!(r.field("msix", "pba"), "set");
    assert_eq!(r.field("msix", "fmask_pba"), "set");
    assert_ne!(r.field("msix", "other_apic"), "none");
}

#[test]
fn without_msix_enabled_no_vector_reaches_the_local_apic() {
    let r = ProbeRun::boot(
        &[
            "--rng",
            "--cmdline",
            "probe.checks=pci,msix probe.msix_enable=0",
        ],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert_eq!(r.field("msix", "enable"), "0");
    assert_eq!(r.field("msix", "irr"), "clear");
}

#[test]
fn msix_check_fails_without_a_virtio_rng_function() {
    let r = ProbeRun::boot(&["--cmdline", "probe.checks=msix"], Duration::from_secs(60));
    assert_eq!(
        r.line("msix"),
        "msix fail no virtio-rng PCI function",
        "{}",
        r.lines.join("\n")
    );
}
