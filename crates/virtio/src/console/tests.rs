//! virtio-console tests: socket, file and pipe (stdio) backends against a driver-side queue.

// Test sizes are small.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_devices::virtio::{Activation, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::testing::{guest_memory, TestDriver, TestInterrupt};

struct Rig {
    dev: Console,
    rx: TestDriver,
    tx: TestDriver,
    irq: Arc<TestInterrupt>,
    rx_bufs: std::collections::HashMap<u32, GuestAddress>,
}

fn activate(dev: Console) -> Rig {
    activate_with(dev, 8)
}

fn activate_with(mut dev: Console, rx_buffers: usize) -> Rig {
    let mem = guest_memory(8 << 20);
    let mut rx = TestDriver::new(&mem, 0, 64);
    let mut tx = TestDriver::new(&mem, 2 << 20, 64);
    let irq = TestInterrupt::new();
    let f = dev.features();
    dev.activate(Activation {
        mem,
        features: f,
        queues: vec![rx.active(0), tx.active(1)],
        interrupt: irq.clone(),
    })
    .unwrap();
    let mut r = Rig {
        dev,
        rx,
        tx,
        irq,
        rx_bufs: Default::default(),
    };
    for _ in 0..rx_buffers {
        r.post_rx();
    }
    r.rx.kick();
    r
}

impl Rig {
    fn post_rx(&mut self) {
        let b = self.rx.alloc(64);
        let h = self.rx.add_chain(&[(b, 64, true)]);
        self.rx_bufs.insert(u32::from(h), b);
    }

    fn write(&mut self, text: &[u8]) {
        let b = self.tx.buffer(text);
        self.tx.add_chain(&[(b, text.len() as u32, false)]);
        self.tx.kick();
        self.tx.wait_used();
    }

    /// Reads guest input until `want` bytes arrived.
    fn read(&mut self, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            let (id, len) = self.rx.wait_used();
            let mut b = vec![0u8; len as usize];
            self.rx.mem().read_slice(&mut b, self.rx_bufs[&id]).unwrap();
            got.extend_from_slice(&b);
            self.post_rx();
            self.rx.kick();
        }
        got
    }
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

#[test]
fn socket_round_trip_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.sock");
    let dev = Console::new(ConsoleParams::new(ConsoleBackend::Socket(path.clone()))).unwrap();
    let mut r = activate(dev);
    // Output before anyone connects waits for the first client.
    r.write(b"early\n");
    let mut c = UnixStream::connect(&path).unwrap();
    assert_eq!(read_exact_timeout(&mut c, 6), b"early\n");
    r.write(b"hello\n");
    assert_eq!(read_exact_timeout(&mut c, 6), b"hello\n");
    c.write_all(b"typed\n").unwrap();
    assert_eq!(r.read(6), b"typed\n");
    // A second client is turned away while the first is connected.
    let mut extra = UnixStream::connect(&path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(extra.read(&mut b).unwrap(), 0, "closed at once");
    // The client leaves; the next one takes over.
    drop(c);
    std::thread::sleep(Duration::from_millis(20));
    r.write(b"between\n");
    let mut c2 = UnixStream::connect(&path).unwrap();
    assert_eq!(read_exact_timeout(&mut c2, 8), b"between\n");
    c2.write_all(b"again\n").unwrap();
    assert_eq!(r.read(6), b"again\n");
    assert!(r.irq.reset_reasons().is_empty());
    drop(r);
    assert!(!path.exists(), "socket removed with the device");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array, which lives across the call.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn stdio_backend_moves_bytes_both_ways_and_survives_end_of_input() {
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let backend = Backend::fds(in_r.as_raw_fd(), out_w.as_raw_fd()).unwrap();
    drop((in_r, out_w));
    let dev = Console::with_backend(backend, 64).unwrap();
    let mut r = activate(dev);
    r.write(b"to stdout\n");
    let mut out = std::fs::File::from(out_r);
    let mut b = [0u8; 10];
    out.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"to stdout\n");
    let mut input = std::fs::File::from(in_w);
    input.write_all(b"from stdin\n").unwrap();
    assert_eq!(r.read(11), b"from stdin\n");
    drop(input);
    // End of input: output still works, nothing breaks.
    std::thread::sleep(Duration::from_millis(20));
    r.write(b"more\n");
    let mut b = [0u8; 5];
    out.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"more\n");
    assert!(r.irq.reset_reasons().is_empty());
}

#[test]
fn file_backend_appends_guest_output_and_emergency_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let dev = Console::new(ConsoleParams::new(ConsoleBackend::File(path.clone()))).unwrap();
    assert_ne!(dev.features() & F_EMERG_WRITE, 0);
    let mut r = activate(dev);
    r.write(b"line one\n");
    r.dev.write_config(EMERG_WR, &u32::from(b'!').to_le_bytes());
    r.dev.write_config(0, &[9, 9]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read(&path).unwrap() != b"line one\n!" {
        assert!(Instant::now() < deadline, "{:?}", std::fs::read(&path));
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut cfg = [0u8; 12];
    r.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[4..8], &1u32.to_le_bytes(), "one port");
    assert_eq!(&cfg[..4], &[0; 4], "size unknown, config not writable");
}

#[test]
fn hostile_chains_reset_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Console::new(ConsoleParams::new(ConsoleBackend::File(
        dir.path().join("x"),
    )))
    .unwrap();
    let mut r = activate(dev);
    let b = r.tx.alloc(16);
    r.tx.add_chain(&[(b, 16, true)]);
    r.tx.kick();
    assert!(r.irq.wait_reset().contains("device-writable"));

    let (in_r, in_w) = pipe();
    let (_out_r, out_w) = pipe();
    let backend = Backend::fds(in_r.as_raw_fd(), out_w.as_raw_fd()).unwrap();
    let mut r = activate_with(Console::with_backend(backend, 64).unwrap(), 0);
    // A device-readable buffer in a receive chain, and input to put in it.
    let b = r.rx.alloc(16);
    r.rx.add_chain(&[(b, 16, false)]);
    std::fs::File::from(in_w).write_all(b"x").unwrap();
    r.rx.kick();
    assert!(r.irq.wait_reset().contains("device-readable"));
}

#[test]
fn pause_save_restore_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.log");
    let dev = Console::new(ConsoleParams::new(ConsoleBackend::File(path.clone()))).unwrap();
    let mut r = activate(dev);
    r.write(b"a");
    r.write(b"b");
    r.dev.pause().unwrap();
    // Output posted while paused waits.
    let b = r.tx.buffer(b"c");
    r.tx.add_chain(&[(b, 1, false)]);
    r.tx.kick();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(std::fs::read(&path).unwrap(), b"ab");
    let saved = r.dev.save_state().unwrap();
    let s: ConsoleState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
    assert_eq!(serde_json::to_value(&s).unwrap(), saved);
    assert_eq!(
        s.tx,
        Some(QueueProgress {
            next_avail: 2,
            next_used: 2
        })
    );
    assert_eq!(
        s.rx,
        Some(QueueProgress {
            next_avail: 0,
            next_used: 0
        })
    );
    r.dev.resume().unwrap();
    r.tx.wait_used();
    assert_eq!(std::fs::read(&path).unwrap(), b"abc");

    let mut fresh = Console::new(ConsoleParams::new(ConsoleBackend::File(path))).unwrap();
    fresh.restore_state(saved.clone()).unwrap();
    assert_eq!(fresh.save_state().unwrap(), saved);
    assert!(matches!(
        Console::with_backend(Backend::fds(0, 1).unwrap(), 3),
        Err(ConsoleError::QueueSize(3))
    ));
}
