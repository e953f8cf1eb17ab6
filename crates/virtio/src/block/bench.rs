//! A microbenchmark of the block path without a guest: a polling "driver" thread keeps N
//! requests in flight on a queue in guest memory (like the probe's ring-3 driver), the device
//! serves them through its I/O thread and engine. Run with
//! `cargo test --release -p kiln-virtio block::bench -- --ignored --nocapture`
//! (`KILN_BENCH_DIRECT=1` for O_DIRECT; `KILN_BENCH_FILE=path` to use an existing file).

// Benchmark sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kiln_devices::virtio::{Activation, VirtioDevice};
use kiln_disk::aio::EngineKind;
use virtio_bindings::virtio_blk as vb;
use vm_memory::{Bytes, GuestAddress};

use super::{Block, BlockParams};
use crate::testing::{guest_memory, TestDriver, TestInterrupt};

struct Result {
    iops: f64,
    kicks: u64,
    wakeups: u64,
}

/// How one run drives the disk.
#[derive(Clone, Copy)]
struct Load {
    engine: EngineKind,
    /// O_DIRECT.
    direct: bool,
    write: bool,
    /// Request size in bytes.
    bs: u32,
    /// Requests kept in flight.
    depth: u16,
    poll_us: u32,
    secs: f64,
}

/// Keeps `depth` requests of `bs` bytes in flight for `secs`, random offsets over the file.
fn run(path: &std::path::Path, load: Load) -> Result {
    let Load {
        engine,
        direct,
        write,
        bs,
        depth,
        poll_us,
        secs,
    } = load;
    let mut params = BlockParams::new(path);
    params.engine = engine;
    params.poll_us = Some(poll_us);
    params.direct = direct;
    let mut dev = Block::new(params).unwrap();
    let sectors = dev.config().capacity;
    let stats = dev.stats();
    let mem = guest_memory(512 << 20);
    let mut drv = TestDriver::new(&mem, 0, 256);
    let irq = TestInterrupt::new();
    let f = dev.features();
    dev.activate(Activation {
        mem: mem.clone(),
        features: f,
        queues: vec![drv.active(0)],
        interrupt: irq.clone(),
    })
    .unwrap();
    // Slot i: descriptors 3i (header), 3i+1 (data), 3i+2 (status).
    let kind = if write {
        vb::VIRTIO_BLK_T_OUT
    } else {
        vb::VIRTIO_BLK_T_IN
    };
    let mut headers = Vec::new();
    for i in 0..depth {
        let h = drv.alloc(16);
        let d = drv.alloc(u64::from(bs) + 4096);
        let d = GuestAddress(d.0.div_ceil(4096) * 4096);
        let s = drv.alloc(1);
        mem.write_obj(kind.to_le(), h).unwrap();
        let data_flags = if write { 1 } else { 3 };
        drv.write_desc(3 * i, h.0, 16, 1, 3 * i + 1);
        drv.write_desc(3 * i + 1, d.0, bs, data_flags, 3 * i + 2);
        drv.write_desc(3 * i + 2, s.0, 1, 2, 0);
        headers.push(h);
    }
    let mut rng = 0x1234_5678_9abc_def0u64;
    let blocks = sectors / u64::from(bs / 512);
    let mut next_sector = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * u64::from(bs / 512)
    };
    let mut old_idx = 0u16;
    let mut new_idx = 0u16;
    let mut kicks = 0u64;
    let mut kick_if_needed = |drv: &TestDriver, old: u16, new: u16| {
        // EVENT_IDX rule (vring_need_event).
        let ev = drv.avail_event();
        if new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old) {
            drv.kick();
            kicks += 1;
        }
    };
    for i in 0..depth {
        mem.write_obj(
            next_sector().to_le(),
            headers[usize::from(i)].unchecked_add(8),
        )
        .unwrap();
        drv.publish(3 * i);
        new_idx = new_idx.wrapping_add(1);
    }
    kick_if_needed(&drv, old_idx, new_idx);
    old_idx = new_idx;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut done = 0u64;
    while Instant::now() < deadline {
        let mut any = false;
        while let Some((id, _)) = drv.next_used() {
            any = true;
            done += 1;
            let slot = (id / 3) as usize;
            assert!(slot < headers.len(), "bad used id {id}");
            mem.write_obj(next_sector().to_le(), headers[slot].unchecked_add(8))
                .unwrap();
            drv.publish(id as u16);
            new_idx = new_idx.wrapping_add(1);
        }
        if any {
            kick_if_needed(&drv, old_idx, new_idx);
            old_idx = new_idx;
        } else {
            std::hint::spin_loop();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    dev.reset().unwrap();
    Result {
        iops: done as f64 / elapsed,
        kicks,
        wakeups: stats.wakeups.load(Ordering::Relaxed),
    }
}

use vm_memory::Address;

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn block_worker_bench() {
    let secs = 2.0;
    let dir = tempfile::tempdir().unwrap();
    let path = std::env::var("KILN_BENCH_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            let p = dir.path().join("bench.raw");
            // Written and synced, so reads come from the page cache rather than holes and
            // writes do not wait for the initial writeback.
            std::fs::write(&p, vec![0x5au8; 256 << 20]).unwrap();
            std::fs::File::open(&p).unwrap().sync_all().unwrap();
            p
        });
    let direct = std::env::var("KILN_BENCH_DIRECT").is_ok();
    for (name, engine) in [
        ("io_uring", EngineKind::IoUring),
        ("threads", EngineKind::Threads(2)),
        ("sync", EngineKind::Sync),
    ] {
        for write in [false, true] {
            for poll in [0, 50] {
                let load = Load {
                    engine,
                    direct,
                    write,
                    bs: 4096,
                    depth: 32,
                    poll_us: poll,
                    secs,
                };
                let r = run(&path, load);
                println!(
                    "{name:9} {} 4k qd32 poll={poll:3}us: {:9.0} IOPS  kicks/s {:8.0}  wakeups/s {:8.0}",
                    if write { "randwrite" } else { "randread " },
                    r.iops,
                    r.kicks as f64 / secs,
                    r.wakeups as f64 / secs
                );
            }
        }
    }
}

/// While the disk has requests in flight, a polling queue takes the driver's next requests
/// and the disk's completions without being notified or woken: the driver, which follows the
/// EVENT_IDX rule, hardly ever kicks. Without polling it kicks after most completions.
/// O_DIRECT reads through io_uring on a file under /var/tmp keep requests at the disk for
/// tens of microseconds each, with no thread of ours doing the waiting.
#[test]
fn polling_while_requests_are_in_flight_spares_the_driver_its_kicks() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("poll.raw");
    std::fs::write(&path, vec![0x5au8; 16 << 20]).unwrap();
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    let load = Load {
        engine: EngineKind::IoUring,
        direct: true,
        write: false,
        bs: 4096,
        depth: 8,
        poll_us: 0,
        secs: 0.3,
    };
    // Other tests share this machine's cores, and a poller kept off its core long enough
    // stops polling: the best of three tries counts.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let quiet = run(&path, load);
        let polled = run(
            &path,
            Load {
                poll_us: 1000,
                ..load
            },
        );
        assert!(quiet.iops > 0.0 && polled.iops > 0.0);
        if quiet.kicks >= 100 && polled.kicks * 4 < quiet.kicks {
            return;
        }
        seen.push((polled.kicks, quiet.kicks));
    }
    panic!("polling should spare 3/4 of the kicks; (with, without) polling: {seen:?}");
}
