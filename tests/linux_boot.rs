//! Boots the stock Debian cloud kernel (a bzImage with an LZ4 payload, which kiln unpacks on
//! the host) and checks its early console: the e820 map kiln gave it, kiln's ACPI tables, and
//! the CPU count from the MADT. On an ordinary KVM host the kernel boots on to userspace;
//! the nested KVM these tests also run on stops stock kernels shortly after this point, so
//! the test stops once it has seen the CPU count.
//!
//! The kernel comes from `guest/fetch-linux.sh` (CI runs it); without it this test fails
//! and says so.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn kernel() -> PathBuf {
    let path = std::env::var_os("KILN_TEST_LINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::root().join("guest/cache/vmlinuz-cloud-amd64"));
    assert!(
        path.exists(),
        "{} is missing: run guest/fetch-linux.sh (needs apt-get update) or set KILN_TEST_LINUX \
         to a Linux bzImage",
        path.display()
    );
    path
}

/// Boots Linux and collects console lines until `done` matches one or `timeout` passes.
fn boot_linux(extra: &[&str], done: &str, timeout: Duration) -> Vec<String> {
    common::require_kvm();
    let mut child = Command::new(common::kiln())
        .args(["run", "--kernel"])
        .arg(kernel())
        .args([
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    let mut finished = false;
    while start.elapsed() < timeout {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let hit = line.contains(done);
                lines.push(line);
                if hit {
                    finished = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "kiln panicked: {stderr}");
    assert!(
        finished,
        "no `{done}` within {timeout:?}; console:\n{}\nkiln stderr:\n{stderr}",
        lines.join("\n")
    );
    lines
}

fn has(lines: &[String], needle: &str) -> bool {
    lines.iter().any(|l| l.contains(needle))
}

fn assert_has(lines: &[String], needle: &str) {
    assert!(
        has(lines, needle),
        "console lacks `{needle}`:\n{}",
        lines.join("\n")
    );
}

#[test]
fn debian_cloud_kernel_sees_kilns_e820_acpi_and_cpus() {
    let lines = boot_linux(
        &["--cpus", "3", "--memory", "256M"],
        "smpboot: Allowing",
        Duration::from_secs(240),
    );
    assert_has(
        &lines,
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
    );
    assert_has(
        &lines,
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
    );
    assert_has(
        &lines,
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
    );
    assert_has(&lines, "Hypervisor detected: KVM");
    assert_has(&lines, "ACPI: RSDP 0x00000000000E0000 000024 (v02 KILNVM)");
    assert_has(&lines, "ACPI: FACP ");
    assert_has(&lines, "ACPI: DSDT ");
    assert_has(&lines, "ACPI: APIC ");
    assert_has(
        &lines,
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    );
    assert_has(&lines, "smpboot: Allowing 3 CPUs, 0 hotplug CPUs");
}
