//! virtio devices seen from inside the probe guest: what the host wrote the guest reads,
//! what the guest writes is in the host file after power-off (raw and qcow2), read-only
//! disks refuse writes, a second kiln refuses a disk in use, hostile queues break only their
//! device, the host pings the guest over a tap, the virtio console talks over a socket, and
//! every `--disk`/`--net` mistake is a clear error.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ProbeRun;

const SEED: u64 = 0x5eed_1234;
const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("kiln-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host pattern: every little-endian 8-byte word is its offset XOR `SEED`.
fn host_pattern(len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| ((i * 8) ^ SEED).to_le_bytes())
        .collect()
}

/// Asserts `data[start..start+len]` holds the probe's pattern: `!(offset ^ SEED)`.
fn assert_probe_pattern(data: &[u8], start: u64, len: u64) {
    for off in (start..start + len).step_by(8) {
        let i = usize::try_from(off).unwrap();
        let word = u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
        assert_eq!(word, !(off ^ SEED), "guest data at byte {off}");
    }
}

fn blk_cmdline(extra: &str) -> String {
    format!("probe.checks=pci,blk probe.blk_seed={SEED:#x} probe.blk_read=0:1M probe.blk_write=2M:1M {extra}")
}

#[test]
fn raw_disk_round_trip() {
    let s = Scratch::new("raw-disk");
    let img = s.path("disk.img");
    std::fs::write(&img, host_pattern(8 * MIB)).unwrap();
    let disk = format!("path={},serial=kiln-raw0", img.display());
    let r = ProbeRun::boot(
        &["--disk", &disk, "--cmdline", &blk_cmdline("")],
        Duration::from_secs(120),
    );
    r.assert_clean();
    let line = r.ok("blk");
    for want in [
        "serial=kiln-raw0",
        "ro=0",
        "read=1048576",
        "write=1048576",
        "flush=ok",
        "oob=refused",
        "discard=ok",
        "write_zeroes=ok",
    ] {
        assert!(line.contains(want), "{want} missing in PROBE {line}");
    }
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len() as u64, 8 * MIB, "the disk keeps its size");
    assert_probe_pattern(&data, 2 * MIB, MIB);
    assert_eq!(
        &data[..MIB_USIZE],
        &host_pattern(MIB)[..],
        "the guest did not touch what it only read"
    );
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect(
        "these tests need qemu-img (Debian package qemu-utils: apt-get install qemu-utils); they do not skip",
    );
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn qcow2_disk_round_trip_through_the_library() {
    let s = Scratch::new("qcow2-disk");
    let raw = s.path("in.raw");
    std::fs::write(&raw, host_pattern(8 * MIB)).unwrap();
    let qcow2 = s.path("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
    // The format is probed: no format= given.
    let disk = format!("path={}", qcow2.display());
    let r = ProbeRun::boot(
        &["--disk", &disk, "--cmdline", &blk_cmdline("")],
        Duration::from_secs(120),
    );
    r.assert_clean();
    assert!(r.ok("blk").contains("write=1048576"), "{}", r.ok("blk"));
    let check = qemu_img(&["check", qcow2.to_str().unwrap()]);
    assert!(
        check.contains("No errors were found"),
        "qemu-img check after kiln wrote: {check}"
    );
    let back = s.path("out.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        qcow2.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    let data = std::fs::read(&back).unwrap();
    assert_probe_pattern(&data, 2 * MIB, MIB);
    assert_eq!(&data[..MIB_USIZE], &host_pattern(MIB)[..]);
}

#[test]
fn read_only_disk_refuses_writes() {
    let s = Scratch::new("ro-disk");
    let img = s.path("disk.img");
    let original = host_pattern(4 * MIB);
    std::fs::write(&img, &original).unwrap();
    let disk = format!("path={},readonly=on", img.display());
    let r = ProbeRun::boot(
        &["--disk", &disk, "--cmdline", &blk_cmdline("")],
        Duration::from_secs(120),
    );
    r.assert_clean();
    let line = r.ok("blk");
    assert!(
        line.contains("ro=1") && line.contains("write=refused:ioerr"),
        "PROBE {line}"
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        original,
        "a read-only disk's file is unchanged"
    );
}

#[test]
fn second_kiln_refuses_a_disk_in_use() {
    common::require_kvm();
    let s = Scratch::new("locked-disk");
    let img = s.path("disk.img");
    std::fs::write(&img, host_pattern(MIB)).unwrap();
    let disk = format!("path={}", img.display());
    let probe = common::probe();
    let mut first = Command::new(common::kiln())
        .args([
            "run",
            "--disk",
            &disk,
            "--cmdline",
            "probe.checks=cpu probe.cpu_iters=100000000000",
            "--kernel",
        ])
        .arg(probe)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("PROBE hello"),
        "the first VM started"
    );
    let out = common::run_kiln(
        &["run", "--disk", &disk, "--kernel", probe.to_str().unwrap()],
        Duration::from_secs(30),
    );
    let _ = first.kill();
    let _ = first.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(img.to_str().unwrap()),
        "the error names the image: {err}"
    );
    assert!(
        err.contains("in use") || err.contains("lock"),
        "the error says why: {err}"
    );
    assert!(out.stdout.is_empty(), "the second guest must not start");
}

#[test]
fn hostile_queues_on_a_pci_disk_leave_the_rng_working() {
    let s = Scratch::new("hostile-disk");
    let img = s.path("disk.img");
    std::fs::write(&img, host_pattern(4 * MIB)).unwrap();
    let disk = format!("path={}", img.display());
    let r = ProbeRun::boot(
        &[
            "--rng",
            "--disk",
            &disk,
            "--cmdline",
            "probe.checks=pci,rng,hostile probe.hostile=blk",
        ],
        Duration::from_secs(120),
    );
    r.assert_clean();
    let line = r.ok("hostile");
    assert!(
        line.contains("target=blk") && line.contains(":ok"),
        "PROBE {line}"
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

/// A tap created for one test and deleted afterwards.
struct Tap(String);

impl Tap {
    fn new(host_ip: &str) -> Tap {
        let name = format!("kt{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("iproute2's ip is needed for the tap tests");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let tap = Tap(name);
        ip(&["addr", "add", host_ip, "dev", &tap.0]);
        ip(&["link", "set", &tap.0, "up"]);
        tap
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn host_pings_the_guest_over_a_tap() {
    common::require_kvm();
    let tap = Tap::new("10.213.7.1/24");
    let net = format!("tap={}", tap.0);
    let mut vm = Command::new(common::kiln())
        .args(["run", "--net", &net, "--cmdline"])
        .arg(
            "probe.checks=pci,net probe.net_ip=10.213.7.2/24 probe.net_secs=8 probe.net_min_echo=3",
        )
        .arg("--kernel")
        .arg(common::probe())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = vm.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    // Ping until three replies came back (the guest needs a moment to bring its queues up).
    let start = Instant::now();
    let mut replies = 0;
    while replies < 3 && start.elapsed() < Duration::from_secs(7) {
        let out = Command::new("ping")
            .args(["-c", "1", "-W", "1", "10.213.7.2"])
            .output()
            .expect("ping is needed (Debian package iputils-ping)");
        if out.status.success() {
            replies += 1;
        }
    }
    let status = vm.wait().unwrap();
    let lines = reader.join().unwrap();
    assert_eq!(
        replies,
        3,
        "the guest answered {replies} of the host's pings; guest output:\n{}",
        lines.join("\n")
    );
    assert!(status.success(), "kiln exit {status:?}");
    let net = lines
        .iter()
        .find(|l| l.starts_with("PROBE net ok"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(!net.contains("echo=0"), "{net}");
}

#[test]
fn console_talks_over_a_unix_socket() {
    common::require_kvm();
    let s = Scratch::new("console-socket");
    let sock = s.path("console.sock");
    let spec = format!("socket:{}", sock.display());
    let vm = Command::new(common::kiln())
        .args([
            "run",
            "--console",
            &spec,
            "--cmdline",
            "probe.checks=pci,console probe.console_wait_ms=10000",
            "--kernel",
        ])
        .arg(common::probe())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "cannot connect to {}: {e}",
                    sock.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "kiln-probe console hello\n");
    (&stream).write_all(b"hello from the host\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "kiln-probe console echo hello from the host\n");
    let out = vm.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("PROBE console ok") && stdout.contains("read=hello from the host"),
        "{stdout}"
    );
}

fn kiln_fails(args: &[&str]) -> String {
    let out = common::run_kiln(args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "the guest must not start: {args:?}");
    assert!(
        matches!(out.status.code(), Some(1) | Some(2)),
        "{args:?}: {err}"
    );
    err
}

#[test]
fn disk_and_net_mistakes_are_clear_errors() {
    common::require_kvm();
    let probe = common::probe().to_str().unwrap().to_string();
    let run = |extra: &[&str]| {
        let mut a = vec!["run", "--kernel", probe.as_str()];
        a.extend_from_slice(extra);
        kiln_fails(&a)
    };
    let e = run(&["--disk", "path=/nonexistent/disk.img"]);
    assert!(
        e.contains("/nonexistent/disk.img") && e.contains("does not exist"),
        "{e}"
    );
    let e = run(&["--disk", "path=/tmp,serial=x"]);
    assert!(e.contains("--disk") && e.contains("/tmp"), "{e}");
    let e = run(&["--disk", "file=/tmp/x"]);
    assert!(e.contains("--disk") && e.contains("unknown option"), "{e}");
    let e = run(&["--disk", "path=/tmp/x,queues=0"]);
    assert!(e.contains("queues=0"), "{e}");
    let e = run(&["--net", "tap=this-name-is-too-long"]);
    assert!(e.contains("--net") && e.contains("15 characters"), "{e}");
    let e = run(&["--net", "tap=t0,mac=01:02:03:04:05:06"]);
    assert!(e.contains("multicast"), "{e}");
    let e = run(&["--rng", "transport=usb"]);
    assert!(e.contains("--rng") && e.contains("transport=usb"), "{e}");
    let e = run(&["--console", "stdio,speed=9600"]);
    assert!(
        e.contains("--console") && e.contains("unknown option"),
        "{e}"
    );
}

#[test]
fn tap_without_permission_names_the_tap_and_the_fix() {
    common::require_kvm();
    // Root without CAP_NET_ADMIN cannot create a tap.
    let name = format!("kn{}", std::process::id() % 100_000);
    let out = Command::new("setpriv")
        .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin"])
        .arg(common::kiln())
        .args(["run", "--net", &format!("tap={name}"), "--kernel"])
        .arg(common::probe())
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&name), "the error names the tap: {err}");
    assert!(
        err.contains("CAP_NET_ADMIN")
            || err.contains("permission")
            || err.contains("not permitted"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
