//! Crash safety: a child process writes to an image through the library and is killed with
//! SIGKILL at a random moment; `qemu-img check` must then find no corruption (leaks are
//! allowed), and every write acknowledged by a flush before the kill must still be there.
//! A write in flight at the kill may be cut short, at sector granularity, never more.
//!
//! The child is this test binary re-run with `KILN_CRASH_CHILD` set.

// Test code works on small, known sizes; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use kiln_disk::qcow2::{CompressionType, CreateOptions};
use kiln_disk::{BlockDevice, OpenOptions, Qcow2Image};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 2048; // 8 MiB disk

fn block_data(block: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, c) in v.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&block.to_le_bytes());
        c[8..].copy_from_slice(&(seq ^ i as u64).to_le_bytes());
    }
    v
}

/// Bytes that a write in flight at the kill is still all-or-nothing for: one sector.
const SECTOR: usize = 512;

/// Decodes a block written by `block_data` sector by sector: for each sector, Some(seq), or
/// None if never written (zeroes).
///
/// A write in flight when the child is killed may be cut short: Linux copies a write into the
/// page cache page by page and gives up at a fatal signal, and a block may also go out as
/// several writes (512-byte clusters that are not contiguous on the host). So the sectors of
/// one block may hold different versions of it; but each must be a whole sector of some
/// version of this very block, or zeroes.
fn decode(block: u64, data: &[u8]) -> Result<Vec<Option<u64>>, String> {
    data.chunks(SECTOR)
        .enumerate()
        .map(|(k, sector)| {
            if sector.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            // Chunk i of the block holds seq ^ i; sector k starts at chunk k * SECTOR / 16.
            let first = (k * SECTOR / 16) as u64;
            let seq = u64::from_le_bytes(sector[8..16].try_into().unwrap()) ^ first;
            if sector != &block_data(block, seq)[k * SECTOR..(k + 1) * SECTOR] {
                return Err(format!(
                    "block {block} sector {k} holds torn or foreign data"
                ));
            }
            Ok(Some(seq))
        })
        .collect()
}

#[test]
fn decode_takes_sectors_of_this_block_only() {
    let (old, new) = (block_data(7, 3), block_data(7, 9));
    assert_eq!(decode(7, &new), Ok(vec![Some(9); BLOCK / SECTOR]));
    assert_eq!(decode(7, &[0u8; BLOCK]), Ok(vec![None; BLOCK / SECTOR]));
    // A write cut short at a page boundary 512 bytes into the block.
    let mut cut = old.clone();
    cut[..SECTOR].copy_from_slice(&new[..SECTOR]);
    let mut want = vec![Some(3); BLOCK / SECTOR];
    want[0] = Some(9);
    assert_eq!(decode(7, &cut), Ok(want));
    // Another block's data, or a sector torn inside, is garbage.
    assert!(decode(7, &block_data(8, 3)).is_err());
    let mut torn = old;
    torn[SECTOR / 2..SECTOR].copy_from_slice(&new[SECTOR / 2..SECTOR]);
    assert!(decode(7, &torn).is_err());
}

/// The child: random writes, discards, compressed writes and snapshots, flushing now and
/// then and logging what each flush made durable. In "threads" mode two threads do this at
/// once on separate halves of the disk, each logging what its own flushes made durable.
fn child(img: &Path, log: &Path, seed: u64, mode: &str) {
    let q = Qcow2Image::open(img, &OpenOptions::default()).unwrap();
    let logf = Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap(),
    );
    if mode == "threads" {
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (q, logf) = (&q, &logf);
                let half = BLOCKS / 2;
                s.spawn(move || child_loop(q, logf, seed ^ (t + 1), mode, t * half, half));
            }
        });
    } else {
        child_loop(&q, &logf, seed, mode, 0, BLOCKS);
    }
}

fn child_loop(q: &Qcow2Image, logf: &Mutex<File>, seed: u64, mode: &str, first: u64, blocks: u64) {
    let log = |lines: &[String], sync: bool| {
        let mut f = logf.lock().unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
        if sync {
            f.sync_data().unwrap();
        }
    };
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut pending: Vec<(u64, u64)> = Vec::new();
    // Threads write disjoint blocks, so per block the sequence numbers still only grow.
    for seq in 1.. {
        let r = rnd();
        let block = first + r % blocks;
        match (r >> 32) % 16 {
            0 if mode == "snap" => {
                let _ = q.snapshot_create(&format!("s{seq}"));
            }
            1 => {
                // A discard may reach the disk before the next flush: log the intent first.
                let start = (block / 16) * 16;
                let lines: Vec<String> = (start..start + 16)
                    .map(|b| format!("{b} discard {seq}"))
                    .collect();
                log(&lines, false);
                q.discard(start * BLOCK as u64, 16 * BLOCK as u64).unwrap();
            }
            2 if mode == "compressed" => {
                let cl = 65536 / BLOCK as u64;
                let start = (block / cl) * cl;
                let mut data = Vec::new();
                let mut lines = Vec::new();
                for b in start..start + cl {
                    lines.push(format!("{b} discard {seq}"));
                    data.extend_from_slice(&block_data(b, seq));
                    pending.push((b, seq));
                }
                log(&lines, false);
                // Compressed writes need an unallocated cluster: discard first.
                q.discard(start * BLOCK as u64, 65536).unwrap();
                if q.write_compressed(start * BLOCK as u64, &data).is_err() {
                    q.write_at(start * BLOCK as u64, &data).unwrap();
                }
            }
            3 | 4 => {
                q.flush().unwrap();
                let lines: Vec<String> = pending
                    .drain(..)
                    .map(|(b, s)| format!("{b} durable {s}"))
                    .collect();
                log(&lines, true);
            }
            _ => {
                q.write_at(block * BLOCK as u64, &block_data(block, seq))
                    .unwrap();
                pending.push((block, seq));
            }
        }
    }
}

#[test]
fn crash_child() {
    // Runs only as the child of `killed_writers_leave_consistent_images`.
    let Ok(spec) = std::env::var("KILN_CRASH_CHILD") else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    child(
        Path::new(parts[0]),
        Path::new(parts[1]),
        parts[2].parse().unwrap(),
        parts[3],
    );
}

/// Fails the test loudly when qemu-img is missing: interop tests never pass by skipping.
fn require_qemu() {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "these interop tests need qemu-img (Debian package qemu-utils: apt-get install qemu-utils); they do not skip");
}

#[test]
fn killed_writers_leave_consistent_images() {
    require_qemu();
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let modes = [
        ("plain", CreateOptions::default()),
        (
            "lazy",
            CreateOptions {
                lazy_refcounts: true,
                ..CreateOptions::default()
            },
        ),
        (
            "extl2",
            CreateOptions {
                extended_l2: true,
                ..CreateOptions::default()
            },
        ),
        (
            "compressed",
            CreateOptions {
                compression: CompressionType::Zstd,
                ..CreateOptions::default()
            },
        ),
        (
            "small",
            CreateOptions {
                cluster_size: 512,
                refcount_bits: 2,
                ..CreateOptions::default()
            },
        ),
        ("snap", CreateOptions::default()),
        ("threads", CreateOptions::default()),
    ];
    let mut seed = 0x1234_5678_9abc_def1u64;
    for round in 0..4 {
        for (mode, opts) in &modes {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let img = dir.path().join(format!("{mode}{round}.qcow2"));
            let log = dir.path().join(format!("{mode}{round}.log"));
            Qcow2Image::create(
                &img,
                &CreateOptions {
                    size: BLOCKS * BLOCK as u64,
                    ..opts.clone()
                },
            )
            .unwrap();
            let mut c = Command::new(&exe)
                .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
                .env(
                    "KILN_CRASH_CHILD",
                    format!("{}|{}|{seed}|{mode}", img.display(), log.display()),
                )
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(30 + (seed >> 40) % 400));
            c.kill().unwrap();
            c.wait().unwrap();
            // qemu-img check: 0 = clean, 3 = leaks only; 2 = corruption.
            let out = Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&img)
                .output()
                .unwrap();
            let code = out.status.code();
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            // Snapshot operations have an unavoidable window (refcounts and COPIED flags live
            // in different clusters); they run with the dirty bit set so a read-write open
            // repairs them. Nothing else may be wrong.
            let snapshot_window = *mode == "snap"
                && code == Some(2)
                && text
                    .lines()
                    .filter(|l| l.starts_with("ERROR"))
                    .all(|l| l.starts_with("ERROR OFLAG_COPIED"))
                && Qcow2Image::open(
                    &img,
                    &OpenOptions {
                        read_only: true,
                        ..OpenOptions::default()
                    },
                )
                .unwrap()
                .info()
                .dirty;
            assert!(
                code == Some(0) || code == Some(3) || snapshot_window,
                "{mode} round {round}: qemu-img check exit {code:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // Every flushed write is still there (or was overwritten by a later one).
            let mut last = std::collections::HashMap::new();
            let mut discarded = std::collections::HashMap::new();
            for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
                let mut it = line.split(' ');
                let (Some(b), Some(kind), Some(s)) = (it.next(), it.next(), it.next()) else {
                    continue; // the last line may be cut short by the kill
                };
                let (Ok(b), Ok(s)) = (b.parse::<u64>(), s.parse::<u64>()) else {
                    continue;
                };
                if kind == "durable" {
                    last.insert(b, s);
                } else {
                    discarded.insert(b, s);
                }
            }
            let q = Qcow2Image::open(
                &img,
                &OpenOptions {
                    read_only: true,
                    ..OpenOptions::default()
                },
            )
            .unwrap();
            let mut buf = vec![0u8; BLOCK];
            let mut mixed = Vec::new();
            for (&b, &s) in &last {
                q.read_at(b * BLOCK as u64, &mut buf).unwrap();
                let got = decode(b, &buf).unwrap_or_else(|e| panic!("{mode} round {round}: {e}"));
                // Zeroes are fine only if a discard was issued after the durable write.
                let zero_ok = discarded.get(&b).is_some_and(|&d| d > s);
                assert!(
                    got.iter()
                        .all(|g| g.is_some_and(|g| g >= s) || (g.is_none() && zero_ok)),
                    "{mode} round {round}: block {b} lost flushed write {s}, holds {got:?}"
                );
                if got.windows(2).any(|w| w[0] != w[1]) {
                    mixed.push((b, got));
                }
            }
            // Blocks are written whole and discarded 16 at a time, so a block's clusters are
            // mapped all or none and only a write cut short by the kill can leave a block
            // mixed: at most one per writing thread.
            let writers = if *mode == "threads" { 2 } else { 1 };
            assert!(
                mixed.len() <= writers,
                "{mode} round {round}: {} blocks mix versions: {mixed:?}",
                mixed.len()
            );
            drop(q);
            // Opening read-write repairs a dirty (lazy) image; the result is clean.
            drop(Qcow2Image::open(&img, &OpenOptions::default()).unwrap());
            let out = Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&img)
                .output()
                .unwrap();
            assert!(
                matches!(out.status.code(), Some(0) | Some(3)),
                "{mode}: after reopen"
            );
        }
    }
}
