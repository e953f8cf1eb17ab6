//! Fuzzes the virtio-net queues: receive, transmit and control chains (direct, indirect,
//! looping, out of RAM), virtio-net headers, control commands, ring indices and queue sizes,
//! with frames of fuzzer-chosen sizes waiting in the "tap", served by the device's own
//! queue-pair thread code (`kiln_virtio::net::fuzzing::pass`, input format in its
//! documentation). The property: no panic, no hang, and never more used chains than the
//! device took from the available ring, on any queue.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run virtio_net_queues`. On stable:
//! `fuzz/run-stable.sh virtio_net_queues`. Run as `virtio_net_queues FILE...` it replays
//! inputs.

#![no_main]

use kiln_virtio::net::fuzzing::pass;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = pass(data);
    for q in 0..3 {
        assert!(
            out.used[q] <= out.taken[q],
            "queue {q}: the device used more chains than it took: {out:?}"
        );
    }
});
