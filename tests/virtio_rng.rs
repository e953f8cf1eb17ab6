//! virtio-rng end to end: the probe's polling virtio-pci driver reads entropy through
//! kiln's virtio-pci transport, then attacks the device with malformed queues; kiln keeps
//! running and the device works again after a reset.

mod common;

use common::ProbeRun;
use std::time::Duration;

#[test]
fn probe_reads_entropy_through_virtio_pci() {
    let r = ProbeRun::boot(
        &["--rng", "--cmdline", "probe.checks=pci,rng"],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert_eq!(r.field("rng", "dev"), "00:01.0");
    assert_eq!(r.field("rng", "bytes"), "64,64");
}

#[test]
fn hostile_queues_put_the_device_in_needs_reset_and_kiln_keeps_running() {
    let r = ProbeRun::boot(
        &[
            "--rng",
            "--cmdline",
            "probe.checks=pci,rng,hostile probe.hostile=rng",
        ],
        Duration::from_secs(60),
    );
    r.assert_clean();
    r.ok("hostile");
    assert_eq!(r.field("hostile", "cases"), "8");
    let needs_reset: u32 = r.field("hostile", "needs_reset").parse().unwrap();
    assert!(needs_reset >= 6, "PROBE {}", r.line("hostile"));
    for case in [
        "loop",
        "oob_addr",
        "avail_idx",
        "bad_head",
        "bad_next",
        "bad_size",
        "ring_oob",
    ] {
        let line = r
            .lines
            .iter()
            .find(|l| l.starts_with("info hostile") && l.contains(&format!("case={case} ")))
            .unwrap_or_else(|| panic!("no hostile line for {case}"));
        assert!(line.contains("result=needs_reset"), "PROBE {line}");
        assert!(line.ends_with("recovered=yes"), "PROBE {line}");
    }
    // The guest-triggered log lines are there, rate-limited.
    let warnings = r.stderr.matches("needs reset").count();
    assert!(
        (1..=10).contains(&warnings),
        "{warnings} lines:\n{}",
        r.stderr
    );
}

#[test]
fn without_rng_there_is_no_virtio_device() {
    let r = ProbeRun::boot(&["--cmdline", "probe.checks=rng"], Duration::from_secs(60));
    assert!(
        r.line("rng").starts_with("rng fail"),
        "PROBE {}",
        r.line("rng")
    );
}

/// Pauses, saves, restores and resumes the VM over and over while the guest drives the
/// device (enumeration, entropy reads, hostile queues and resets): every cycle's device
/// state round-trips through JSON and goes back in, and the guest never notices.
#[test]
fn device_state_survives_pause_save_restore_cycles() {
    use kiln_vmm::config::{BootEntry, SerialConfig, VmConfig};
    use kiln_vmm::devices::{DeviceStates, VirtioDeviceState};
    use kiln_vmm::{Vm, VmOutcome};

    common::require_kvm();
    let dir = std::env::temp_dir().join(format!("kiln-rng-cycles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let console = dir.join("console.log");
    let cfg = VmConfig {
        kernel: common::probe().to_path_buf(),
        initrd: None,
        cmdline: "probe.checks=pci,rng,hostile probe.hostile=rng".into(),
        cpus: 1,
        memory: 256 << 20,
        serial: SerialConfig::File(console.clone()),
        entry: BootEntry::Auto,
        disks: vec![],
        nets: vec![],
        rng: Some(kiln_vmm::config::RngConfig::default()),
        console: None,
    };
    let mut vm = Vm::build(&cfg).expect("build VM");
    let mut activated = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(3));
        vm.pause().expect("pause");
        let states = vm.save_device_states().expect("save device states");
        assert_eq!(states.virtio.len(), 1);
        let json = serde_json::to_string(&states).unwrap();
        let back: DeviceStates = serde_json::from_str(&json).unwrap();
        assert_eq!(back, states, "serde round trip is lossless");
        if let VirtioDeviceState::Pci { slot, state } = &states.virtio[0] {
            assert_eq!(*slot, 1);
            activated += usize::from(state.transport.activated);
        }
        vm.restore_device_states(back)
            .expect("restore device states");
        vm.resume().expect("resume");
    }
    assert_eq!(vm.run().expect("run to power-off"), VmOutcome::PowerOff);
    let out = std::fs::read_to_string(&console).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.contains("PROBE rng ok"), "{out}");
    assert!(out.contains("PROBE hostile ok"), "{out}");
    assert!(out.contains("PROBE summary ok=3 fail=0"), "{out}");
    eprintln!("{activated} of 100 snapshots caught the device running");
}
