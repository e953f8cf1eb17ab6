//! Watching a VMM process: its first output line, its RSS outside guest RAM, and the CPU
//! time of its I/O thread.

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

/// Which thread of a VMM does its I/O.
#[derive(Clone, Copy)]
pub enum IoThread {
    /// The thread with this name (kiln's queue workers: `net-q0`, `blk-q0`).
    Named(&'static str),
    /// The main thread (QEMU's main loop serves the tap).
    Main,
}

/// CPU seconds `which` thread of process `pid` has used so far.
pub fn thread_cpu(pid: u32, which: IoThread) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        let hit = match which {
            IoThread::Named(n) => comm == n,
            IoThread::Main => tid == pid.to_string(),
        };
        if hit {
            // After the name: state is field 3, utime and stime fields 14 and 15.
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            // Clock ticks, far below 2^52: exact as f64.
            #[allow(clippy::cast_precision_loss)]
            return Some(ticks as f64 / hz.max(1) as f64);
        }
    }
    None
}

/// Runs `cmd` (stdin empty, output captured) to its end. Meanwhile samples the CPU time of
/// its thread `io` 0.5 s after the start and again at `secs` s (the guest's measuring span,
/// give or take its boot); returns the output and that thread's share of a core between the
/// two samples (`None` when the thread was not found).
pub fn run_sampling(
    mut cmd: Command,
    secs: u64,
    io: IoThread,
) -> std::io::Result<(std::process::Output, Option<f64>)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let pid = child.id();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let a = thread_cpu(pid, io).map(|c| (c, t0.elapsed()));
    std::thread::sleep(Duration::from_millis(
        secs.saturating_mul(1000).saturating_sub(500),
    ));
    let b = thread_cpu(pid, io).map(|c| (c, t0.elapsed()));
    let out = child.wait_with_output()?;
    let busy = a
        .zip(b)
        .filter(|((_, t0), (_, t1))| t1 > t0)
        .map(|((c0, t0), (c1, t1))| (c1 - c0) / (t1 - t0).as_secs_f64());
    Ok((out, busy))
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
