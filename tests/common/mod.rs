//! Helpers for tests that boot real guests with the `kiln` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `kiln` binary under test.
pub fn kiln() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// Fails the test, loudly, when KVM is not usable: these tests never pass by skipping.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "this test boots a real VM and needs /dev/kvm, which cannot be opened: {e}. \
             Run the tests on a host with KVM (load kvm_intel or kvm_amd, and make /dev/kvm \
             readable and writable by this user)."
        );
    }
}

/// Builds the probe guest (once per test binary) and returns its path.
pub fn probe() -> &'static Path {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| {
        let manifest = root().join("guest/probe/Cargo.toml");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--quiet",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--manifest-path",
            ])
            .arg(&manifest)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .status()
            .expect("cannot run cargo to build the probe guest");
        assert!(status.success(), "building the probe guest failed");
        let path = root().join("guest/probe/target/x86_64-unknown-linux-gnu/release/probe");
        assert!(
            path.exists(),
            "the probe was built but {} is missing",
            path.display()
        );
        path
    })
}

/// Runs `kiln` with `args`, stdin from /dev/null, failing the test after `timeout`.
pub fn run_kiln(args: &[&str], timeout: Duration) -> Output {
    run_measured(args, timeout, u64::MAX).0
}

/// Runs `kiln` with `args`; while it runs, samples its peak RSS (KiB) outside mappings of
/// at least `guest_min_kib` (guest RAM), unless that is `u64::MAX`.
pub fn run_measured(args: &[&str], timeout: Duration, guest_min_kib: u64) -> (Output, u64) {
    let mut child = Command::new(kiln())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kiln");
    let pid = child.id();
    // Drain the pipes while the VM runs so a chatty guest cannot block on a full pipe.
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let start = Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait on kiln") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
            let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!(
                "kiln {args:?} did not finish within {timeout:?}\nstdout:\n{out}\nstderr:\n{err}"
            );
        }
        if guest_min_kib != u64::MAX {
            peak = peak.max(vmm_rss_kib(pid, guest_min_kib).unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    (out, peak)
}

/// RSS in KiB of `pid`'s mappings smaller than `guest_min_kib` (larger ones are guest RAM).
pub fn vmm_rss_kib(pid: u32, guest_min_kib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut skip) = (0, false);
    for line in smaps.lines() {
        let kib = |rest: &str| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        };
        if let Some(rest) = line.strip_prefix("Size:") {
            skip = kib(rest)? >= guest_min_kib;
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            if !skip {
                total += kib(rest)?;
            }
        }
    }
    Some(total)
}

/// What the probe printed in one run.
pub struct ProbeRun {
    /// The `PROBE ...` lines, without the prefix.
    pub lines: Vec<String>,
    /// kiln's exit code.
    pub code: Option<i32>,
    /// kiln's stderr.
    pub stderr: String,
}

impl ProbeRun {
    /// Boots the probe with `args` added to `kiln run --kernel PROBE`.
    pub fn boot(args: &[&str], timeout: Duration) -> ProbeRun {
        Self::boot_measured(args, timeout, u64::MAX).0
    }

    /// As [`ProbeRun::boot`], also sampling kiln's peak RSS (KiB) outside mappings of at
    /// least `guest_min_kib` (guest RAM) every few milliseconds.
    pub fn boot_measured(args: &[&str], timeout: Duration, guest_min_kib: u64) -> (ProbeRun, u64) {
        require_kvm();
        let probe = probe().to_str().expect("utf-8 path").to_string();
        let mut all = vec!["run", "--kernel", probe.as_str()];
        all.extend_from_slice(args);
        let (out, peak) = run_measured(&all, timeout, guest_min_kib);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let run = ProbeRun {
            lines: stdout
                .lines()
                .filter_map(|l| l.strip_prefix("PROBE "))
                .map(str::to_string)
                .collect(),
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        (run, peak)
    }

    /// The result line of `check` (`"<check> ok ..."` or `"<check> fail ..."`).
    pub fn line(&self, check: &str) -> &str {
        let prefix = format!("{check} ");
        self.lines
            .iter()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no `PROBE {check}` line in:\n{}\nstderr: {}",
                    self.lines.join("\n"),
                    self.stderr
                )
            })
    }

    /// Asserts `check` passed and returns its line.
    pub fn ok(&self, check: &str) -> &str {
        let line = self.line(check);
        assert!(
            line.starts_with(&format!("{check} ok")),
            "check failed: PROBE {line}\nall output:\n{}",
            self.lines.join("\n")
        );
        line
    }

    /// A `key=value` field of `check`'s line.
    pub fn field(&self, check: &str, key: &str) -> String {
        let line = self.ok(check);
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in PROBE {line}"))
            .to_string()
    }

    /// The kernel command line the probe saw (its `info cmdline=` line).
    pub fn cmdline(&self) -> &str {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix("info cmdline="))
            .unwrap_or_else(|| {
                panic!(
                    "no `PROBE info cmdline=` line in:\n{}",
                    self.lines.join("\n")
                )
            })
    }

    /// Whether the probe printed exactly `line` (without its `PROBE ` prefix).
    pub fn has_line(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    /// Asserts the run ended cleanly: every check passed, power-off, exit status 0.
    pub fn assert_clean(&self) {
        let summary = self.line("summary");
        assert!(
            summary.ends_with("fail=0"),
            "PROBE {summary}\n{}",
            self.lines.join("\n")
        );
        assert_eq!(
            self.lines.first().map(String::as_str),
            Some("hello"),
            "first line must be PROBE hello"
        );
        assert_eq!(self.lines.last().map(String::as_str), Some("poweroff"));
        assert_eq!(
            self.code,
            Some(0),
            "kiln exit status; stderr: {}",
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "kiln panicked: {}",
            self.stderr
        );
    }

    /// The e820 map the probe saw, as (start, size, type).
    pub fn e820(&self) -> Vec<(u64, u64, u32)> {
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("info e820 "))
            .map(|l| {
                let f: Vec<&str> = l
                    .split_whitespace()
                    .map(|w| w.split_once('=').expect("k=v").1)
                    .collect();
                (hex(f[0]), hex(f[1]), f[2].parse().expect("type"))
            })
            .collect()
    }
}

/// `len` pseudo-random bytes (xorshift64 from `seed`): test data that compresses badly and
/// is the same on every run.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// Only one huge-memory VM at a time: KVM may need gigabytes of host memory for each.
pub fn big_vm_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
