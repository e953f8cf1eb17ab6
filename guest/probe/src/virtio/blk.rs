//! The `blk` check: every virtio-blk device's capacity, serial (GET_ID) and
//! read-only flag; reads checked against the host's pattern; writes of the
//! probe's pattern; FLUSH, DISCARD and WRITE_ZEROES when offered; a write to
//! a read-only disk and reads past the end must fail. Then, if asked, the
//! throughput benchmark ([`super::blkbench`]) on the first suitable disk.
//!
//! Patterns (per little-endian 8-byte word at byte offset `o` of the disk):
//! the host writes `o ^ seed`, the probe writes `!(o ^ seed)`, with `seed`
//! from `probe.blk_seed`.

use core::fmt::Write as _;

use crate::clock::Clock;
use crate::devopts::{BlkBench, DevOptions, Region};
use crate::dma::Dma;
use crate::util::{Printable, Reason, StrBuf};
use crate::{emit, reason};

use super::{open, request, Dev, DevId, Device, Devs, Seg, F_EVENT_IDX, F_INDIRECT_DESC, TYPE_BLOCK};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
pub const WANTED: u64 =
    F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_INDIRECT_DESC | F_EVENT_IDX;

/// Bytes per functional request.
const CHUNK: u32 = 64 << 10;
const TIMEOUT_MS: u64 = 10_000;
pub const SECTOR: u64 = 512;

/// The host's pattern word at byte offset `o`.
pub fn host_word(o: u64, seed: u64) -> u64 {
    o ^ seed
}

/// The probe's pattern word at byte offset `o`.
pub fn probe_word(o: u64, seed: u64) -> u64 {
    !(o ^ seed)
}

/// Fills `buf` (whole words) with `word(disk offset)` from disk offset `at`.
pub fn fill(buf: &mut [u8], at: u64, seed: u64, word: fn(u64, u64) -> u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(at + i as u64 * 8, seed).to_le_bytes());
    }
}

/// The first word of `buf` that differs from the pattern: (offset, found, wanted).
pub fn mismatch(buf: &[u8], at: u64, seed: u64, word: fn(u64, u64) -> u64) -> Option<(u64, u64, u64)> {
    buf.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let o = at + i as u64 * 8;
        let got = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        (got != word(o, seed)).then_some((o, got, word(o, seed)))
    })
}

/// One open disk: the device, a request header/status area and a data buffer.
pub struct Disk {
    pub d: Device<1>,
    pub id: DevId,
    /// 16-byte header at +0, status byte at +16, discard segment at +32.
    req: u64,
    buf: u64,
    /// Bytes per request (CHUNK, or less when the device's size_max says so).
    pub chunk: u32,
    pub capacity: u64,
    /// The device's size_max (largest segment), `u32::MAX` if not given.
    pub size_max: u32,
}

impl Disk {
    pub fn open(f: &Dev, qsize: u16, dma: &mut Dma, clock: &Clock) -> Result<Disk, Reason> {
        let d = open::<1>(f, WANTED, qsize, dma, clock)?;
        let req = dma.alloc(64, 64).ok_or_else(|| reason!("out of DMA memory"))?;
        let buf = dma.alloc(u64::from(CHUNK), 4096).ok_or_else(|| reason!("out of DMA memory"))?;
        let capacity = d.t.config(0, 8).saturating_mul(SECTOR);
        let size_max =
            if d.t.features & F_SIZE_MAX != 0 { u32::try_from(d.t.config(8, 4)).unwrap_or(u32::MAX) } else { u32::MAX };
        let chunk = CHUNK.min(size_max / 512 * 512).max(512);
        Ok(Disk { d, id: f.id, req, buf, chunk, capacity, size_max })
    }

    pub fn features(&self) -> u64 {
        self.d.t.features
    }

    /// The data buffer (CHUNK bytes).
    pub fn buf(&mut self, len: u32) -> &mut [u8] {
        // SAFETY: `buf` is CHUNK bytes of the DMA arena owned by this disk, and
        // no request is in flight while the caller holds the slice.
        unsafe { core::slice::from_raw_parts_mut(self.buf as *mut u8, len.min(CHUNK) as usize) }
    }

    fn header(&mut self, t: u32, sector: u64) {
        // SAFETY: the 64-byte request area belongs to this disk; nothing is in flight.
        unsafe {
            core::ptr::write_volatile(self.req as *mut u32, t);
            core::ptr::write_volatile((self.req + 4) as *mut u32, 0);
            core::ptr::write_volatile((self.req + 8) as *mut u64, sector);
            core::ptr::write_volatile((self.req + 16) as *mut u8, 0xff);
        }
    }

    fn status(&self) -> u8 {
        // SAFETY: as in `header`; the device has completed the request.
        unsafe { core::ptr::read_volatile((self.req + 16) as *const u8) }
    }

    /// Runs one request; returns (status, bytes the device reports written).
    fn run(&mut self, t: u32, sector: u64, data: Option<Seg>, clock: &Clock) -> Result<(u8, u32), Reason> {
        self.header(t, sector);
        let hdr = Seg::out(self.req, 16);
        let st = Seg::inp(self.req + 16, 1);
        let written = match data {
            Some(d) => request(&self.d.t, &mut self.d.queues[0], &[hdr, d, st], clock, TIMEOUT_MS)?,
            None => request(&self.d.t, &mut self.d.queues[0], &[hdr, st], clock, TIMEOUT_MS)?,
        };
        let s = self.status();
        if ![S_OK, S_IOERR, S_UNSUPP].contains(&s) {
            return Err(reason!("{}: request type {} returned status {:#x}", self.id, t, s));
        }
        if written == 0 {
            return Err(reason!("{}: request type {} completed with 0 bytes written (no status)", self.id, t));
        }
        Ok((s, written))
    }

    /// Reads or writes `len` bytes of the buffer at byte offset `at`.
    pub fn io(&mut self, write: bool, at: u64, len: u32, clock: &Clock) -> Result<u8, Reason> {
        let len = len.min(self.chunk);
        let data = if write { Seg::out(self.buf, len) } else { Seg::inp(self.buf, len) };
        let (s, written) = self.run(if write { T_OUT } else { T_IN }, at / SECTOR, Some(data), clock)?;
        if !write && s == S_OK && written < len + 1 {
            return Err(reason!("{}: read of {} bytes reports only {} written", self.id, len, written));
        }
        Ok(s)
    }

    fn expect_ok(&mut self, what: &str, s: u8) -> Result<(), Reason> {
        if s != S_OK {
            return Err(reason!("{}: {} failed with status {}", self.id, what, s));
        }
        Ok(())
    }

    fn serial(&mut self, clock: &Clock) -> Result<Option<StrBuf<24>>, Reason> {
        self.buf(20).fill(0);
        let (s, _) = self.run(T_GET_ID, 0, Some(Seg::inp(self.buf, 20)), clock)?;
        if s != S_OK {
            return Ok(None);
        }
        let raw = self.buf(20);
        let n = raw.iter().position(|&b| b == 0).unwrap_or(20);
        let mut out = StrBuf::new();
        let _ = write!(out, "{}", if n == 0 { "none" } else { "" });
        let _ = write!(out, "{}", Printable(&raw[..n]));
        Ok(Some(out))
    }

    fn flush(&mut self, clock: &Clock) -> Result<u8, Reason> {
        Ok(self.run(T_FLUSH, 0, None, clock)?.0)
    }

    /// DISCARD or WRITE_ZEROES of `[at, at + len)`.
    fn range_op(&mut self, t: u32, at: u64, len: u64, clock: &Clock) -> Result<u8, Reason> {
        let seg = self.req + 32;
        let sectors = u32::try_from(len / SECTOR).map_err(|_| reason!("range too long"))?;
        // SAFETY: the segment lies in this disk's request area; nothing is in flight.
        unsafe {
            core::ptr::write_volatile(seg as *mut u64, at / SECTOR);
            core::ptr::write_volatile((seg + 8) as *mut u32, sectors);
            core::ptr::write_volatile((seg + 12) as *mut u32, 0);
        }
        Ok(self.run(t, 0, Some(Seg::out(seg, 16)), clock)?.0)
    }

    /// Reads `r` and compares it with `word`.
    fn verify(&mut self, r: Region, seed: u64, word: fn(u64, u64) -> u64, clock: &Clock) -> Result<(), Reason> {
        let mut at = r.start;
        while at < r.start + r.len {
            let len = u32::try_from((r.start + r.len - at).min(u64::from(self.chunk))).unwrap_or(self.chunk);
            let s = self.io(false, at, len, clock)?;
            self.expect_ok("read", s)?;
            if let Some((o, got, want)) = mismatch(self.buf(len), at, seed, word) {
                return Err(reason!("{}: byte {:#x} reads {:#x}, want {:#x}", self.id, o, got, want));
            }
            at += u64::from(len);
        }
        Ok(())
    }

    /// Writes the probe's pattern over `r`.
    fn write_pattern(&mut self, r: Region, seed: u64, clock: &Clock) -> Result<(), Reason> {
        let mut at = r.start;
        while at < r.start + r.len {
            let len = u32::try_from((r.start + r.len - at).min(u64::from(self.chunk))).unwrap_or(self.chunk);
            fill(self.buf(len), at, seed, probe_word);
            let s = self.io(true, at, len, clock)?;
            self.expect_ok("write", s)?;
            at += u64::from(len);
        }
        Ok(())
    }
}

/// Names of the optional features negotiated, e.g. `flush,discard`.
fn feature_names(f: u64) -> StrBuf<96> {
    let mut s = StrBuf::new();
    let names = [
        (F_RO, "ro"),
        (F_BLK_SIZE, "blk_size"),
        (F_SIZE_MAX, "size_max"),
        (F_SEG_MAX, "seg_max"),
        (F_FLUSH, "flush"),
        (F_DISCARD, "discard"),
        (F_WRITE_ZEROES, "write_zeroes"),
        (F_INDIRECT_DESC, "indirect"),
        (F_EVENT_IDX, "event_idx"),
    ];
    for (_, name) in names.iter().filter(|(b, _)| f & b != 0) {
        let _ = write!(s, "{}{}", if s.as_str().is_empty() { "" } else { "," }, name);
    }
    if s.as_str().is_empty() {
        let _ = write!(s, "none");
    }
    s
}

/// The functional test of one disk; prints its `PROBE blk` line.
fn exercise(disk: &mut Disk, o: &DevOptions, clock: &Clock) -> Result<(), Reason> {
    let feats = disk.features();
    let ro = feats & F_RO != 0;
    let serial = disk.serial(clock)?;
    if disk.capacity < SECTOR {
        return Err(reason!("{}: capacity {} bytes", disk.id, disk.capacity));
    }
    let blk_size = if feats & F_BLK_SIZE != 0 { disk.d.t.config(20, 4) } else { 512 };
    let capacity = disk.capacity;
    let in_disk = move |r: Region| r.start.checked_add(r.len).is_some_and(|end| end <= capacity);

    // Reads: the host's pattern, or at least the first sector.
    let read = match o.blk_read {
        Some(r) if !in_disk(r) => return Err(reason!("{}: probe.blk_read is past the end", disk.id)),
        Some(r) => {
            disk.verify(r, o.blk_seed, host_word, clock)?;
            r.len
        }
        None => {
            let s = disk.io(false, 0, 512, clock)?;
            disk.expect_ok("read of sector 0", s)?;
            0
        }
    };

    // Past the end: a read starting at the end, and one crossing it.
    let cap = disk.capacity;
    for (at, len) in [(cap, 512u32), (cap - SECTOR, 1024)] {
        if disk.io(false, at, len, clock)? == S_OK {
            return Err(reason!("{}: a read of {} bytes at {:#x} (capacity {:#x}) succeeded", disk.id, len, at, cap));
        }
    }

    let mut line = StrBuf::<160>::new();
    if ro {
        // Must be refused, and must not change the data.
        let s = disk.io(false, 0, 512, clock)?;
        disk.expect_ok("read of sector 0", s)?;
        let mut before = [0u8; 512];
        before.copy_from_slice(disk.buf(512));
        disk.buf(512).fill(0x5a);
        // virtio 1.2, 5.2.6.2: IOERR for a write when RO is offered.
        let s = disk.io(true, 0, 512, clock)?;
        if s != S_IOERR {
            return Err(reason!("{}: a write to the read-only disk returned status {} (IOERR is 1)", disk.id, s));
        }
        let _ = write!(line, "write=refused:ioerr");
        let s = disk.io(false, 0, 512, clock)?;
        disk.expect_ok("read of sector 0", s)?;
        if disk.buf(512)[..] != before[..] {
            return Err(reason!("{}: the refused write changed sector 0", disk.id));
        }
    } else if let Some(r) = o.blk_write {
        if !in_disk(r) {
            return Err(reason!("{}: probe.blk_write is past the end", disk.id));
        }
        disk.write_pattern(r, o.blk_seed, clock)?;
        disk.verify(r, o.blk_seed, probe_word, clock)?;
        let part = Region { start: r.start, len: r.len.min(u64::from(disk.chunk)) };
        let _ = write!(line, "write={}", r.len);
        if feats & F_WRITE_ZEROES != 0 {
            let s = disk.range_op(T_WRITE_ZEROES, part.start, part.len, clock)?;
            disk.expect_ok("write-zeroes", s)?;
            disk.verify(part, 0, |_, _| 0, clock)?;
            let _ = write!(line, " write_zeroes=ok");
        } else {
            let _ = write!(line, " write_zeroes=no");
        }
        if feats & F_DISCARD != 0 {
            let s = disk.range_op(T_DISCARD, part.start, part.len, clock)?;
            disk.expect_ok("discard", s)?;
            let _ = write!(line, " discard=ok");
        } else {
            let _ = write!(line, " discard=no");
        }
        // Leave the whole region holding the probe's pattern.
        disk.write_pattern(part, o.blk_seed, clock)?;
        disk.verify(r, o.blk_seed, probe_word, clock)?;
    } else {
        let _ = write!(line, "write=skipped");
    }
    if feats & F_FLUSH != 0 {
        let s = disk.flush(clock)?;
        disk.expect_ok("flush", s)?;
        let _ = write!(line, " flush=ok");
    } else {
        let _ = write!(line, " flush=no");
    }
    match serial {
        Some(s) => emit!(
            "PROBE blk ok dev={} capacity={} serial={} ro={} blk_size={} features={} read={} {} oob=refused",
            disk.id,
            disk.capacity,
            s,
            u8::from(ro),
            blk_size,
            feature_names(feats),
            read,
            line
        ),
        None => emit!(
            "PROBE blk ok dev={} capacity={} serial=unsupported ro={} blk_size={} features={} read={} {} oob=refused",
            disk.id,
            disk.capacity,
            u8::from(ro),
            blk_size,
            feature_names(feats),
            read,
            line
        ),
    }
    Ok(())
}

pub fn check(devs: &Devs, o: &DevOptions, dma: &mut Dma, clock: &Clock) -> bool {
    let mut any = false;
    let mut ok = true;
    let mut bench_done = false;
    for f in devs.of_type(TYPE_BLOCK) {
        any = true;
        let mut disk = match Disk::open(f, o.qsize, dma, clock) {
            Ok(d) => d,
            Err(r) => {
                emit!("PROBE blk fail {}", r);
                ok = false;
                continue;
            }
        };
        if let Err(r) = exercise(&mut disk, o, clock) {
            emit!("PROBE blk fail {}", r);
            ok = false;
        }
        let usable = |b: &BlkBench| !b.mode.writes() || disk.features() & F_RO == 0;
        if let Some(b) = o.blk_bench.filter(|b| !bench_done && usable(b)) {
            bench_done = true;
            ok &= super::blkbench::run(&mut disk, &b, dma, clock);
        }
        let _ = disk.d.t.reset(clock);
    }
    if !any {
        emit!("PROBE blk fail no virtio-blk device");
    } else if o.blk_bench.is_some() && !bench_done {
        emit!("PROBE blk_bench fail no writable virtio-blk device");
        ok = false;
    }
    any && ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_offset_xor_seed_and_its_complement() {
        assert_eq!(host_word(0x1000, 0xff), 0x10ff);
        assert_eq!(probe_word(0x1000, 0xff), !0x10ff);
        let mut buf = [0u8; 32];
        fill(&mut buf, 0x200, 7, host_word);
        assert_eq!(&buf[8..16], &(0x208u64 ^ 7).to_le_bytes());
        assert_eq!(mismatch(&buf, 0x200, 7, host_word), None);
        buf[17] ^= 1;
        assert_eq!(mismatch(&buf, 0x200, 7, host_word), Some((0x210, (0x210 ^ 7) ^ 0x100, 0x210 ^ 7)));
        assert!(mismatch(&buf, 0x200, 7, probe_word).is_some());
    }

    #[test]
    fn feature_names_list_what_was_negotiated() {
        assert_eq!(feature_names(F_FLUSH | F_DISCARD).as_str(), "flush,discard");
        assert_eq!(feature_names(0).as_str(), "none");
    }
}
