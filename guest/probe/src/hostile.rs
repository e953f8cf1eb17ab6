//! The `hostile` check: malformed queues on one virtio device
//! (`probe.hostile=rng|blk|net|console`), one case at a time on a freshly
//! reset device. For each case the device must stop (set NEEDS_RESET),
//! ignore the chain, or reject it (complete it with no data, or with an error
//! status for blk); it must never report more data than the valid buffers
//! could hold, nor write into a buffer outside RAM. After each case a reset
//! must bring it back (a valid request works again), and at the end another
//! virtio device must still work. The VMM surviving is implied by the probe
//! printing its summary.

use crate::clock::Clock;
use crate::devopts::{DevOptions, HostileCase};
use crate::dma::Dma;
use crate::util::Reason;
use crate::virtio::queue::{Rings, Virtqueue, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::{self, request, transport, Dev, Devs, Seg, Transport};
use crate::{emit, reason};

/// Queue entries for the attacked queue.
const QSIZE: u16 = 16;
/// How long a case waits for the device to react.
const OBSERVE_MS: u64 = 300;
/// An address no guest has RAM at; with the lengths used it also wraps past 2^64.
const OOB_ADDR: u64 = 0xffff_ffff_ffff_ff00;
/// A descriptor table address far outside RAM (but canonical and page aligned).
const OOB_RING: u64 = 0x0000_7f00_0000_0000;
const OOB_LEN: u32 = 0x200;
const HUGE_LEN: u32 = 0xffff_f000;
const PAGE: u64 = crate::ranges::PAGE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    NeedsReset,
    Ignored,
    Rejected,
    Completed,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::NeedsReset => "needs_reset",
            Outcome::Ignored => "ignored",
            Outcome::Rejected => "rejected",
            Outcome::Completed => "completed",
        }
    }
}

/// How a device type is attacked: the queue, and a valid request on it.
struct Target {
    queue: u16,
    queues: u16,
    /// Segments of a valid request (buffers in `bufs`); `data` is the index
    /// of the segment the address/length cases corrupt.
    segs: [Seg; 3],
    nsegs: usize,
    data: usize,
    /// blk: where the status byte lands (an error status means "rejected").
    status: Option<u64>,
}

/// Copies `bytes` to the start of the 1 KiB DMA buffer at `bufs`.
fn fill(bufs: u64, bytes: &[u8]) {
    let n = bytes.len().min(1024);
    // SAFETY: `bufs` is a 1 KiB DMA buffer that we own and the device does not use now.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), bufs as *mut u8, n) };
}

fn target(t: u16, bufs: u64) -> Option<Target> {
    let one = |queue, queues, seg| Target { queue, queues, segs: [seg; 3], nsegs: 1, data: 0, status: None };
    match t {
        virtio::TYPE_RNG => Some(one(0, 1, Seg::inp(bufs, 64))),
        // console: port 0's transmit queue, a line of text.
        virtio::TYPE_CONSOLE => {
            fill(bufs, b"kiln-probe host\n");
            Some(one(1, 2, Seg::out(bufs, 16)))
        }
        // net: the transmit queue, a zeroed virtio-net header and a gratuitous ARP.
        virtio::TYPE_NET => {
            let mut frame = [0u8; 72];
            let ip = [10, 0, 2, 15];
            crate::netpkt::arp(&mut frame[12..], 1, [0x52, 0x54, 0, 0x12, 0x34, 0x56], ip, [0xff; 6], [0; 6], ip);
            fill(bufs, &frame);
            Some(one(1, 2, Seg::out(bufs, 72)))
        }
        virtio::TYPE_BLOCK => {
            fill(bufs, &[0; 16]); // an IN request for sector 0
            Some(Target {
                queue: 0,
                queues: 1,
                segs: [Seg::out(bufs, 16), Seg::inp(bufs + 512, 512), Seg::inp(bufs + 16, 1)],
                nsegs: 3,
                data: 1,
                status: Some(bufs + 16),
            })
        }
        _ => None,
    }
}

impl Target {
    fn segs(&self) -> &[Seg] {
        &self.segs[..self.nsegs]
    }

    /// Bytes a well-behaved device could write into the valid request.
    fn writable(&self) -> u32 {
        self.segs().iter().filter(|s| s.write).map(|s| s.len).sum()
    }
}

/// Writes `segs` as descriptors 0.. of `q`, chained; returns the last index.
fn write_chain(q: &mut Virtqueue, segs: &[Seg]) -> u16 {
    let mut i = 0u16;
    for (k, s) in segs.iter().enumerate() {
        let last = k + 1 == segs.len();
        let flags = if s.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
        q.raw_desc(i, s.addr, s.len, flags, i + 1);
        if !last {
            i += 1;
        }
    }
    i
}

/// Sets up the device with the attacked queue malformed as `case` says and
/// posts the bad request. Returns the transport and the attacked queue, or
/// the outcome if the device already refused during setup.
#[allow(clippy::too_many_arguments)]
fn arm(
    f: &Dev,
    tg: &Target,
    case: HostileCase,
    edge: u64,
    dma: &mut Dma,
    clock: &Clock,
) -> Result<Result<(Transport, Virtqueue), Outcome>, Reason> {
    let mut t = transport(f)?;
    t.init(0, clock)?;
    let mut attacked = None;
    for index in 0..tg.queues {
        if index != tg.queue {
            t.setup_queue(index, QSIZE, dma)?;
            continue;
        }
        let max = t.queue_max(index);
        if max < 2 {
            return Err(reason!("{}: queue {} has maximum size {}", f.id, index, max));
        }
        let size = QSIZE.min(max);
        let rings = Rings::alloc(dma, size).ok_or_else(|| reason!("out of DMA memory"))?;
        let (notify, wide) = t.notify_addr(index)?;
        let q = match case {
            HostileCase::BadSize => {
                t.program_queue(index, size - 1, rings);
                Virtqueue::new(index, size - 1, rings, notify, false, None).with_wide_notify(wide)
            }
            HostileCase::RingOob => {
                t.program_queue(index, size, Rings { desc: OOB_RING, ..rings });
                Virtqueue::new(index, size, rings, notify, false, None).with_wide_notify(wide)
            }
            _ => {
                t.program_queue(index, size, rings);
                Virtqueue::new(index, size, rings, notify, false, None).with_wide_notify(wide)
            }
        };
        attacked = Some(q);
    }
    let mut q = attacked.ok_or_else(|| reason!("no queue {}", tg.queue))?;
    if t.driver_ok().is_err() {
        return Ok(Err(if t.needs_reset() { Outcome::NeedsReset } else { Outcome::Rejected }));
    }
    let segs = tg.segs();
    match case {
        HostileCase::Loop => {
            // A chain of at least two descriptors whose last points back to the first.
            let mut two = [segs[0]; 3];
            let n = segs.len().max(2);
            two[..segs.len()].copy_from_slice(segs);
            let last = write_chain(&mut q, &two[..n]);
            let s = two[n - 1];
            q.raw_desc(last, s.addr, s.len, DESC_F_NEXT | if s.write { DESC_F_WRITE } else { 0 }, 0);
            q.raw_push(0);
            q.publish();
        }
        HostileCase::OobAddr | HostileCase::HugeLen => {
            let mut s = tg.segs;
            if case == HostileCase::OobAddr {
                s[tg.data].addr = OOB_ADDR;
                s[tg.data].len = OOB_LEN;
            } else {
                // Starts in the last RAM page below 4 GiB: whatever follows is not RAM.
                s[tg.data].addr = edge;
                s[tg.data].len = HUGE_LEN;
            }
            write_chain(&mut q, &s[..tg.nsegs]);
            q.raw_push(0);
            q.publish();
        }
        HostileCase::AvailIdx => {
            write_chain(&mut q, segs);
            q.raw_push(0);
            let far = q.size.wrapping_mul(2).wrapping_add(5);
            q.raw_avail_idx(far);
        }
        HostileCase::BadHead => {
            write_chain(&mut q, segs);
            q.raw_push(q.size + 3);
            q.publish();
        }
        HostileCase::BadNext => {
            let s = segs[0];
            let flags = if s.write { DESC_F_WRITE } else { 0 } | DESC_F_NEXT;
            q.raw_desc(0, s.addr, s.len, flags, q.size + 7);
            q.raw_push(0);
            q.publish();
        }
        HostileCase::BadSize | HostileCase::RingOob => {
            write_chain(&mut q, segs);
            q.raw_push(0);
            q.publish();
        }
    }
    q.notify_now();
    Ok(Ok((t, q)))
}

/// Watches how the device reacts to the armed case.
fn observe(t: &Transport, q: &Virtqueue, tg: &Target, case: HostileCase, clock: &Clock) -> Result<Outcome, Reason> {
    let d = clock.deadline_ms(OBSERVE_MS);
    while !d.expired() {
        if t.needs_reset() {
            return Ok(Outcome::NeedsReset);
        }
        if q.used_idx() != 0 {
            let (id, len) = q.raw_used(0);
            if id >= u32::from(q.size) {
                return Err(reason!("{}: used id {} is past the queue ({} entries)", t.id, id, q.size));
            }
            // What the chain as posted can hold: the corrupted segment's length
            // counts; a loop may be walked up to the queue size.
            let data = tg.segs[tg.data];
            let bad_len = match case {
                HostileCase::OobAddr => OOB_LEN,
                HostileCase::HugeLen => HUGE_LEN,
                _ => data.len,
            };
            let others = tg.writable() - if data.write { data.len } else { 0 };
            let holds = u64::from(others) + if data.write { u64::from(bad_len) } else { 0 };
            let holds = if case == HostileCase::Loop { holds * u64::from(q.size) } else { holds };
            if u64::from(len) > holds {
                return Err(reason!("{}: device reports {} bytes written, the request holds {}", t.id, len, holds));
            }
            if case == HostileCase::OobAddr && data.write && len > others {
                return Err(reason!(
                    "{}: device completed a write of {} bytes to {:#x}, outside RAM",
                    t.id,
                    len,
                    OOB_ADDR
                ));
            }
            if case == HostileCase::HugeLen && data.write && u64::from(len) > u64::from(others) + PAGE {
                return Err(reason!("{}: device reports {} bytes written from the last RAM page on", t.id, len));
            }
            // SAFETY: the status byte lies in our DMA buffer; the device completed the request.
            let status = tg.status.map(|a| unsafe { core::ptr::read_volatile(a as *const u8) });
            // With device-writable buffers, 0 bytes means "refused"; a transmit
            // chain always completes with 0.
            let refused = (len == 0 && tg.writable() > 0) || status.is_some_and(|s| s != 0);
            return Ok(if refused { Outcome::Rejected } else { Outcome::Completed });
        }
        clock.sleep_us(200);
    }
    Ok(Outcome::Ignored)
}

/// A valid request on a freshly opened device of any supported type.
pub fn health(f: &Dev, dma: &mut Dma, clock: &Clock) -> Result<(), Reason> {
    let t = f.dev_type;
    let bufs = dma.alloc(1024, 64).ok_or_else(|| reason!("out of DMA memory"))?;
    let tg = target(t, bufs).ok_or_else(|| reason!("{}: no health check for this device type", f.id))?;
    let mut tr = transport(f)?;
    tr.init(0, clock)?;
    let mut q = None;
    for index in 0..tg.queues {
        let vq = tr.setup_queue(index, QSIZE, dma)?;
        if index == tg.queue {
            q = Some(vq);
        }
    }
    let mut q = q.ok_or_else(|| reason!("no queue {}", tg.queue))?;
    tr.driver_ok()?;
    let len = request(&tr, &mut q, tg.segs(), clock, 2000)?;
    if let Some(a) = tg.status {
        // SAFETY: the status byte lies in our DMA buffer; the request completed.
        let s = unsafe { core::ptr::read_volatile(a as *const u8) };
        if s != 0 {
            return Err(reason!("{}: valid request failed with status {}", f.id, s));
        }
    }
    if t == virtio::TYPE_RNG && len == 0 {
        return Err(reason!("{}: valid entropy request returned no bytes", f.id));
    }
    tr.reset(clock)
}

/// `edge` is a free page at the very end of RAM below 4 GiB (for `huge_len`).
pub fn check(devs: &Devs, o: &DevOptions, edge: Option<u64>, dma: &mut Dma, clock: &Clock) -> bool {
    let Some(f) = devs.of_type(o.hostile_target).next() else {
        emit!("PROBE hostile fail no virtio-{} device to attack", virtio::type_name(o.hostile_target));
        return false;
    };
    let Some(bufs) = dma.alloc(1024, 64) else {
        emit!("PROBE hostile fail out of DMA memory");
        return false;
    };
    let Some(tg) = target(o.hostile_target, bufs) else {
        emit!("PROBE hostile fail cannot attack this device type");
        return false;
    };
    let Some(edge) = edge else {
        emit!("PROBE hostile fail no free page at the end of RAM below 4 GiB");
        return false;
    };
    let mut counts = [0u32; 4];
    let mut ncases = 0;
    for case in HostileCase::ALL.into_iter().filter(|c| o.hostile_cases & c.bit() != 0) {
        let outcome = arm(f, &tg, case, edge, dma, clock).and_then(|armed| match armed {
            Ok((t, q)) => observe(&t, &q, &tg, case, clock),
            Err(outcome) => Ok(outcome),
        });
        let outcome = match outcome {
            Ok(x) => x,
            Err(r) => {
                emit!("PROBE hostile fail case={}: {}", case.name(), r);
                return false;
            }
        };
        let recovered = health(f, dma, clock);
        emit!(
            "PROBE info hostile dev={} case={} result={} recovered={}",
            f.id,
            case.name(),
            outcome.name(),
            if recovered.is_ok() { "yes" } else { "no" }
        );
        if let Err(r) = recovered {
            emit!("PROBE hostile fail case={}: no recovery after reset: {}", case.name(), r);
            return false;
        }
        counts[outcome as usize] += 1;
        ncases += 1;
    }
    // Another device, of another type, must still work.
    let other = [virtio::TYPE_RNG, virtio::TYPE_BLOCK, virtio::TYPE_CONSOLE, virtio::TYPE_NET]
        .into_iter()
        .filter(|&t| t != o.hostile_target)
        .find_map(|t| devs.of_type(t).next());
    let other_result = other.map(|g| (g, health(g, dma, clock)));
    if let Some((g, Err(r))) = &other_result {
        emit!("PROBE hostile fail other device {} ({}) no longer works: {}", g.id, virtio::type_name(g.dev_type), r);
        return false;
    }
    let (other_name, other_bdf) = match &other_result {
        Some((g, _)) => (virtio::type_name(g.dev_type), Some(g.id)),
        None => ("none", None),
    };
    match other_bdf {
        Some(b) => emit!(
            "PROBE hostile ok dev={} target={} cases={} needs_reset={} ignored={} rejected={} completed={} other={}@{}:ok",
            f.id,
            virtio::type_name(o.hostile_target),
            ncases,
            counts[0],
            counts[1],
            counts[2],
            counts[3],
            other_name,
            b
        ),
        None => emit!(
            "PROBE hostile ok dev={} target={} cases={} needs_reset={} ignored={} rejected={} completed={} other=none",
            f.id,
            virtio::type_name(o.hostile_target),
            ncases,
            counts[0],
            counts[1],
            counts[2],
            counts[3]
        ),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd_desc(table: u64, i: u64) -> (u64, u32, u16, u16) {
        let d = table + i * 16;
        // SAFETY: test memory owned by the test.
        unsafe {
            (
                core::ptr::read(d as *const u64),
                core::ptr::read((d + 8) as *const u32),
                core::ptr::read((d + 12) as *const u16),
                core::ptr::read((d + 14) as *const u16),
            )
        }
    }

    #[test]
    fn targets_describe_a_valid_request_per_device_type() {
        let mem = vec![0u64; 1024];
        let bufs = mem.as_ptr() as u64;
        let blk = target(virtio::TYPE_BLOCK, bufs).unwrap();
        assert_eq!((blk.queue, blk.nsegs, blk.data, blk.writable()), (0, 3, 1, 513));
        assert_eq!(blk.status, Some(bufs + 16));
        assert_eq!(target(virtio::TYPE_RNG, bufs).unwrap().writable(), 64);
        let net = target(virtio::TYPE_NET, bufs).unwrap();
        assert_eq!((net.queue, net.queues, net.writable()), (1, 2, 0));
        // SAFETY: the test's buffer; `target` wrote a gratuitous ARP after the 12-byte header.
        let ethertype = unsafe { core::ptr::read((bufs + 12 + 12) as *const [u8; 2]) };
        assert_eq!(ethertype, [0x08, 0x06]);
        assert!(target(99, bufs).is_none());
    }

    #[test]
    fn write_chain_links_descriptors_in_order() {
        let mem = vec![0u64; 4096];
        let base = (mem.as_ptr() as u64 + 4095) & !4095;
        let mut dma = Dma::over(base, 16 * 1024);
        let rings = Rings::alloc(&mut dma, 8).unwrap();
        let mut q = Virtqueue::new(0, 8, rings, 0, false, None);
        let segs = [Seg::out(0x1000, 16), Seg::inp(0x2000, 512), Seg::inp(0x3000, 1)];
        assert_eq!(write_chain(&mut q, &segs), 2);
        assert_eq!(rd_desc(rings.desc, 0), (0x1000, 16, DESC_F_NEXT, 1));
        assert_eq!(rd_desc(rings.desc, 1), (0x2000, 512, DESC_F_NEXT | DESC_F_WRITE, 2));
        assert_eq!(rd_desc(rings.desc, 2).2, DESC_F_WRITE);
    }
}
