//! Boots the probe and lets it enumerate kiln's PCI bus through the ECAM that MCFG gives:
//! the host bridge, the BAR layout against the DSDT root bridge's windows, 0xCF8 agreeing
//! with ECAM.

mod common;

use common::ProbeRun;
use std::time::Duration;

fn info_pci(r: &ProbeRun) -> Vec<&str> {
    r.lines
        .iter()
        .filter_map(|l| l.strip_prefix("info pci "))
        .collect()
}

#[test]
fn host_bridge_alone_through_mcfg_ecam_and_cf8() {
    let r = ProbeRun::boot(
        &[
            "--memory",
            "256M",
            "--cmdline",
            "probe.checks=boot,acpi,pci",
        ],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert_eq!(r.field("acpi", "tables"), "FACP,APIC,MCFG,DSDT");
    assert_eq!(r.field("pci", "config"), "mcfg");
    assert_eq!(r.field("pci", "ecam"), "0xe0000000");
    assert_eq!(r.field("pci", "buses"), "0-0");
    assert_eq!(r.field("pci", "functions"), "1");
    assert_eq!(r.field("pci", "cf8"), "same");
    // Bus range, the 0xCF8 ports, the 32-bit and the 64-bit window.
    assert_eq!(r.field("pci", "windows"), "4");
    assert_eq!(
        info_pci(&r),
        vec!["00:00.0 vendor=0x1b36 device=0x0008 class=0x060000 bars=none caps=none"]
    );
    assert!(
        r.e820().contains(&(0xe000_0000, 0x10_0000, 2)),
        "ECAM reserved in e820"
    );
}

#[test]
fn virtio_device_bars_are_placed_by_kiln_inside_the_windows() {
    let r = ProbeRun::boot(
        &[
            "--memory",
            "5G",
            "--rng",
            "--cmdline",
            "probe.checks=pci probe.mem=sample",
        ],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert_eq!(r.field("pci", "functions"), "2");
    assert_eq!(r.field("pci", "bars"), "1");
    assert_eq!(r.field("pci", "assigned"), "0", "kiln placed every BAR");
    let pci = info_pci(&r);
    assert_eq!(
        pci[1],
        "00:01.0 vendor=0x1af4 device=0x1044 class=0xff0000 bars=0:m64:0xc0000000+0x8000 \
         caps=0x09,0x09,0x09,0x09,0x09,0x11"
    );
}
