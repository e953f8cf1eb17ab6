//! Fuzzes the qcow2 header, metadata and open path, then reads, writes and checks whatever
//! opened. Run with `cargo fuzz run qcow2_open` (nightly); it also builds on stable as a
//! plain libFuzzer binary without coverage instrumentation.

#![no_main]

use std::path::PathBuf;

use kiln_disk::qcow2::RepairMode;
use kiln_disk::{BlockDevice, OpenOptions, Qcow2Image};
use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-fuzz-{}.qcow2", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
    if let Ok(q) = Qcow2Image::open(&path, &ro) {
        let n = q.size().min(256 << 10);
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
        let _ = q.read_at(0, &mut buf);
        if q.size() > 0 {
            let _ = q.block_status(0, q.size());
        }
        let _ = q.check(RepairMode::None);
    }
    if let Ok(q) = Qcow2Image::open(&path, &OpenOptions::default()) {
        if q.size() >= 8192 {
            let _ = q.write_at(q.size() / 2, &[0x5a; 4096]);
            let _ = q.discard(0, 65536.min(q.size()));
        }
        let _ = q.check(RepairMode::All);
    }
    let _ = std::fs::remove_file(&path);
});
