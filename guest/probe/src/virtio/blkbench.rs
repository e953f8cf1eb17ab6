//! `probe.blk_bench`: throughput of one virtio-blk device with `qd` requests
//! in flight. Completions are harvested in batches; each batch is refilled
//! and announced with at most one notification (none while the device says
//! it is polling). Time runs from the first submission to the last
//! completion, measured with the TSC.

use crate::clock::Clock;
use crate::devopts::BlkBench;
use crate::dma::Dma;
use crate::util::Reason;
use crate::{emit, reason};

use super::blk::{Disk, SECTOR, S_OK, T_IN, T_OUT};
use super::queue::MAX_QSIZE;
use super::Seg;

/// At most this much memory for data buffers; beyond it requests share them.
const MAX_BUFFERS: u64 = 64 << 20;
/// A device that completes nothing for this long is hung.
const HANG_MS: u64 = 10_000;

pub struct Stats {
    pub ios: u64,
    pub ticks: u64,
    pub qd: u16,
}

/// xorshift64*: cheap, good enough to scatter offsets.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn bench(disk: &mut Disk, b: &BlkBench, dma: &mut Dma, clock: &Clock) -> Result<Stats, Reason> {
    let bs = u64::from(b.bs);
    if b.bs > disk.size_max {
        return Err(reason!("bs={} exceeds the device's size_max {}", b.bs, disk.size_max));
    }
    let span = if b.span == 0 { disk.capacity.saturating_sub(b.start) } else { b.span };
    if b.start.checked_add(span).is_none_or(|end| end > disk.capacity) || span < bs {
        return Err(reason!(
            "range {:#x}+{:#x} does not fit the disk ({} bytes) with bs={}",
            b.start,
            span,
            disk.capacity,
            bs
        ));
    }
    let blocks = span / bs;
    let id = disk.id;
    let (t, q) = (&disk.d.t, &mut disk.d.queues[0]);
    let qd = b.qd.min(q.size / q.slots_for(3)).max(1);
    let hdrs = dma.alloc(u64::from(qd) * 32, 64).ok_or_else(|| reason!("out of DMA memory for headers"))?;
    let mut nbuf = u64::from(qd).min((MAX_BUFFERS / bs).max(1));
    let bufs = loop {
        if let Some(a) = dma.alloc(nbuf * bs, 4096) {
            break a;
        }
        if nbuf == 1 {
            return Err(reason!("out of DMA memory for one {} byte buffer", bs));
        }
        nbuf /= 2;
    };
    let (typ, random) = (if b.mode.writes() { T_OUT } else { T_IN }, b.mode.random());
    let mut slot_of = [0u16; MAX_QSIZE as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq = 0u64;
    let mut submit = |q: &mut super::Virtqueue, k: u16| -> Result<u16, Reason> {
        let block = if random { next_random(&mut rng) % blocks } else { seq % blocks };
        seq += 1;
        let hdr = hdrs + u64::from(k) * 32;
        // SAFETY: slot k's header and status lie in our DMA allocation and the
        // device is done with them (the slot's previous request completed).
        unsafe {
            core::ptr::write_volatile(hdr as *mut u32, typ);
            core::ptr::write_volatile((hdr + 4) as *mut u32, 0);
            core::ptr::write_volatile((hdr + 8) as *mut u64, (b.start + block * bs) / SECTOR);
            core::ptr::write_volatile((hdr + 16) as *mut u8, 0xff);
        }
        let data = bufs + (u64::from(k) % nbuf) * bs;
        let data = if typ == T_OUT { Seg::out(data, b.bs) } else { Seg::inp(data, b.bs) };
        q.add(&[Seg::out(hdr, 16), data, Seg::inp(hdr + 16, 1)]).ok_or_else(|| reason!("queue full"))
    };
    let t0 = clock.now();
    for k in 0..qd {
        slot_of[usize::from(submit(q, k)?)] = k;
    }
    q.kick();
    let deadline = clock.deadline_ms(b.ms);
    let (mut ios, mut inflight, mut stopping) = (0u64, u32::from(qd), false);
    let mut last = t0;
    let mut idle = 0u32;
    loop {
        let mut got = false;
        while let Some((head, _)) = q.poll()? {
            let k = slot_of[usize::from(head)];
            // SAFETY: slot k's status byte, written by the device before the
            // used entry that we just read (poll has acquire ordering).
            let status = unsafe { core::ptr::read_volatile((hdrs + u64::from(k) * 32 + 16) as *const u8) };
            if status != S_OK {
                return Err(reason!("{}: request failed with status {:#x}", id, status));
            }
            ios += 1;
            inflight -= 1;
            got = true;
            if !stopping {
                slot_of[usize::from(submit(q, k)?)] = k;
                inflight += 1;
            }
        }
        if got {
            last = clock.now();
            idle = 0;
            if !stopping {
                q.kick();
            }
        }
        if inflight == 0 {
            break;
        }
        idle = idle.wrapping_add(1);
        if idle.is_multiple_of(1024) {
            stopping |= deadline.expired();
            if clock.ns(clock.now().wrapping_sub(last)) > HANG_MS * 1_000_000 || (!clock.calibrated && idle > 1 << 30) {
                return Err(reason!(
                    "{}: {} requests stuck for {} ms (status {:#x})",
                    id,
                    inflight,
                    HANG_MS,
                    t.status()
                ));
            }
        }
        core::hint::spin_loop();
    }
    Ok(Stats { ios, ticks: last.wrapping_sub(t0), qd })
}

/// Runs the benchmark and prints its `PROBE blk_bench` line.
pub fn run(disk: &mut Disk, b: &BlkBench, dma: &mut Dma, clock: &Clock) -> bool {
    let kicks0 = disk.d.queues[0].kicks;
    match bench(disk, b, dma, clock) {
        Ok(s) => {
            let bytes = s.ios * u64::from(b.bs);
            emit!(
                "PROBE blk_bench ok dev={} mode={} bs={} qd={} ms={} ios={} iops={} mbps={} kicks={}",
                disk.id,
                b.mode.name(),
                b.bs,
                s.qd,
                clock.ns(s.ticks) / 1_000_000,
                s.ios,
                clock.per_sec(s.ios, s.ticks),
                clock.per_sec(bytes, s.ticks) / 1_000_000,
                disk.d.queues[0].kicks - kicks0
            );
            true
        }
        Err(r) => {
            emit!("PROBE blk_bench fail {}", r);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_spread_over_the_range() {
        let mut s = 1u64;
        let mut seen = [false; 16];
        for _ in 0..256 {
            seen[(next_random(&mut s) % 16) as usize] = true;
        }
        assert!(seen.iter().all(|&x| x));
    }
}
