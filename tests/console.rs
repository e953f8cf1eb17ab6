//! The stdio console on a terminal: raw mode while the guest runs, Ctrl-A x to quit, and
//! the terminal restored afterwards.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the given integers.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned here.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: a zeroed termios is valid for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a terminal.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    common::require_kvm();
    let probe = common::probe();
    let (master, slave) = openpty();
    assert_ne!(
        lflag(&slave) & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );
    let mut child = Command::new(common::kiln())
        .args([
            "run",
            "--cmdline",
            "probe.checks=cpu probe.cpu_iters=100000000000",
            "--kernel",
        ])
        .arg(probe)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");

    // Wait for the guest's first line, then check raw mode is on.
    let mut seen = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("PROBE hello") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no guest output: {:?}",
            String::from_utf8_lossy(&seen)
        );
        // SAFETY: reading into a local buffer from the pty master.
        let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            seen.extend_from_slice(&buf[..n as usize]);
        }
    }
    assert_eq!(
        lflag(&slave) & (libc::ICANON | libc::ECHO),
        0,
        "raw mode while the guest runs"
    );

    // SAFETY: writing two bytes from a local array to the pty master.
    let n = unsafe { libc::write(master.as_raw_fd(), b"\x01x".as_ptr().cast(), 2) };
    assert_eq!(n, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "kiln did not quit on Ctrl-A x");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert_ne!(
        lflag(&slave) & libc::ICANON,
        0,
        "the terminal is restored after kiln exits"
    );
    assert_ne!(lflag(&slave) & libc::ECHO, 0);
}
