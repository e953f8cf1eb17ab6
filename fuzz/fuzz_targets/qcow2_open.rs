//! Fuzzes the qcow2 header, metadata and open path, then reads, writes, snapshots and checks
//! whatever opened: `kiln_disk::testing::exercise_image`, the same workload that
//! crates/disk/tests/hostile.rs replays on its corpus.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run qcow2_open`. On stable: fuzz/run-stable.sh
//! (coverage-guided, without AddressSanitizer). Run as `qcow2_open FILE...` it replays inputs.

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-fuzz-{}.qcow2", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    kiln_disk::testing::exercise_image(&path);
    let _ = std::fs::remove_file(&path);
});
