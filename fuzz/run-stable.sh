#!/usr/bin/env bash
# Coverage-guided fuzzing on a stable toolchain: builds a target with LLVM's
# SanitizerCoverage (the instrumentation cargo-fuzz adds, minus AddressSanitizer, which needs
# nightly) and runs libFuzzer on a working corpus (fuzz/corpus/TARGET, kept between runs,
# not committed) seeded from the repository:
#
#   qcow2_open        the qcow2 open path; seeds: the corpus crates/disk/tests/hostile.rs
#                     replays (crates/disk/tests/corpus/qcow2)
#   virtio_blk_queue  the virtio-blk request path (descriptor chains, headers, ring indices);
#                     seeds: fuzz/seeds/virtio_blk_queue
#   virtio_net_queues the virtio-net receive, transmit and control queues (chains, headers,
#                     commands, frame sizes); seeds: fuzz/seeds/virtio_net_queues (the
#                     committed seed is kiln_virtio::net::fuzzing::example_input(), which a
#                     unit test checks)
#
# Crashes, hangs and runaway memory land in fuzz/artifacts/. Reproduce one by running the
# target's binary on the file (or, for qcow2, `cargo run --example replay -p kiln-disk --
# fuzz/artifacts/<file>`), fix it, and keep the input: qcow2 inputs go to
# crates/disk/tests/corpus/qcow2/found-<what>.qcow2, which the test suite replays (with
# mutations) from then on; virtio inputs go to fuzz/seeds/<target>/found-<what> and become a
# unit test beside the device.
#
#   fuzz/run-stable.sh [TARGET] [SECONDS] [extra libFuzzer flags...]   (default qcow2_open, 300 s)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=qcow2_open
case ${1:-} in
  qcow2_open|virtio_blk_queue|virtio_net_queues) target=$1; shift ;;
  ''|[0-9]*) ;;
  *) echo "unknown fuzz target ${1}: expected qcow2_open, virtio_blk_queue or virtio_net_queues" >&2; exit 2 ;;
esac
secs=${1:-300}
shift || true
case $target in
  qcow2_open) seeds=$root/crates/disk/tests/corpus/qcow2 ;;
  *) seeds=$root/fuzz/seeds/$target ;;
esac
work=$root/fuzz/corpus/$target
mkdir -p "$work"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-fuzz}
# (RUSTFLAGS replaces the repository's crt-static setting: libFuzzer wants a normal binary.)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --manifest-path "$root/fuzz/Cargo.toml" --bin "$target"
bin=$(find "$CARGO_TARGET_DIR" -path "*release/$target" -type f | head -1)
mkdir -p "$root/fuzz/artifacts"
set +e
"$bin" "$work" "$seeds" -max_total_time="$secs" -max_len=262144 -timeout=20 \
  -rss_limit_mb=2048 -artifact_prefix="$root/fuzz/artifacts/" -print_final_stats=1 "$@"
rc=$?
set -e
echo "working corpus: $(ls "$work" | wc -l) inputs in $work"
ls "$root/fuzz/artifacts" | sed 's/^/artifact: /'
exit $rc
