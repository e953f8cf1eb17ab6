//! The `net` check on the first virtio-net device: announce our address with
//! a gratuitous ARP (the transmit path must complete it), then answer ARP and
//! ICMP echo for `probe.net_secs` (until `probe.net_min_echo` echoes if
//! given); then, if asked, a throughput benchmark that sinks frames or
//! sources UDP frames to a given host.

use crate::clock::{Clock, Deadline};
use crate::devopts::{DevOptions, NetBench, NetMode};
use crate::dma::Dma;
use crate::netpkt::{self, Kind, BROADCAST};
use crate::util::Reason;
use crate::{emit, reason};

use super::queue::MAX_QSIZE;
use super::{open, Dev, DevId, Device, Devs, Seg, F_EVENT_IDX, TYPE_NET};

const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr_v1 (VERSION_1 always includes num_buffers).
const HDR: u64 = 12;
/// Bytes per buffer: header plus a full Ethernet frame, rounded up.
const BUF: u64 = 2048;
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const DEFAULT_IP: [u8; 4] = [10, 0, 2, 15];
/// How often the serving loop reads the device status for NEEDS_RESET.
const STATUS_EVERY_MS: u64 = 10;

#[derive(Default, Clone, Copy)]
struct Counters {
    rx: u64,
    rx_bytes: u64,
    tx: u64,
    arp: u64,
    echo: u64,
    first_rx: u64,
    last_rx: u64,
}

struct Nic {
    d: Device<2>,
    id: DevId,
    mac: [u8; 6],
    ip: [u8; 4],
    rx_bufs: u64,
    tx_bufs: u64,
    /// Which buffer each in-flight head uses.
    rx_slot: [u16; MAX_QSIZE as usize],
    tx_slot: [u16; MAX_QSIZE as usize],
    tx_free: [u16; MAX_QSIZE as usize],
    ntx_free: usize,
    c: Counters,
}

fn buf<'a>(base: u64, k: u16, len: u64) -> &'a mut [u8] {
    // SAFETY: buffer k of a BUF-strided array in the DMA arena; the device does
    // not own it while the driver touches it (posted buffers are only read after
    // their completion, transmit buffers only written while free).
    unsafe { core::slice::from_raw_parts_mut((base + u64::from(k) * BUF) as *mut u8, len.min(BUF) as usize) }
}

impl Nic {
    fn open(f: &Dev, o: &DevOptions, dma: &mut Dma, clock: &Clock) -> Result<Nic, Reason> {
        let d = open::<2>(f, F_MAC | F_EVENT_IDX, o.qsize, dma, clock)?;
        let mut mac = DEFAULT_MAC;
        if d.t.features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = d.t.config(i as u64, 1) as u8;
            }
        }
        let (rxn, txn) = (d.queues[0].size, d.queues[1].size);
        let rx_bufs = dma.alloc(u64::from(rxn) * BUF, 4096).ok_or_else(|| reason!("out of DMA memory"))?;
        let tx_bufs = dma.alloc(u64::from(txn) * BUF, 4096).ok_or_else(|| reason!("out of DMA memory"))?;
        let mut nic = Nic {
            d,
            id: f.id,
            mac,
            ip: o.net_ip.unwrap_or(DEFAULT_IP),
            rx_bufs,
            tx_bufs,
            rx_slot: [0; MAX_QSIZE as usize],
            tx_slot: [0; MAX_QSIZE as usize],
            tx_free: [0; MAX_QSIZE as usize],
            ntx_free: 0,
            c: Counters::default(),
        };
        for k in 0..txn {
            nic.tx_free[usize::from(k)] = k;
        }
        nic.ntx_free = usize::from(txn);
        for k in 0..rxn {
            nic.post_rx(k)?;
        }
        nic.d.queues[0].kick();
        Ok(nic)
    }

    fn post_rx(&mut self, k: u16) -> Result<(), Reason> {
        let addr = self.rx_bufs + u64::from(k) * BUF;
        let head = self.d.queues[0].add(&[Seg::inp(addr, BUF as u32)]).ok_or_else(|| reason!("rx queue full"))?;
        self.rx_slot[usize::from(head)] = k;
        Ok(())
    }

    /// Frees the buffers of completed transmissions.
    fn reclaim_tx(&mut self) -> Result<(), Reason> {
        while let Some((head, _)) = self.d.queues[1].poll()? {
            self.tx_free[self.ntx_free] = self.tx_slot[usize::from(head)];
            self.ntx_free += 1;
            self.c.tx += 1;
        }
        Ok(())
    }

    /// A free transmit buffer's index, reclaiming completions if needed.
    fn tx_buffer(&mut self) -> Result<Option<u16>, Reason> {
        if self.ntx_free == 0 {
            self.reclaim_tx()?;
        }
        if self.ntx_free == 0 {
            return Ok(None);
        }
        self.ntx_free -= 1;
        Ok(Some(self.tx_free[self.ntx_free]))
    }

    /// Queues buffer `k` holding a frame of `len` bytes (header zeroed here).
    fn send(&mut self, k: u16, len: usize) -> Result<(), Reason> {
        buf(self.tx_bufs, k, HDR).fill(0);
        let addr = self.tx_bufs + u64::from(k) * BUF;
        let seg = Seg::out(addr, (HDR as usize + len) as u32);
        let head = self.d.queues[1].add(&[seg]).ok_or_else(|| reason!("tx queue full"))?;
        self.tx_slot[usize::from(head)] = k;
        Ok(())
    }

    /// Sends one frame built by `build` into a transmit buffer (no kick).
    fn send_with(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> Result<bool, Reason> {
        let Some(k) = self.tx_buffer()? else { return Ok(false) };
        let frame = &mut buf(self.tx_bufs, k, BUF)[HDR as usize..];
        let len = build(frame);
        self.send(k, len)?;
        Ok(true)
    }

    /// Handles every received frame: answers ARP/echo, counts, reposts the
    /// buffers. `seen` sees each frame first. Returns how many arrived.
    fn service_rx(&mut self, clock: &Clock, mut seen: impl FnMut(&[u8])) -> Result<u64, Reason> {
        let mut n = 0;
        while let Some((head, len)) = self.d.queues[0].poll()? {
            let k = self.rx_slot[usize::from(head)];
            if u64::from(len) < HDR || u64::from(len) > BUF {
                return Err(reason!("{}: rx completion of {} bytes (header {}, buffer {})", self.id, len, HDR, BUF));
            }
            let now = clock.now();
            if self.c.rx == 0 {
                self.c.first_rx = now;
            }
            self.c.last_rx = now;
            self.c.rx += 1;
            self.c.rx_bytes += u64::from(len) - HDR;
            n += 1;
            let frame = &buf(self.rx_bufs, k, u64::from(len))[HDR as usize..];
            seen(frame);
            let mut reply = [0u8; 1600];
            let (kind, rlen) = netpkt::answer(frame, self.mac, self.ip, &mut reply);
            if kind != Kind::Other
                && self.send_with(|out| {
                    out[..rlen].copy_from_slice(&reply[..rlen]);
                    rlen
                })?
            {
                match kind {
                    Kind::ArpRequest => self.c.arp += 1,
                    _ => self.c.echo += 1,
                }
            }
            self.post_rx(k)?;
        }
        if n > 0 {
            self.d.queues[0].kick();
            self.d.queues[1].kick();
        }
        Ok(n)
    }

    /// Serves ARP/echo until `deadline` or until `stop` says so.
    fn serve(&mut self, clock: &Clock, deadline: Deadline, stop: impl Fn(&Counters) -> bool) -> Result<(), Reason> {
        let mut spins = 0u32;
        let mut status_check = clock.deadline_ms(STATUS_EVERY_MS);
        loop {
            self.service_rx(clock, |_| {})?;
            self.reclaim_tx()?;
            if stop(&self.c) {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                if deadline.expired() {
                    return Ok(());
                }
                // Reading the status is an exit to the VMM, which a busy loop of 1024 spins
                // would make thousands of times a second: go by the clock instead.
                if status_check.expired() {
                    if self.d.t.needs_reset() {
                        return Err(reason!("{}: device set NEEDS_RESET", self.id));
                    }
                    status_check = clock.deadline_ms(STATUS_EVERY_MS);
                }
            }
            core::hint::spin_loop();
        }
    }

    /// Waits until every queued transmission completed.
    fn drain_tx(&mut self, clock: &Clock, ms: u64) -> Result<(), Reason> {
        let d = clock.deadline_ms(ms);
        while self.d.queues[1].in_flight() > 0 {
            self.reclaim_tx()?;
            self.service_rx(clock, |_| {})?;
            if d.expired() {
                return Err(reason!(
                    "{}: {} frames not transmitted after {} ms",
                    self.id,
                    self.d.queues[1].in_flight(),
                    ms
                ));
            }
        }
        Ok(())
    }
}

struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

struct Ip([u8; 4]);

impl core::fmt::Display for Ip {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}.{}.{}", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

fn functional(nic: &mut Nic, o: &DevOptions, clock: &Clock) -> Result<(), Reason> {
    let (mac, ip) = (nic.mac, nic.ip);
    // Gratuitous ARP: announces us, and proves the transmit path.
    nic.send_with(|out| netpkt::arp(out, 1, mac, ip, BROADCAST, [0; 6], ip))?;
    nic.d.queues[1].kick();
    nic.drain_tx(clock, 2000)?;
    let ms = o.net_secs.saturating_mul(1000);
    let t0 = clock.now();
    let min_echo = o.net_min_echo;
    nic.serve(clock, clock.deadline_ms(ms), |c| min_echo > 0 && c.echo >= min_echo)?;
    let elapsed = clock.ns(clock.now().wrapping_sub(t0)) / 1_000_000;
    nic.drain_tx(clock, 2000)?;
    if nic.c.echo < min_echo {
        return Err(reason!("{}: answered {} echo requests in {} ms, want {}", nic.id, nic.c.echo, elapsed, min_echo));
    }
    emit!(
        "PROBE net ok dev={} mac={} ip={} ms={} rx={} tx={} arp={} echo={}",
        nic.id,
        Mac(mac),
        Ip(ip),
        elapsed,
        nic.c.rx,
        nic.c.tx,
        nic.c.arp,
        nic.c.echo
    );
    Ok(())
}

/// Finds `ip`'s MAC with ARP requests every 200 ms for up to 3 s.
fn resolve(nic: &mut Nic, ip: [u8; 4], clock: &Clock) -> Result<[u8; 6], Reason> {
    let (mac, our_ip) = (nic.mac, nic.ip);
    for _ in 0..15 {
        nic.send_with(|out| netpkt::arp(out, 1, mac, our_ip, BROADCAST, [0; 6], ip))?;
        nic.d.queues[1].kick();
        let d = clock.deadline_ms(200);
        let mut found = None;
        while !d.expired() && found.is_none() {
            nic.service_rx(clock, |f| found = found.or(netpkt::arp_sender_mac(f, ip)))?;
            nic.reclaim_tx()?;
        }
        if let Some(m) = found {
            return Ok(m);
        }
    }
    Err(reason!("{}: no ARP reply from {} in 3 s", nic.id, Ip(ip)))
}

fn bench(nic: &mut Nic, b: &NetBench, o: &DevOptions, clock: &Clock) -> Result<(), Reason> {
    match b.mode {
        NetMode::Sink => {
            // Count this phase alone: from its first frame to its last.
            let before = core::mem::take(&mut nic.c);
            nic.serve(clock, clock.deadline_ms(b.ms), |_| false)?;
            let c = core::mem::replace(&mut nic.c, before);
            let (frames, bytes) = (c.rx, c.rx_bytes);
            if frames == 0 {
                return Err(reason!("{}: no frames arrived in {} ms", nic.id, b.ms));
            }
            let ticks = c.last_rx.wrapping_sub(c.first_rx);
            emit!(
                "PROBE net_bench ok dev={} mode=sink ms={} frames={} bytes={} fps={} mbps={}",
                nic.id,
                clock.ns(ticks) / 1_000_000,
                frames,
                bytes,
                clock.per_sec(frames, ticks),
                clock.per_sec(bytes * 8, ticks) / 1_000_000
            );
        }
        NetMode::Source => {
            let dst = b.dst_ip.unwrap_or_else(|| {
                let mask = u32::MAX.checked_shl(32 - u32::from(o.net_prefix)).unwrap_or(0);
                (u32::from_be_bytes(nic.ip) & mask | 1).to_be_bytes()
            });
            let dst_mac = match b.dst_mac {
                Some(m) => m,
                None => resolve(nic, dst, clock)?,
            };
            let (mac, ip, size, port) = (nic.mac, nic.ip, usize::from(b.size), b.port);
            let tx0 = nic.c.tx;
            let t0 = clock.now();
            let deadline = clock.deadline_ms(b.ms);
            let mut seq = 0u64;
            let mut spins = 0u32;
            loop {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && deadline.expired() {
                    break;
                }
                let mut queued = false;
                while nic.send_with(|out| netpkt::udp(out, mac, dst_mac, ip, dst, port, size, seq))? {
                    seq += 1;
                    queued = true;
                }
                if queued {
                    nic.d.queues[1].kick();
                }
                nic.service_rx(clock, |_| {})?;
            }
            nic.drain_tx(clock, 5000)?;
            let ticks = clock.now().wrapping_sub(t0);
            let frames = nic.c.tx - tx0;
            emit!(
                "PROBE net_bench ok dev={} mode=source ms={} frames={} bytes={} fps={} mbps={} dst={} dst_mac={}",
                nic.id,
                clock.ns(ticks) / 1_000_000,
                frames,
                frames * size as u64,
                clock.per_sec(frames, ticks),
                clock.per_sec(frames * size as u64 * 8, ticks) / 1_000_000,
                Ip(dst),
                Mac(dst_mac)
            );
        }
    }
    Ok(())
}

pub fn check(devs: &Devs, o: &DevOptions, dma: &mut Dma, clock: &Clock) -> bool {
    let Some(f) = devs.of_type(TYPE_NET).next() else {
        emit!("PROBE net fail no virtio-net device");
        return false;
    };
    let mut nic = match Nic::open(f, o, dma, clock) {
        Ok(n) => n,
        Err(r) => {
            emit!("PROBE net fail {}", r);
            return false;
        }
    };
    let mut ok = match functional(&mut nic, o, clock) {
        Ok(()) => true,
        Err(r) => {
            emit!("PROBE net fail {}", r);
            false
        }
    };
    if let Some(b) = o.net_bench {
        if let Err(r) = bench(&mut nic, &b, o, clock) {
            emit!("PROBE net_bench fail {}", r);
            ok = false;
        }
    }
    let _ = nic.d.t.reset(clock);
    ok
}
