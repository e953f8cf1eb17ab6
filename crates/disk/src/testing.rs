//! The workload run on untrusted images by the fuzz target (fuzz/fuzz_targets/qcow2_open.rs)
//! and by the deterministic hostile-image test (tests/hostile.rs), so that both drive the
//! same header, metadata and open paths.
//!
//! Errors are expected and ignored; what matters is that nothing panics, hangs, or
//! allocates by a number the file claims. The work is bounded whatever the image says.

use std::path::Path;

use crate::qcow2::RepairMode;
use crate::{BlockDevice, OpenOptions, Qcow2Image};

/// At most this many bytes are read from any image or snapshot.
const MAX_READ: u64 = 1 << 20;
/// At most this many extents are asked for.
const MAX_EXTENTS: usize = 64;

/// Opens the image at `path` read-only and read-write (repairing it if it is dirty) and does
/// what a consumer would: reads, block status, check, snapshots, LUKS header, writes,
/// zeroing, discard, a compressed write, snapshot create/apply/delete, check with repair,
/// flush. Backing files are not opened (their names come from the image).
pub fn exercise_image(path: &Path) {
    let ro = OpenOptions {
        read_only: true,
        no_backing: true,
        allow_corrupt: true,
        ..OpenOptions::default()
    };
    if let Ok(q) = Qcow2Image::open(path, &ro) {
        read_side(&q);
    }
    let rw = OpenOptions {
        no_backing: true,
        // Syncs decide nothing here and would slow fuzzing down tenfold.
        no_sync: true,
        ..OpenOptions::default()
    };
    if let Ok(q) = Qcow2Image::open(path, &rw) {
        write_side(&q);
    }
}

fn read_side(q: &Qcow2Image) {
    let size = q.size();
    let n = size.min(MAX_READ);
    let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
    let _ = q.read_at(0, &mut buf);
    // An unaligned read that crosses clusters near the end.
    if size > 5000 {
        let mut b = vec![0u8; 3000];
        let _ = q.read_at(size - 4000, &mut b);
    }
    let mut pos = 0;
    for _ in 0..MAX_EXTENTS {
        if pos >= size {
            break;
        }
        match q.block_status(pos, size - pos) {
            Ok(e) => pos += e.len.max(1),
            Err(_) => break,
        }
    }
    let _ = q.check(RepairMode::None);
    let _ = q.luks_header();
    let _ = q.info();
    for s in q.snapshots() {
        let len = s.disk_size.min(4096);
        let mut b = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let _ = q.read_snapshot(&s.id, 0, &mut b);
    }
}

fn write_side(q: &Qcow2Image) {
    let size = q.size();
    if size >= 8192 {
        let _ = q.write_at(size / 2, &[0x5a; 4096]);
        let _ = q.write_at(1, &[0xa5; 3000]);
        let _ = q.write_zeroes(0, 4096.min(size), false);
        let _ = q.discard(0, size.min(1 << 16));
        let cs = q.cluster_size();
        if cs <= size && cs <= 1 << 16 {
            let data = vec![7u8; usize::try_from(cs).unwrap_or(0)];
            let _ = q.write_compressed(size / cs / 2 * cs, &data);
        }
    }
    if q.snapshot_create("fuzz").is_ok() {
        if size >= 4096 {
            let _ = q.write_at(0, &[0x77; 4096]);
        }
        let _ = q.snapshot_apply("fuzz");
        let _ = q.snapshot_delete("fuzz");
    }
    let _ = q.check(RepairMode::All);
    let _ = q.flush();
}
