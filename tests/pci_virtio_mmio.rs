//! virtio-mmio next to virtio-pci: kiln announces the mmio device on the kernel command line,
//! the probe finds it there, and drives it (a disk) while a PCI device (rng) keeps working,
//! also after hostile queues on the mmio device.

mod common;

use common::ProbeRun;
use std::time::Duration;

/// A disk image whose every little-endian 8-byte word is its offset XOR `seed` (the
/// probe's "host pattern").
fn pattern_disk(path: &std::path::Path, len: u64, seed: u64) {
    let bytes: Vec<u8> = (0..len / 8)
        .flat_map(|i| ((i * 8) ^ seed).to_le_bytes())
        .collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn mmio_disk_and_pci_rng_side_by_side_survive_hostile_queues() {
    let dir = std::env::temp_dir().join(format!("kiln-mmio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    pattern_disk(&img, 4 << 20, 0x5eed);
    let disk = format!("path={},serial=mmio0,transport=mmio", img.display());
    let r = ProbeRun::boot(
        &[
            "--memory",
            "512M",
            "--rng",
            "--disk",
            &disk,
            "--cmdline",
            "probe.checks=pci,rng,blk,hostile probe.hostile=blk probe.blk_seed=0x5eed \
             probe.blk_read=0:1M probe.blk_write=2M:1M",
        ],
        Duration::from_secs(120),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    r.assert_clean();
    let cmdline = r.cmdline();
    assert!(
        cmdline.ends_with(" virtio_mmio.device=4K@0xf0000000:5"),
        "{cmdline}"
    );
    assert!(r.has_line("info virtio-mmio base=0xf0000000 size=0x1000 irq=5 type=blk"));
    assert_eq!(r.field("blk", "dev"), "mmio@0xf0000000");
    assert_eq!(r.field("blk", "serial"), "mmio0");
    assert_eq!(r.field("blk", "read"), "1048576");
    assert_eq!(r.field("blk", "write"), "1048576");
    assert_eq!(r.field("rng", "dev"), "00:01.0");
    assert_eq!(r.field("hostile", "target"), "blk");
    assert_eq!(r.field("hostile", "other"), "rng@00:01.0:ok");
}

/// `--rng transport=mmio` and `--console ...,transport=mmio`: both devices are announced on
/// the command line and work over virtio-mmio, the console's output reaching its file.
#[test]
fn rng_and_console_on_virtio_mmio() {
    let dir = std::env::temp_dir().join(format!("kiln-mmio-rc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("console.log");
    let console = format!("file:{},transport=mmio", log.display());
    let r = ProbeRun::boot(
        &[
            "--rng",
            "transport=mmio",
            "--console",
            &console,
            "--cmdline",
            "probe.checks=pci,rng,console",
        ],
        Duration::from_secs(60),
    );
    let written = std::fs::read_to_string(&log).unwrap_or_default();
    std::fs::remove_dir_all(&dir).unwrap();
    r.assert_clean();
    let cmdline = r.cmdline();
    assert!(
        cmdline.ends_with(" virtio_mmio.device=4K@0xf0000000:5 virtio_mmio.device=4K@0xf0001000:6"),
        "{cmdline}"
    );
    assert_eq!(r.field("rng", "dev"), "mmio@0xf0000000");
    assert_eq!(r.field("rng", "bytes"), "64,64");
    assert_eq!(r.field("console", "dev"), "mmio@0xf0001000");
    assert_eq!(written, "kiln-probe console hello\n");
    assert!(r.has_line("info virtio-mmio base=0xf0001000 size=0x1000 irq=6 type=console"));
    // Only the host bridge is on PCI.
    assert_eq!(r.field("pci", "functions"), "1");
}
