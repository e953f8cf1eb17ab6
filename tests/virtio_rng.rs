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
