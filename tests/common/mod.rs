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

/// Runs `kiln` with `args`, stdin from /dev/null, killing it after `timeout`.
pub fn run_kiln(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(kiln())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kiln");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait on kiln").is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect kiln output");
            panic!(
                "kiln {args:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect kiln output")
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
        require_kvm();
        let probe = probe().to_str().expect("utf-8 path").to_string();
        let mut all = vec!["run", "--kernel", probe.as_str()];
        all.extend_from_slice(args);
        let out = run_kiln(&all, timeout);
        let stdout = String::from_utf8_lossy(&out.stdout);
        ProbeRun {
            lines: stdout
                .lines()
                .filter_map(|l| l.strip_prefix("PROBE "))
                .map(str::to_string)
                .collect(),
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
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

/// Only one huge-memory VM at a time: KVM may need gigabytes of host memory for each.
pub fn big_vm_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
