#!/usr/bin/env bash
# Coverage-guided fuzzing of the qcow2 open path on a stable toolchain: builds the
# qcow2_open target with LLVM's SanitizerCoverage (the instrumentation cargo-fuzz adds,
# minus AddressSanitizer, which needs nightly) and runs libFuzzer on a working corpus
# (fuzz/corpus/qcow2_open, kept between runs, not committed) seeded with the corpus that
# crates/disk/tests/hostile.rs replays (crates/disk/tests/corpus/qcow2).
#
# Crashes, hangs and runaway memory land in fuzz/artifacts/. Reproduce one with
#   cargo run --example replay -p kiln-disk -- fuzz/artifacts/<file>
# fix it, and add the input to crates/disk/tests/corpus/qcow2/found-<what>.qcow2 so that
# the test suite replays it (with mutations) from then on: that is how the test's corpus
# grows.
#
#   fuzz/run-stable.sh [SECONDS] [extra libFuzzer flags...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-300}
shift || true
seeds=$root/crates/disk/tests/corpus/qcow2
work=$root/fuzz/corpus/qcow2_open
mkdir -p "$work"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-fuzz}
# (RUSTFLAGS replaces the repository's crt-static setting: libFuzzer wants a normal binary.)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --manifest-path "$root/fuzz/Cargo.toml" --bin qcow2_open
bin=$(find "$CARGO_TARGET_DIR" -path '*release/qcow2_open' -type f | head -1)
mkdir -p "$root/fuzz/artifacts"
set +e
"$bin" "$work" "$seeds" -max_total_time="$secs" -max_len=262144 -timeout=20 \
  -rss_limit_mb=2048 -artifact_prefix="$root/fuzz/artifacts/" -print_final_stats=1 "$@"
rc=$?
set -e
echo "working corpus: $(ls "$work" | wc -l) inputs in $work"
ls "$root/fuzz/artifacts" | sed 's/^/artifact: /'
exit $rc
