//! Watching a VMM process: its first output line and its RSS outside guest RAM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one VMM run gave.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// From spawn to the first line on stdout.
    pub first_line: Duration,
    /// Peak RSS in KiB of all mappings except guest RAM.
    pub peak_rss_kib: u64,
    /// Everything the guest printed.
    pub output: Vec<String>,
    /// Exit status.
    pub success: bool,
}

/// RSS in KiB of all mappings of `pid` except guest RAM: mappings whose size is within
/// `[guest_ram, guest_ram + slack)` (QEMU rounds its block up a little), or at least 1 GiB
/// when `guest_ram_kib` is 1 GiB (a huge guest's RAM is several mappings).
pub fn rss_without_guest(pid: u32, guest_ram_kib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut skip = false;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Size:") {
            let size: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            skip =
                size >= guest_ram_kib && (size < guest_ram_kib + 8192 || guest_ram_kib >= 1 << 20);
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            if !skip {
                total += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        }
    }
    Some(total)
}

/// Runs `cmd`, timing its first stdout line and sampling RSS every millisecond.
pub fn run_vmm(
    mut cmd: Command,
    guest_ram_kib: u64,
    timeout: Duration,
) -> std::io::Result<RunResult> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                if let Some(r) = rss_without_guest(pid, guest_ram_kib) {
                    peak = peak.max(r);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            peak
        })
    };
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let mut first_line = None;
    let mut output = Vec::new();
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while !done.load(Ordering::Relaxed) && t.elapsed() < timeout {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !done.load(Ordering::Relaxed) {
                // SAFETY: sends SIGKILL to the child we spawned.
                unsafe { libc::kill(i32::try_from(pid).unwrap_or(0), libc::SIGKILL) };
            }
        })
    };
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if first_line.is_none() {
            first_line = Some(start.elapsed());
        }
        output.push(line);
    }
    let status = child.wait()?;
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    let _ = watchdog.join();
    Ok(RunResult {
        first_line: first_line.ok_or_else(|| std::io::Error::other("the guest printed nothing"))?,
        peak_rss_kib: peak,
        output,
        success: status.success(),
    })
}

/// Median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `qemu-system-x86_64 -M microvm` (PCIe, KVM, 1 vCPU, 512 MiB, serial on stdout, no
/// default devices) booting `probe` with `cmdline`, plus `devices` (its -drive/-netdev and
/// -device arguments).
pub fn qemu_microvm(
    qemu: &std::path::Path,
    probe: &std::path::Path,
    cmdline: &str,
    devices: &[&str],
) -> std::process::Command {
    let mut c = std::process::Command::new(qemu);
    c.args([
        "-M",
        "microvm,pcie=on",
        "-enable-kvm",
        "-smp",
        "1",
        "-m",
        "512M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ])
    .args(devices)
    .args(["-append", cmdline, "-kernel"])
    .arg(probe);
    c
}

/// The guest's `PROBE <check> ok ...` line in a finished run's standard output, or an error
/// that names `who` and shows everything the run printed.
pub fn result_line(out: &std::process::Output, check: &str, who: &str) -> Result<String, String> {
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("PROBE {check} ok ");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .ok_or_else(|| {
            format!(
                "{who}: no {check} result:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}
