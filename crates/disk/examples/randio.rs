//! Random 4 KiB reads and writes through the `BlockDevice` trait, qcow2 against raw, for the
//! benchmark in bench/img:
//!
//!     randio RAW_IMAGE QCOW2_IMAGE SECONDS [THREADS...]
//!
//! prints one line per thread count and operation:
//! `threads N read|write raw IOPS qcow2 IOPS`.
//!
//! Fairness, because the page cache decides most of the numbers here:
//! * both images are first filled completely with the same data through the library, so
//!   every guest block is allocated (raw: written file blocks; qcow2: allocated clusters,
//!   writes go in place) and the metadata is cached: what remains is the per-request cost;
//! * both files are then synced, dropped from the page cache and read back in full with
//!   readahead off, so both are cached in 4 KiB folios (see `warm`: folio sizes change the
//!   cost of a 4 KiB write by several times, and would otherwise follow the file layout);
//! * the measurement alternates short rounds of raw and qcow2 with the same offsets and
//!   takes the median per side, so load from other processes hits both alike;
//! * buffers are page aligned, as a VMM's guest memory is.

// Benchmark code works on small, known sizes; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_disk::{open, BlockDevice, OpenOptions};

const BLOCK: usize = 4096;
const ROUNDS: usize = 7;

/// A page-aligned buffer (a slice into a slightly larger vector).
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let storage = vec![fill; len + 4096];
        let start = storage.as_ptr().align_offset(4096).min(4096);
        Aligned {
            storage,
            start,
            len,
        }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Writes every byte of the device with the same pseudo-random data, then syncs.
fn fill(dev: &dyn BlockDevice) {
    let mut buf = Aligned::new(1 << 20, 0);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in buf.get().chunks_exact_mut(8) {
        w.copy_from_slice(&xorshift(&mut x).to_le_bytes());
    }
    let size = dev.size();
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(1 << 20) as usize;
        let b = buf.get();
        b[..8].copy_from_slice(&off.to_le_bytes());
        dev.write_at(off, &b[..n]).expect("fill write");
        off += n as u64;
    }
    dev.flush().expect("flush");
}

/// Syncs the file and drops its pages from the page cache.
fn evict(path: &Path) {
    let f = std::fs::File::open(path).expect("open for evict");
    f.sync_all().expect("sync");
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is valid while `f`
    // lives.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// Reads the whole file back into the page cache in small pages: with readahead off
/// (POSIX_FADV_RANDOM) the kernel caches it in 4 KiB folios whatever the file's layout,
/// where sequential reads would build large folios only where the file offsets are aligned
/// for them (everywhere in a raw file, within 64 KiB clusters in a qcow2), and a 4 KiB write
/// into a large folio costs several times more.
fn warm(path: &Path) {
    let f = std::fs::File::open(path).expect("open for warm-up");
    // SAFETY: as in `evict`.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(rc, 0, "posix_fadvise");
    let mut buf = Aligned::new(1 << 20, 0);
    let mut off = 0u64;
    loop {
        let n = std::os::unix::fs::FileExt::read_at(&f, buf.get(), off).expect("warm-up read");
        if n == 0 {
            break;
        }
        off += n as u64;
    }
}

/// IOPS of `threads` threads doing random 4 KiB reads or writes for `secs`.
fn round(dev: &Arc<dyn BlockDevice>, write: bool, threads: usize, secs: f64, seed: u64) -> f64 {
    let blocks = dev.size() / BLOCK as u64;
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let dev = dev.clone();
                s.spawn(move || {
                    let mut x = seed ^ ((t as u64 + 1) * 0x2545_f491_4f6c_dd1d);
                    let mut buf = Aligned::new(BLOCK, 0x5a);
                    let mut n = 0u64;
                    while start.elapsed() < Duration::from_secs_f64(secs) {
                        for _ in 0..64 {
                            let off = (xorshift(&mut x) % blocks) * BLOCK as u64;
                            if write {
                                dev.write_at(off, buf.get()).expect("write");
                            } else {
                                dev.read_at(off, buf.get()).expect("read");
                            }
                        }
                        n += 64;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker")).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: randio RAW_IMAGE QCOW2_IMAGE SECONDS [THREADS...]");
        std::process::exit(2);
    }
    let secs: f64 = args[3].parse().unwrap_or(5.0);
    let mut thread_counts: Vec<usize> = args[4..].iter().filter_map(|a| a.parse().ok()).collect();
    if thread_counts.is_empty() {
        thread_counts.push(1);
    }
    let paths = [Path::new(&args[1]), Path::new(&args[2])];
    let mut devs: Vec<Arc<dyn BlockDevice>> = Vec::new();
    for p in paths {
        let dev = open(p, &OpenOptions::default()).unwrap_or_else(|e| {
            eprintln!("randio: {}: {e}", p.display());
            std::process::exit(1);
        });
        fill(dev.as_ref());
        devs.push(dev);
    }
    for p in paths {
        evict(p);
        warm(p);
    }
    // Each round runs raw then qcow2 (same seed), alternating the order.
    let per_round = secs / ROUNDS as f64 / 2.0;
    for &threads in &thread_counts {
        for write in [false, true] {
            let mut iops = [Vec::new(), Vec::new()];
            for r in 0..ROUNDS {
                let seed = 0x1234_5678 + r as u64;
                let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    iops[i].push(round(&devs[i], write, threads, per_round, seed));
                }
            }
            let [raw, qcow2] = iops.map(median);
            let op = if write { "write" } else { "read" };
            println!("threads {threads} {op} raw {raw:.0} qcow2 {qcow2:.0}");
        }
    }
    for dev in &devs {
        dev.flush().expect("flush");
    }
}
