#!/usr/bin/env bash
# Regenerates the seed images of the qcow2 corpus (crates/disk/tests/corpus/qcow2/seed-*):
# small images (512 B to 16 KiB clusters) made by qemu-img/qemu-io and by kiln img, covering
# the format's features. The corpus is replayed by crates/disk/tests/hostile.rs and seeds
# fuzz/run-stable.sh; files that fuzzing adds (fuzz-*) are kept when this is re-run.
#
#   fuzz/make-seeds.sh PATH_TO_KILN_IMG
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kiln=${1:?usage: make-seeds.sh PATH_TO_KILN_IMG}
out=$root/crates/disk/tests/corpus/qcow2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
rm -f "$out"/seed-*

q() { # name create-options size [qemu-io commands...]
  local name=$1 opts=$2 size=$3
  shift 3
  qemu-img create -q -u -f qcow2 ${opts:+-o "$opts"} "$name.qcow2" "$size"
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  if [ ${#args[@]} -gt 0 ]; then qemu-io -f qcow2 "${args[@]}" "$name.qcow2" >/dev/null || true; fi
  cp "$name.qcow2" "$out/seed-$name.qcow2"
}
w='write -P 1 0 3k'
q v3 cluster_size=512 1M "$w" 'write -z 8k 1k' 'write -P 2 100k 2k' 'discard 0 512'
q v2 cluster_size=512,compat=0.10 1M "$w" 'write -z 8k 1k' 'write -P 2 100k 2k'
for r in 1 2 4 8 32 64; do q rc$r cluster_size=512,refcount_bits=$r 256k "$w" 'write -P 3 64k 1k'; done
q zlib cluster_size=1k 256k 'write -c -P 4 0 1k' 'write -c -P 5 4k 2k' "$w"
q zstd cluster_size=1k,compression_type=zstd 256k 'write -c -P 4 0 1k' 'write -c -P 5 4k 2k'
q lazy-dirty cluster_size=512,lazy_refcounts=on 256k "$w" 'write -P 6 32k 4k' 'sigraise 9'
q prealloc cluster_size=512,preallocation=metadata 64k 'write -P 7 1k 1k'
q extl2 cluster_size=16k,extended_l2=on 256k 'write -P 1 0 2k' 'write -z 20k 2k' 'write -P 2 40k 20k'
qemu-img create -q -f raw base.raw 256k
q backing cluster_size=512,backing_file=base.raw,backing_fmt=raw 256k "$w"
q unicode-backing "cluster_size=512,backing_file=b\xc3\xa4se.qcow2,backing_fmt=qcow2" 64k
q small-l2 cluster_size=512 64M 'write -P 1 0 1k' 'write -P 1 32M 1k' 'write -P 1 63M 1k'
qemu-img create -q -f qcow2 -o cluster_size=512 snaps.qcow2 256k
qemu-io -f qcow2 -c "$w" snaps.qcow2 >/dev/null
qemu-img snapshot -c one snaps.qcow2
qemu-io -f qcow2 -c 'write -P 8 1k 2k' -c 'write -c -P 9 8k 512' snaps.qcow2 >/dev/null
qemu-img snapshot -c two snaps.qcow2
qemu-io -f qcow2 -c 'write -z 0 1k' snaps.qcow2 >/dev/null
cp snaps.qcow2 "$out/seed-snaps.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=512 bitmap.qcow2 256k
qemu-img bitmap --add bitmap.qcow2 b0
qemu-io -f qcow2 -c "$w" bitmap.qcow2 >/dev/null
cp bitmap.qcow2 "$out/seed-bitmap.qcow2"
qemu-img create -q -f qcow2 --object secret,id=s0,data=pw \
  -o cluster_size=512,encrypt.format=aes,encrypt.key-secret=s0 aes.qcow2 64k
cp aes.qcow2 "$out/seed-aes.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=512,data_file=data.raw extdata.qcow2 64k
cp extdata.qcow2 "$out/seed-extdata.qcow2"

k() { # name create-options size
  "$kiln" create -q -f qcow2 -o "$2" "$1.qcow2" "$3"
  qemu-io -f qcow2 -c 'write -P 1 0 5k' -c 'write -z 16k 4k' -c 'write -c -P 2 32k 4k' "$1.qcow2" >/dev/null || true
  "$kiln" snapshot -c s "$1.qcow2"
  qemu-io -f qcow2 -c 'write -P 3 1k 1k' "$1.qcow2" >/dev/null || true
  cp "$1.qcow2" "$out/seed-kiln-$1.qcow2"
}
k plain cluster_size=4k,refcount_bits=4 128k
k extl2 cluster_size=16k,extended_l2=on,compression_type=zstd 256k
ls -l "$out" | awk '{s+=$5} END {print NR-1, "files,", s, "bytes"}'
