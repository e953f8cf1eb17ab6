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

#[test]
fn several_devices_get_their_own_slots_and_disjoint_bars() {
    let dir = std::env::temp_dir().join(format!("kiln-pci-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", img.display());
    let r = ProbeRun::boot(
        &[
            "--rng",
            "--disk",
            &disk,
            "--cmdline",
            "probe.checks=pci,rng,blk",
        ],
        Duration::from_secs(60),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    r.assert_clean();
    assert_eq!(r.field("pci", "functions"), "3");
    assert_eq!(r.field("pci", "bars"), "2");
    let pci = info_pci(&r);
    assert!(pci[1].starts_with("00:01.0 vendor=0x1af4 device=0x1044 "));
    assert!(pci[1].contains("bars=0:m64:0xc0000000+0x8000 "));
    assert!(pci[2].starts_with("00:02.0 vendor=0x1af4 device=0x1042 class=0x018000 "));
    assert!(pci[2].contains("bars=0:m64:0xc0008000+0x8000 "));
    assert_eq!(r.field("rng", "dev"), "00:01.0");
    assert_eq!(r.field("blk", "dev"), "00:02.0");
}

#[test]
fn a_bar_the_guest_moves_above_4g_is_followed() {
    let r = ProbeRun::boot(
        &[
            "--rng",
            "--cmdline",
            "probe.checks=pci,rng probe.pci_high=1",
        ],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert_eq!(r.field("pci", "moved"), "1");
    let pci = info_pci(&r);
    assert!(
        pci[1].contains("bars=0:m64:0x100000000+0x8000 "),
        "{}",
        pci[1]
    );
    // The device answers at its new place, notifications included.
    assert_eq!(r.field("rng", "bytes"), "64,64");
}
