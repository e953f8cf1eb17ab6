//! virtio-net tests on a real tap (they need CAP_NET_ADMIN and fail loudly without it; the
//! transmit-retry tests also need `tc` and the bridge and tbf kernel modules).

// Test sizes and indices are small.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_devices::virtio::{features, Activation, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

use super::config::*;
use super::tap::tests::{require_net_admin, test_tap_name};
use super::tap::VNET_HDR_LEN;
use super::*;
use crate::testing::{guest_memory, TestDriver, TestInterrupt};

const MAC: [u8; 6] = [0x02, 0x6b, 0x69, 0x6c, 0x6e, 0x01];
const BUF: u32 = 2048;

struct Rig {
    dev: Net,
    rx: TestDriver,
    tx: TestDriver,
    irq: Arc<TestInterrupt>,
    rx_bufs: HashMap<u32, GuestAddress>,
    host_ip: Ipv4Addr,
    guest_ip: Ipv4Addr,
}

/// A subnet per test process and tag, so parallel tests do not share addresses.
fn subnet(tag: u8) -> (Ipv4Addr, Ipv4Addr) {
    let b = (std::process::id() % 200) as u8;
    (
        Ipv4Addr::new(10, 213 + tag, b, 1),
        Ipv4Addr::new(10, 213 + tag, b, 2),
    )
}

/// Runs an iproute2 `tool` (`ip`, `tc`) and requires it to succeed.
fn iproute2(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("these tests need the `{tool}` tool (iproute2): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    iproute2("ip", args);
}

fn rig(tag: u8, feature_mask: u64) -> Rig {
    require_net_admin();
    let name = test_tap_name(&format!("n{tag}"));
    let mut p = NetParams::new(&name);
    p.mac = Some(MAC);
    let mut dev = Net::new(p).unwrap();
    let (host_ip, guest_ip) = subnet(tag);
    ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &name]);
    let mem = guest_memory(16 << 20);
    let mut rx = TestDriver::new(&mem, 0, 256);
    let mut tx = TestDriver::new(&mem, 4 << 20, 256);
    let irq = TestInterrupt::new();
    let f = dev.features() & feature_mask;
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
        rx_bufs: HashMap::new(),
        host_ip,
        guest_ip,
    };
    for _ in 0..64 {
        r.post_rx();
    }
    r.rx.kick();
    r
}

/// A UDP frame to port 7777 (bytes 36..38 of an untagged IPv4 frame).
fn udp_to_7777(f: &[u8]) -> bool {
    f.len() >= 44 && f[12..14] == [8, 0] && f[36..38] == 7777u16.to_be_bytes()
}

impl Rig {
    /// Tells the host the guest's MAC (no ARP needed) and returns the tap's name.
    fn neighbour_guest(&self) -> String {
        let tap = self.dev.tap_name().to_owned();
        let mac = MAC.map(|b| format!("{b:02x}")).join(":");
        ip(&[
            "neigh",
            "replace",
            &self.guest_ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            &tap,
        ]);
        tap
    }

    fn post_rx(&mut self) {
        let b = self.rx.alloc(u64::from(BUF));
        let head = self.rx.add_chain(&[(b, BUF, true)]);
        self.rx_bufs.insert(u32::from(head), b);
    }

    /// Sends `frame` with a virtio-net header (`hdr`) from the guest; waits until it is used.
    fn send(&mut self, hdr: [u8; 12], frame: &[u8]) {
        let h = self.tx.buffer(&hdr);
        let f = self.tx.buffer(frame);
        self.tx
            .add_chain(&[(h, 12, false), (f, frame.len() as u32, false)]);
        self.tx.kick();
        let (_, len) = self.tx.wait_used();
        assert_eq!(len, 0);
    }

    /// Waits up to 5 s for a received frame that `want` accepts; returns (header, frame).
    fn receive(&mut self, want: impl Fn(&[u8]) -> bool) -> ([u8; 12], Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((id, len)) = self.rx.next_used() {
                let addr = self.rx_bufs[&id];
                let mut data = vec![0u8; len as usize];
                self.rx.mem().read_slice(&mut data, addr).unwrap();
                self.post_rx();
                self.rx.kick();
                let mut hdr = [0u8; 12];
                hdr.copy_from_slice(&data[..12]);
                if want(&data[12..]) {
                    return (hdr, data[12..].to_vec());
                }
                continue;
            }
            assert!(Instant::now() < deadline, "no matching frame arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn arp_request(mac: [u8; 6], from: Ipv4Addr, to: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&from.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&to.octets());
    f
}

fn is_arp_reply_from(f: &[u8], ip: Ipv4Addr) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == ip.octets()
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP frame with `udp_csum` as the UDP checksum field.
fn udp_frame(
    dst_mac: [u8; 6],
    from: Ipv4Addr,
    to: Ipv4Addr,
    port: u16,
    payload: &[u8],
    udp_csum: u16,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + 8 + payload.len();
    let mut iph = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    iph.extend_from_slice(&from.octets());
    iph.extend_from_slice(&to.octets());
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    let ulen = (8 + payload.len()) as u16;
    f.extend_from_slice(&4242u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&ulen.to_be_bytes());
    f.extend_from_slice(&udp_csum.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn host_mac(tap: &str) -> [u8; 6] {
    let s = std::fs::read_to_string(format!("/sys/class/net/{tap}/address")).unwrap();
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(s.trim().split(':')) {
        *b = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

#[test]
fn arp_request_from_the_guest_gets_the_hosts_reply() {
    for (tag, mask) in [
        (0u8, u64::MAX),
        (1, !(F_MRG_RXBUF | F_GUEST_TSO4 | F_GUEST_TSO6)),
    ] {
        let mut r = rig(tag, mask);
        let req = arp_request(MAC, r.guest_ip, r.host_ip);
        r.send([0; 12], &req);
        let host_ip = r.host_ip;
        let (hdr, reply) = r.receive(|f| is_arp_reply_from(f, host_ip));
        assert_eq!(&reply[..6], &MAC, "addressed to the guest");
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        let stats = r.dev.stats();
        assert!(stats.tx_frames.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        assert!(stats.rx_frames.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        assert!(r.irq.reset_reasons().is_empty());
    }
}

#[test]
fn checksum_offload_flags_reach_the_host_stack() {
    let mut r = rig(2, u64::MAX);
    let sock = UdpSocket::bind((r.host_ip, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let port = sock.local_addr().unwrap().port();
    let tap = r.dev.tap_name().to_owned();
    let dst = host_mac(&tap);
    // A wrong checksum without NEEDS_CSUM: the host drops it.
    let bad = udp_frame(dst, r.guest_ip, r.host_ip, port, b"dropped", 0x1234);
    r.send([0; 12], &bad);
    // The same with NEEDS_CSUM (csum_start 34, csum_offset 6): the host completes it.
    let ok = udp_frame(dst, r.guest_ip, r.host_ip, port, b"offloaded", 0x1234);
    let mut hdr = [0u8; 12];
    hdr[0] = 1;
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&6u16.to_le_bytes());
    r.send(hdr, &ok);
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("the offloaded datagram arrives");
    assert_eq!(&buf[..n], b"offloaded");
}

#[test]
fn control_queue_switches_queue_pairs() {
    require_net_admin();
    let name = test_tap_name("q");
    let mut p = NetParams::new(&name);
    p.queues = 2;
    let mut dev = Net::new(p).unwrap();
    assert_ne!(dev.features() & F_MQ, 0);
    assert_eq!(dev.queue_max_sizes().len(), 5);
    let mut pairs = [0u8; 2];
    dev.read_config(8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 2);
    let mem = guest_memory(16 << 20);
    let mut drivers: Vec<TestDriver> = (0..5)
        .map(|i| TestDriver::new(&mem, i * (2 << 20), 64))
        .collect();
    let irq = TestInterrupt::new();
    let queues = drivers
        .iter_mut()
        .enumerate()
        .map(|(i, d)| d.active(i as u16))
        .collect();
    let f = dev.features();
    dev.activate(Activation {
        mem,
        features: f,
        queues,
        interrupt: irq.clone(),
    })
    .unwrap();
    let ctrl = &mut drivers[4];
    let mut command = |data: &[u8]| {
        let c = ctrl.buffer(data);
        let ack = ctrl.buffer(&[0xff]);
        ctrl.add_chain(&[(c, data.len() as u32, false), (ack, 1, true)]);
        ctrl.kick();
        ctrl.wait_used();
        ctrl.mem().read_obj::<u8>(ack).unwrap()
    };
    assert_eq!(command(&[4, 0, 2, 0]), 0, "two pairs");
    assert_eq!(command(&[4, 0, 1, 0]), 0, "one pair");
    assert_eq!(command(&[4, 0, 3, 0]), 1, "more pairs than exist");
    assert_eq!(command(&[4, 0, 0, 0]), 1, "zero pairs");
    assert_eq!(
        command(&[0, 0, 1]),
        1,
        "an RX-mode command is not supported"
    );
    assert_eq!(command(&[4]), 1, "truncated");
    dev.pause().unwrap();
    let s: NetState = serde_json::from_value(dev.save_state().unwrap()).unwrap();
    assert_eq!(s.active_pairs, 1);
    assert!(irq.reset_reasons().is_empty());
}

#[test]
fn hostile_transmit_chains_reset_the_device_and_the_vmm_goes_on() {
    let mut r = rig(3, u64::MAX);
    // A device-writable buffer in a transmit chain.
    let b = r.tx.alloc(64);
    r.tx.add_chain(&[(b, 64, true)]);
    r.tx.kick();
    let reason = r.irq.wait_reset();
    assert!(reason.contains("device-writable"), "{reason}");

    let mut r = rig(4, u64::MAX);
    // A descriptor loop.
    let b = r.tx.alloc(64);
    r.tx.write_desc(0, b.0, 64, 1, 1);
    r.tx.write_desc(1, b.0, 64, 1, 0);
    r.tx.publish(0);
    r.tx.kick();
    let reason = r.irq.wait_reset();
    assert!(reason.contains("does not end"), "{reason}");

    let mut r = rig(5, u64::MAX);
    // Buffers outside RAM and too-short frames are dropped, not fatal.
    r.tx.add_chain(&[(GuestAddress(1 << 40), 100, false)]);
    let h = r.tx.buffer(&[0; 8]);
    r.tx.add_chain(&[(h, 8, false)]);
    r.tx.kick();
    r.tx.wait_used();
    r.tx.wait_used();
    assert!(r.irq.reset_reasons().is_empty());
    assert_eq!(
        r.dev
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn pause_save_restore_keeps_ring_positions() {
    let mut r = rig(6, u64::MAX);
    let req = arp_request(MAC, r.guest_ip, r.host_ip);
    r.send([0; 12], &req);
    r.dev.pause().unwrap();
    let saved = r.dev.save_state().unwrap();
    let text = serde_json::to_string(&saved).unwrap();
    let s: NetState = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&s).unwrap(), saved);
    assert_eq!(s.mac, MAC);
    let tx = s.queues.iter().find(|q| q.index == 1).unwrap();
    assert_eq!(tx.progress.next_used, 1);
    r.dev.resume().unwrap();
    r.send([0; 12], &req);

    // A new device on the same tap takes the state once the old one is gone.
    let name = r.dev.tap_name().to_owned();
    drop(r);
    let mut p = NetParams::new(&name);
    p.mac = Some(MAC);
    // Other tests spawning processes may hold a copy of the old tap descriptor for a moment
    // (between fork and exec): retry briefly.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut dev = loop {
        match Net::new(p.clone()) {
            Err(NetError::Tap(TapError::Busy { .. })) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r.unwrap(),
        }
    };
    dev.restore_state(saved.clone()).unwrap();
    assert_eq!(dev.save_state().unwrap(), saved);
    let mut other = NetParams::new(test_tap_name("x"));
    other.mac = Some([2, 0, 0, 0, 0, 9]);
    let mut dev2 = Net::new(other).unwrap();
    assert!(
        dev2.restore_state(saved).is_err(),
        "a different MAC refuses it"
    );
}

#[test]
fn constructor_errors_are_clear() {
    assert!(matches!(
        Net::new(NetParams {
            queues: 0,
            ..NetParams::new("x")
        }),
        Err(NetError::Queues(0))
    ));
    let e = Net::new(NetParams {
        mac: Some([1, 0, 0, 0, 0, 0]),
        ..NetParams::new("x")
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("multicast"));
    assert!(matches!(
        Net::new(NetParams::new("bad/name")),
        Err(NetError::Tap(TapError::BadName(_)))
    ));
    let m = random_mac().unwrap();
    assert_eq!(m[0] & 3, 2, "unicast, locally administered");
    let _ = features::VERSION_1;
}

#[test]
fn a_burst_of_frames_reaches_the_host_in_order_and_a_bad_one_is_dropped() {
    // More chains than one transmit batch, posted before a single kick.
    let mut r = rig(7, u64::MAX);
    let sock = UdpSocket::bind((r.host_ip, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let port = sock.local_addr().unwrap().port();
    let dst = host_mac(r.dev.tap_name());
    let (guest_ip, host_ip) = (r.guest_ip, r.host_ip);
    let n = 120u16;
    let bad = 70u16;
    for i in 0..n {
        if i == bad {
            // A buffer outside guest RAM: that frame is dropped, the others go on.
            let far = GuestAddress(1 << 40);
            r.tx.add_chain(&[(far, 12, false), (far, 60, false)]);
            continue;
        }
        let f = udp_frame(dst, guest_ip, host_ip, port, &i.to_be_bytes(), 0);
        let h = r.tx.buffer(&[0; 12]);
        let b = r.tx.buffer(&f);
        r.tx.add_chain(&[(h, 12, false), (b, f.len() as u32, false)]);
    }
    r.tx.kick();
    for _ in 0..n {
        assert_eq!(r.tx.wait_used().1, 0);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while let Ok(len) = sock.recv(&mut buf) {
        assert_eq!(len, 2);
        got.push(u16::from_be_bytes([buf[0], buf[1]]));
        if got.len() == usize::from(n - 1) {
            break;
        }
    }
    let want: Vec<u16> = (0..n).filter(|&i| i != bad).collect();
    assert_eq!(got, want);
    assert!(
        r.irq.reset_reasons().is_empty(),
        "{:?}",
        r.irq.reset_reasons()
    );
    assert_eq!(
        r.dev
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_burst_from_the_host_arrives_whole_and_in_order() {
    // Receive buffers are filled a batch at a time: frames must still arrive in order.
    let mut r = rig(8, u64::MAX);
    r.neighbour_guest();
    let sock = UdpSocket::bind((r.host_ip, 0)).unwrap();
    let n = 40u16;
    for i in 0..n {
        sock.send_to(&i.to_be_bytes(), (r.guest_ip, 7777)).unwrap();
    }
    let mut got = Vec::new();
    while got.len() < usize::from(n) {
        let (_, f) = r.receive(udp_to_7777);
        got.push(u16::from_be_bytes([f[42], f[43]]));
    }
    assert_eq!(got, (0..n).collect::<Vec<_>>());
}

#[test]
fn full_size_frames_arrive_intact_through_the_receive_slots_and_an_oversized_one_is_dropped() {
    // Without big-frame offloads a batch of frames is read into the ring's slots and copied
    // to the chains: every byte must arrive, in order; a frame longer than a slot is counted
    // as dropped and the next one still arrives.
    let mut r = rig(10, !(F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN));
    let tap = r.neighbour_guest();
    // Room on the host side for a frame longer than a slot (set before anything is sent, so
    // the host does not fragment the long datagram on a remembered 1500-byte path).
    ip(&["link", "set", "dev", &tap, "mtu", "3000"]);
    let sock = UdpSocket::bind((r.host_ip, 0)).unwrap();
    let payload = |i: u16, len: usize| -> Vec<u8> {
        let mut p: Vec<u8> = (0..len)
            .map(|k| (k as u8) ^ (i as u8).wrapping_mul(31))
            .collect();
        p[..2].copy_from_slice(&i.to_be_bytes());
        p
    };
    // 1472 bytes of UDP payload: 1514-byte frames.
    let n = 40u16;
    for i in 0..n {
        sock.send_to(&payload(i, 1472), (r.guest_ip, 7777)).unwrap();
    }
    for i in 0..n {
        let (hdr, f) = r.receive(udp_to_7777);
        assert_eq!(f.len(), 1514);
        assert_eq!(hdr[10..12], [1, 0], "num_buffers");
        assert_eq!(f[42..], payload(i, 1472)[..], "frame {i}");
    }
    let dropped = || {
        r.dev
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = dropped();
    sock.send_to(&payload(n, 2500), (r.guest_ip, 7777)).unwrap();
    sock.send_to(&payload(n + 1, 100), (r.guest_ip, 7777))
        .unwrap();
    let (_, f) = r.receive(udp_to_7777);
    assert_eq!(
        f[42..],
        payload(n + 1, 100)[..],
        "the frame after the oversized one"
    );
    assert_eq!(
        r.dev
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        before + 1
    );
}

/// A transmit queue served by the net worker, whose "tap" is a unix datagram socket with a
/// 4 KiB send buffer (a tap's host side frees frames at once and never fills up on demand);
/// `host_end` reads what the worker sends.
struct SocketRig {
    tx: TestDriver,
    host_end: std::os::unix::net::UnixDatagram,
    stats: Arc<worker::NetStats>,
    irq: Arc<TestInterrupt>,
    _w: crate::common::worker::Worker<worker::NetPair>,
}

fn socket_rig(name: &str) -> SocketRig {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicU16;

    use crate::common::worker::{StopSignal, Worker};

    let (device_end, host_end) = fuzzing::socket_pair().expect("socketpair");
    let host_end = std::os::unix::net::UnixDatagram::from(host_end);
    let sndbuf: libc::c_int = 4096;
    // SAFETY: setsockopt reads an int through a pointer that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            device_end.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            std::ptr::addr_of!(sndbuf).cast(),
            4,
        )
    };
    assert_eq!(rc, 0);

    let mem = guest_memory(16 << 20);
    let mut tx = TestDriver::new(&mem, 0, 256);
    let irq = TestInterrupt::new();
    let stats = Arc::new(worker::NetStats::default());
    let shared = Arc::new(worker::Shared {
        mem: mem.clone(),
        interrupt: irq.clone(),
        taps: vec![Arc::new(tap::Tap::from_file(device_end, "sock0"))],
        mrg_rxbuf: false,
        big_frames: false,
        mq: false,
        active_pairs: Arc::new(AtomicU16::new(1)),
        stats: stats.clone(),
    });
    let aq = tx.active(1);
    let pair = worker::NetPair {
        pair: 0,
        rx: None,
        tx: Some(worker::NetQueue {
            index: 1,
            queue: aq.queue,
            notify: aq.notify,
        }),
        ctrl: None,
        broken: false,
    };
    let w = Worker::spawn("virtio-net", name.into(), move |stop: &StopSignal| {
        worker::run(pair, shared, stop)
    })
    .unwrap();

    SocketRig {
        tx,
        host_end,
        stats,
        irq,
        _w: w,
    }
}

/// Sends chain `i` carrying a 60-byte broadcast frame numbered `i` (bytes 14..16).
fn post_numbered(tx: &mut TestDriver, i: u16) {
    let mut frame = vec![0u8; 60];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[14..16].copy_from_slice(&i.to_be_bytes());
    let h = tx.buffer(&[0; 12]);
    let b = tx.buffer(&frame);
    tx.add_chain(&[(h, 12, false), (b, 60, false)]);
}

/// A reader that keeps draining the socket while batches go out: the socket refuses a frame
/// in the middle of a batch and has room again a moment later, before the batch's next
/// frame. That next frame must not overtake the refused one: what arrives is every frame
/// once, in order.
#[test]
fn frames_stay_in_order_when_the_tap_makes_room_during_a_batch() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let SocketRig {
        mut tx,
        host_end,
        stats,
        irq,
        _w: w,
    } = socket_rig("net-midbatch");
    let n = 3000u16;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut got = Vec::with_capacity(usize::from(n));
            let mut buf = [0u8; 128];
            let deadline = Instant::now() + Duration::from_secs(20);
            while got.len() < usize::from(n) && Instant::now() < deadline {
                match host_end.recv(&mut buf) {
                    Ok(_) => got.push(u16::from_be_bytes([buf[12 + 14], buf[12 + 15]])),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if done.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            got
        })
    };
    // At most 64 chains (128 descriptors) in flight, so the driver's descriptors never wrap
    // onto a chain the device still holds.
    let (mut posted, mut used) = (0u16, 0u16);
    let deadline = Instant::now() + Duration::from_secs(20);
    while used < n {
        while posted < n && posted - used < 64 {
            post_numbered(&mut tx, posted);
            posted += 1;
        }
        tx.kick();
        while tx.next_used().is_some() {
            used += 1;
        }
        assert!(Instant::now() < deadline, "{used} of {n} chains used");
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(100));
    done.store(true, Ordering::Relaxed);
    let got = reader.join().unwrap();
    let first_out_of_order = got.iter().enumerate().find(|&(k, &v)| usize::from(v) != k);
    assert_eq!(
        first_out_of_order,
        None,
        "{} frames arrived; every frame once and in order",
        got.len()
    );
    assert_eq!(got.len(), usize::from(n));
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    assert!(irq.reset_reasons().is_empty(), "{:?}", irq.reset_reasons());
    let _ = w.stop("virtio-net");
}

/// The transmit path when the tap refuses frames for a while (EAGAIN), on a [`socket_rig`].
/// Frames the socket refuses wait and go out in order once the reader makes room; none is
/// lost or sent twice, and every chain is used exactly once.
#[test]
fn frames_the_tap_refuses_go_out_later_in_order() {
    use std::sync::atomic::Ordering;

    let SocketRig {
        mut tx,
        host_end,
        stats,
        irq,
        _w: w,
    } = socket_rig("net-eagain");
    // Fewer chains than one transmit batch, more than the socket takes.
    let n = 48u16;
    for i in 0..n {
        post_numbered(&mut tx, i);
    }
    tx.kick();
    // The socket fills up; the rest waits, unused, for room.
    std::thread::sleep(Duration::from_millis(200));
    let mut used = Vec::new();
    while let Some((head, len)) = tx.next_used() {
        assert_eq!(len, 0);
        used.push(head);
    }
    assert!(
        !used.is_empty() && used.len() < usize::from(n),
        "the socket took {} of {n} frames: the test did not make it refuse any",
        used.len()
    );

    // Read everything: each read makes room, and the worker sends what waited.
    let mut got = Vec::new();
    let mut buf = [0u8; 128];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < usize::from(n) {
        match host_end.recv(&mut buf) {
            Ok(len) => {
                assert_eq!(len, 12 + 60, "header and frame");
                got.push(u16::from_be_bytes([buf[12 + 14], buf[12 + 15]]));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "frames stopped at {}", got.len());
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        got,
        (0..n).collect::<Vec<_>>(),
        "every frame once, in order"
    );
    while used.len() < usize::from(n) {
        used.push(tx.wait_used().0);
    }
    used.sort_unstable();
    used.dedup();
    assert_eq!(used.len(), usize::from(n), "every chain used exactly once");
    std::thread::sleep(Duration::from_millis(50));
    assert!(tx.next_used().is_none(), "no chain used twice");
    assert!(
        matches!(host_end.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    );
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    assert_eq!(stats.tx_frames.load(Ordering::Relaxed), u64::from(n));
    assert!(irq.reset_reasons().is_empty(), "{:?}", irq.reset_reasons());
    let _ = w.stop("virtio-net");
}

fn tc(args: &[&str]) {
    iproute2("tc", args);
}

/// Ethertype of the test frames (IEEE "local experimental").
const HELD_ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// Destination of the test frames: unknown to the bridge, so flooded to the peer.
const HELD_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

/// A frame from `src` carrying sequence number `seq`, padded so that a few dozen fill a
/// small send buffer.
fn held_frame(src: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = HELD_DST.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&HELD_ETHERTYPE);
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(540, 0x5a);
    f
}

/// A way out of a tap that holds frames: a bridge joins the tap to a peer tap whose egress
/// qdisc (tbf at about 100 bit/s) lets a frame through every minute or so. A frame the tap
/// takes stays charged to the tap's send buffer until it leaves the peer's qdisc (the bridge
/// does not orphan it, the peer tap does), so with a small send buffer the tap soon answers
/// EAGAIN, and keeps doing so until [`HeldPath::release`]. The host's own stack would free
/// a frame at once, which is why a plain tap never says EAGAIN. The bridge goes when this
/// is dropped; the peer tap with its queue.
struct HeldPath {
    bridge: String,
    peer: Tap,
}

impl HeldPath {
    fn new(tap: &str, tag: &str) -> HeldPath {
        require_net_admin();
        let bridge = test_tap_name(&format!("b{tag}"));
        let peer = Tap::open_queues(&test_tap_name(&format!("p{tag}")), 1)
            .unwrap()
            .pop()
            .unwrap();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let path = HeldPath { bridge, peer };
        for port in [tap, path.peer.name()] {
            ip(&["link", "set", port, "master", &path.bridge]);
        }
        ip(&["link", "set", &path.bridge, "up"]);
        tc(&[
            "qdisc",
            "add",
            "dev",
            path.peer.name(),
            "root",
            "tbf",
            "rate",
            "100bit",
            "burst",
            "1600",
            "limit",
            "10000000",
        ]);
        path
    }

    /// Lets the held frames (and every later one) through at once.
    fn release(&self) {
        tc(&[
            "qdisc",
            "change",
            "dev",
            self.peer.name(),
            "root",
            "tbf",
            "rate",
            "10gbit",
            "burst",
            "1000000",
            "limit",
            "10000000",
        ]);
    }

    /// The sequence numbers of test frames that reached the peer, in arrival order, once
    /// `n` have arrived (or after 5 s).
    fn received(&self, n: usize) -> Vec<u32> {
        let mut buf = vec![0u8; 2048];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < n && Instant::now() < deadline {
            match self.peer.read_frame(&iov).unwrap() {
                // The peer's frames start with a virtio-net header.
                Some(len) if len >= VNET_HDR_LEN + 18 => {
                    let f = &buf[VNET_HDR_LEN..len];
                    if f[..6] == HELD_DST && f[12..14] == HELD_ETHERTYPE {
                        got.push(u32::from_be_bytes([f[14], f[15], f[16], f[17]]));
                    }
                }
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        got
    }
}

impl Drop for HeldPath {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

#[test]
fn tap_ring_reports_again_for_frames_a_full_tap_refuses() {
    require_net_admin();
    let tap = Tap::open_queues(&test_tap_name("r10"), 1)
        .unwrap()
        .pop()
        .unwrap();
    let path = HeldPath::new(tap.name(), "10");
    tap.set_send_buffer(16 << 10);
    let n = 64;
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|seq| {
            let mut b = vec![0u8; VNET_HDR_LEN];
            b.extend_from_slice(&held_frame(MAC, seq));
            b
        })
        .collect();
    let mut ring = batch::TapRing::new(n as usize).expect("io_uring");
    for (i, f) in frames.iter().enumerate() {
        ring.frame(i).push(libc::iovec {
            iov_base: f.as_ptr().cast_mut().cast(),
            iov_len: f.len(),
        });
    }
    // SAFETY: the iovecs point into `frames`, which lives until the end of the test.
    unsafe { ring.run_batch(tap.fd(), n as usize, false, false) }.unwrap();
    let results: Vec<_> = (0..n as usize).map(|i| ring.result(i).unwrap()).collect();
    let done = results
        .iter()
        .take_while(|r| matches!(r, batch::Sent::Done(_)))
        .count();
    assert!(done > 0, "{results:?}");
    assert!(
        results[done..].iter().all(|r| *r == batch::Sent::Again),
        "the tap takes frames until its send buffer is full, then answers EAGAIN: {results:?}"
    );
    path.release();
    let got = path.received(done);
    assert_eq!(got, (0..done as u32).collect::<Vec<_>>());
}

#[test]
fn frames_the_tap_refuses_with_eagain_are_sent_later_in_order_and_none_is_lost() {
    let mut r = rig(9, u64::MAX);
    let path = HeldPath::new(r.dev.tap_name(), "9");
    // Room for a few dozen frames in flight: the held qdisc soon fills it.
    r.dev.taps[0].set_send_buffer(16 << 10);
    let post = |tx: &mut TestDriver, seq: u32| {
        let mut chain = vec![0u8; VNET_HDR_LEN];
        chain.extend_from_slice(&held_frame(MAC, seq));
        let b = tx.buffer(&chain);
        tx.add_chain(&[(b, chain.len() as u32, false)])
    };
    // Several transmit batches' worth, one descriptor each, all posted before one kick.
    let n = 200u32;
    let mut heads: Vec<u32> = (0..n).map(|seq| u32::from(post(&mut r.tx, seq))).collect();
    r.tx.kick();

    // The tap takes what fits and refuses the rest with EAGAIN: those chains wait, unused,
    // and stay waiting while the path is held.
    let mut used = Vec::new();
    let collect = |tx: &mut TestDriver, used: &mut Vec<u32>, quiet: Duration| {
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            match tx.next_used() {
                Some((id, len)) => {
                    assert_eq!(len, 0);
                    used.push(id);
                    last = Instant::now();
                }
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    };
    collect(&mut r.tx, &mut used, Duration::from_millis(500));
    let held = used.len();
    assert!(
        held > 0 && held < n as usize / 2,
        "{held} of {n} chains were used while the tap was full"
    );
    collect(&mut r.tx, &mut used, Duration::from_millis(300));
    assert_eq!(used.len(), held, "no chain is used while the tap refuses");
    assert_eq!(
        used,
        heads[..held],
        "the chains the tap took are used in order"
    );

    // Once the tap drains, the refused frames go first, then the rest of the queue.
    path.release();
    let deadline = Instant::now() + Duration::from_secs(10);
    while used.len() < n as usize {
        assert!(
            Instant::now() < deadline,
            "the queue stalled: {} of {n} chains used",
            used.len()
        );
        collect(&mut r.tx, &mut used, Duration::from_millis(20));
    }
    let got = path.received(n as usize);
    assert_eq!(
        got,
        (0..n).collect::<Vec<_>>(),
        "every frame reaches the wire once, in order"
    );
    let mut sorted = used.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), used.len(), "a chain was used twice: {used:?}");
    heads.sort_unstable();
    assert_eq!(sorted, heads, "every chain is used exactly once");

    // The queue goes on: a frame sent now goes straight through.
    let last = post(&mut r.tx, n);
    r.tx.kick();
    assert_eq!(r.tx.wait_used(), (u32::from(last), 0));
    assert_eq!(path.received(1), vec![n]);
    collect(&mut r.tx, &mut used, Duration::from_millis(100));
    assert_eq!(used.len(), n as usize, "nothing is used twice afterwards");
    let stats = r.dev.stats();
    assert_eq!(
        stats.tx_frames.load(std::sync::atomic::Ordering::Relaxed),
        u64::from(n) + 1
    );
    assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(
        r.irq.reset_reasons().is_empty(),
        "{:?}",
        r.irq.reset_reasons()
    );
}

/// An Ethernet/IPv4/TCP frame from `from` port 5555 to `to` port 7777 carrying `payload`,
/// with the TCP checksum field left at zero (the tests offload it).
fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    from: Ipv4Addr,
    to: Ipv4Addr,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload.len()) as u16;
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    iph.extend_from_slice(&from.octets());
    iph.extend_from_slice(&to.octets());
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&5555u16.to_be_bytes());
    f.extend_from_slice(&7777u16.to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes()); // sequence
    f.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]); // 20 bytes, PSH|ACK
    f.extend_from_slice(payload);
    f
}

/// TCP to port 7777 (bytes 36..38 of an untagged IPv4 frame).
fn tcp_to_7777(f: &[u8]) -> bool {
    f.len() >= 54 && f[12..14] == [8, 0] && f[23] == 6 && f[36..38] == 7777u16.to_be_bytes()
}

/// The 10-byte virtio-net header of a TCPv4 GSO frame: NEEDS_CSUM at the TCP checksum
/// (offset 34 + 16), 54 header bytes, `mss` bytes per segment.
fn tso4_header(mss: u16) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    h[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&mss.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

/// A packet socket on a tap that sends and receives frames behind a virtio-net header
/// (`PACKET_VNET_HDR`), so GSO frames pass through it whole: the host side of the tap, as
/// the host's stack sees it.
struct VnetPacketSocket(std::os::fd::OwnedFd);

impl VnetPacketSocket {
    fn open(tap: &str) -> VnetPacketSocket {
        use std::os::fd::{AsRawFd, FromRawFd};
        const PACKET_VNET_HDR: libc::c_int = 15;
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket takes no pointers; the descriptor is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(all)) };
        assert!(
            raw >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` was just created and nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads an int through a pointer that lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_VNET_HDR,
                std::ptr::addr_of!(one).cast(),
                4,
            )
        };
        assert_eq!(
            rc,
            0,
            "PACKET_VNET_HDR: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: setsockopt reads a timeval through a pointer that lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0);
        let name = std::ffi::CString::new(tap).unwrap();
        // SAFETY: if_nametoindex reads a NUL-terminated string that lives across the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no interface {tap}");
        // SAFETY: sockaddr_ll is plain data; the fields that matter are set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = all;
        sa.sll_ifindex = index as i32;
        // SAFETY: bind reads a sockaddr_ll of the given size that lives across the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind to {tap}: {}", std::io::Error::last_os_error());
        VnetPacketSocket(fd)
    }

    /// Hands `hdr` + `frame` to the tap, as the host's stack would send it to the guest.
    fn send(&self, hdr: [u8; 10], frame: &[u8]) {
        use std::os::fd::AsRawFd;
        let mut pkt = hdr.to_vec();
        pkt.extend_from_slice(frame);
        // SAFETY: send reads `pkt`, which lives across the call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), pkt.as_ptr().cast(), pkt.len(), 0) };
        assert_eq!(
            n,
            pkt.len() as isize,
            "packet send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to 5 s for a frame that `want` accepts; returns (header, frame).
    fn receive(&self, want: impl Fn(&[u8]) -> bool) -> ([u8; 10], Vec<u8>) {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < deadline {
            // SAFETY: recv writes at most buf.len() bytes into `buf`, which lives across it.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 10 {
                continue;
            }
            let pkt = &buf[..n as usize];
            if want(&pkt[10..]) {
                let mut hdr = [0u8; 10];
                hdr.copy_from_slice(&pkt[..10]);
                return (hdr, pkt[10..].to_vec());
            }
        }
        panic!("no matching frame reached the host side of the tap");
    }
}

/// A byte pattern that shows any shifted, lost or repeated byte.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Linux's default receive setup: mergeable buffers and TSO. A 9054-byte TCP frame the
/// host hands the tap as one GSO frame must reach the guest whole, spread over as many
/// 2 KiB buffers as it needs, with num_buffers saying how many and the GSO fields intact.
#[test]
fn a_tso_frame_from_the_host_spans_mergeable_buffers_with_its_gso_header() {
    let mut r = rig(11, u64::MAX);
    let tap = r.neighbour_guest();
    let host = VnetPacketSocket::open(&tap);
    let frame = tcp_frame(MAC, host_mac(&tap), r.host_ip, r.guest_ip, &pattern(9000));
    host.send(tso4_header(1448), &frame);

    let deadline = Instant::now() + Duration::from_secs(5);
    let (hdr, data, buffers) = loop {
        assert!(Instant::now() < deadline, "the TSO frame did not arrive");
        let Some((id, len)) = r.rx.next_used() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let mut first = vec![0u8; len as usize];
        r.rx.mem().read_slice(&mut first, r.rx_bufs[&id]).unwrap();
        let num = u16::from_le_bytes([first[10], first[11]]);
        assert!(num >= 1, "num_buffers 0");
        let mut data = first[12..].to_vec();
        for _ in 1..num {
            let (id, len) = loop {
                if let Some(u) = r.rx.next_used() {
                    break u;
                }
                assert!(Instant::now() < deadline, "the frame's later buffers");
                std::thread::sleep(Duration::from_millis(1));
            };
            let mut more = vec![0u8; len as usize];
            r.rx.mem().read_slice(&mut more, r.rx_bufs[&id]).unwrap();
            data.extend_from_slice(&more);
        }
        for _ in 0..num {
            r.post_rx();
        }
        r.rx.kick();
        if tcp_to_7777(&data) {
            let mut hdr = [0u8; 12];
            hdr.copy_from_slice(&first[..12]);
            break (hdr, data, num);
        }
    };
    assert_eq!(hdr[1], 1, "gso_type TCPV4, not segmented on the way");
    assert_eq!(u16::from_le_bytes([hdr[4], hdr[5]]), 1448, "gso_size");
    assert_eq!(hdr[0] & 1, 1, "NEEDS_CSUM");
    assert_eq!(u16::from_le_bytes([hdr[6], hdr[7]]), 34, "csum_start");
    assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 16, "csum_offset");
    assert_eq!(data.len(), frame.len());
    assert!(data == frame, "the frame arrived changed");
    let want = (12 + frame.len()).div_ceil(BUF as usize);
    assert_eq!(usize::from(buffers), want, "num_buffers");
    assert!(r.irq.reset_reasons().is_empty());
}

/// The other way: a TCP GSO frame the guest sends with HOST_TSO4 reaches the host side of
/// the tap as one frame with its GSO fields, for the host to segment (or not) as it likes.
#[test]
fn a_tso_frame_from_the_guest_reaches_the_host_as_one_gso_frame() {
    let mut r = rig(12, u64::MAX);
    let tap = r.dev.tap_name().to_owned();
    let host = VnetPacketSocket::open(&tap);
    let frame = tcp_frame(host_mac(&tap), MAC, r.guest_ip, r.host_ip, &pattern(9000));
    let mut hdr = [0u8; 12];
    hdr[..10].copy_from_slice(&tso4_header(1448));
    r.send(hdr, &frame);
    let guest_ip = r.guest_ip;
    let (got_hdr, got) = host.receive(|f| tcp_to_7777(f) && f[26..30] == guest_ip.octets());
    assert_eq!(got_hdr[1], 1, "gso_type TCPV4");
    assert_eq!(
        u16::from_le_bytes([got_hdr[4], got_hdr[5]]),
        1448,
        "gso_size"
    );
    assert_eq!(got.len(), frame.len());
    assert!(got == frame, "the frame arrived changed");
    assert!(r.irq.reset_reasons().is_empty());
}

/// The fuzzing entry's seed does what it says, and mutations of it never make the device
/// use more chains than it took, on any queue.
#[test]
fn fuzzing_passes_never_use_more_chains_than_taken() {
    let seed = fuzzing::example_input();
    let out = fuzzing::pass(&seed);
    assert!(out.ran && !out.needs_reset, "{out:?}");
    assert_eq!(out.offered, [8, 2, 1]);
    assert_eq!(
        out.taken,
        [3, 2, 1],
        "receive chains are taken as frames need them"
    );
    assert_eq!(out.used, [3, 2, 1], "three frames in, two out, one command");
    assert_eq!(out.sent, 2);
    let committed = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/virtio_net_queues/pair"),
    )
    .expect("fuzz/seeds/virtio_net_queues/pair");
    assert!(
        committed == seed,
        "the committed seed is fuzzing::example_input()"
    );

    let mut next = crate::testing::xorshift();
    let (mut ran, mut reset, mut served) = (0, 0, 0);
    for _ in 0..1500 {
        let mut input = seed.clone();
        for _ in 0..1 + next() % 8 {
            // Mostly the header, the rings and the buffers' first bytes; sometimes anywhere.
            let at = match next() % 4 {
                0 => usize::try_from(next()).unwrap() % input.len(),
                1 => usize::try_from(next()).unwrap() % 8,
                2 => 8 + 0x5000 + usize::try_from(next()).unwrap() % 0x500,
                _ => {
                    let q = usize::try_from(next()).unwrap() % 3;
                    8 + q * 0x2000 + usize::try_from(next()).unwrap() % 0x140
                }
            };
            input[at] = u8::try_from(next() & 0xff).unwrap();
        }
        let out = fuzzing::pass(&input);
        for q in 0..3 {
            assert!(
                out.used[q] <= out.taken[q],
                "queue {q}: {out:?} for input {:?}",
                &input[..64]
            );
        }
        ran += usize::from(out.ran);
        reset += usize::from(out.needs_reset);
        served += usize::from(out.used.iter().any(|&u| u > 0));
    }
    // The mutations reach every outcome.
    assert!(
        ran > 1000 && reset > 20 && served > 1000,
        "ran {ran} reset {reset} served {served}"
    );
}

/// Found by fuzzing: a receive buffer over the control queue's rings. The frames the device
/// receives write the control queue's available index, so the device answers three
/// commands where none was offered when the pass began. That is the guest's own doing; the
/// device still uses no more chains than it takes, and the VMM goes on.
#[test]
fn a_receive_buffer_over_another_queues_ring_only_confuses_the_guest() {
    let input = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/virtio_net_queues/found-rx-buffer-over-ctrl-ring"),
    )
    .unwrap();
    let out = fuzzing::pass(&input);
    assert!(out.ran);
    assert_eq!(out.offered[2], 0);
    assert!(out.used[2] > 0, "{out:?}");
    for q in 0..3 {
        assert!(out.used[q] <= out.taken[q], "{out:?}");
    }
}
