//! Fuzzes the virtio-blk request path: descriptor chains (direct, indirect, looping, out of
//! RAM), request headers, data and status buffers, ring indices and ring placement, served by
//! the device's own I/O-thread code (`kiln_virtio::block::fuzzing::Fuzzer::pass`, input format
//! in its documentation) against a 1 MiB raw image. The property: no panic, no hang, and never
//! more completions than chains the device took from the available ring.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run virtio_blk_queue`. On stable:
//! `fuzz/run-stable.sh virtio_blk_queue`. Run as `virtio_blk_queue FILE...` it replays inputs.

#![no_main]

use std::cell::RefCell;

use kiln_virtio::block::fuzzing::Fuzzer;
use kiln_virtio::block::{Block, BlockParams};
use libfuzzer_sys::fuzz_target;

fn device() -> Fuzzer {
    let path = std::env::temp_dir().join(format!("kiln-fuzz-blk-{}.raw", std::process::id()));
    let f = std::fs::File::create(&path).expect("cannot create the fuzzing disk image");
    f.set_len(1 << 20)
        .expect("cannot size the fuzzing disk image");
    let dev = Block::new(BlockParams::new(&path)).expect("cannot open the fuzzing disk image");
    // The device keeps the image open; nothing is left behind.
    let _ = std::fs::remove_file(&path);
    Fuzzer::new(dev)
}

thread_local! {
    static DEV: RefCell<Fuzzer> = RefCell::new(device());
}

fuzz_target!(|data: &[u8]| {
    let out = DEV.with(|d| d.borrow_mut().pass(data));
    assert!(
        out.completed <= u64::from(out.taken),
        "the device completed more requests than it took: {out:?}"
    );
});
