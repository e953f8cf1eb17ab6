#!/usr/bin/env bash
# kiln img vs qemu-img: one run, ratios printed at the end.
#
#   bench/img/run.sh [WORKDIR]
#
# Makes a 1 GiB raw image of mixed content (random data, compressible data, written zeroes,
# holes), converts it with both tools (qcow2 -> raw, raw -> qcow2, raw -> qcow2 -c zstd),
# best of 3 wall-clock runs each with a warm page cache, and measures random 4 KiB reads and
# writes through kiln-disk on qcow2 against raw (metadata cached). Needs qemu-img, python3.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d /tmp/kiln-img-bench.XXXXXX)}
mkdir -p "$work"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-disk}
# Ask cargo where it put the executables (a build.target setting moves them).
exe() {
  cargo build -q --release --message-format=json "$@" |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable"): print(m["executable"])' | tail -1
}
kiln=$(exe -p kiln-img --bin kiln-img)
randio=$(exe -p kiln-disk --example randio)
cd "$work"

python3 - <<'PY'
import os, random
random.seed(42)
size = 1 << 30
fd = os.open("src.raw", os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
os.ftruncate(fd, size)
text = (b"kiln benchmark: the quick brown fox jumps over the lazy dog. " * 20000)
chunk = 1 << 20
for i in range(size // chunk):
    kind = random.random()
    if kind < 0.35:
        os.pwrite(fd, os.urandom(chunk), i * chunk)          # allocated, incompressible
    elif kind < 0.55:
        os.pwrite(fd, text[:chunk], i * chunk)                # allocated, compressible
    elif kind < 0.70:
        os.pwrite(fd, bytes(chunk), i * chunk)                # allocated zeroes
    # else: hole (unallocated)
os.close(fd)
PY
qemu-img convert -f raw -O qcow2 src.raw src.qcow2

best() { # best wall time of 3 runs of "$@", in seconds
  local b=999999
  for _ in 1 2 3; do
    rm -f out.img
    local s=$(date +%s.%N)
    "$@" >/dev/null
    local e=$(date +%s.%N)
    b=$(python3 -c "print(min($b, $e - $s))")
  done
  echo "$b"
}

declare -A T
T[q_q2r]=$(best qemu-img convert -f qcow2 -O raw src.qcow2 out.img)
T[k_q2r]=$(best "$kiln" convert -f qcow2 -O raw src.qcow2 out.img)
T[q_r2q]=$(best qemu-img convert -f raw -O qcow2 src.raw out.img)
T[k_r2q]=$(best "$kiln" convert -f raw -O qcow2 src.raw out.img)
T[q_r2z]=$(best qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd src.raw out.img)
T[k_r2z]=$(best "$kiln" convert -c -f raw -O qcow2 -o compression_type=zstd src.raw out.img)
"$kiln" convert -c -f raw -O qcow2 -o compression_type=zstd src.raw k.zst.qcow2
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd src.raw q.zst.qcow2
qemu-img compare -q src.raw k.zst.qcow2

# Random I/O: a fully written raw file against a fully allocated qcow2 (same data; every
# host block written, so neither side pays for unwritten extents).
dd if=src.raw of=io.raw bs=1M status=none
"$kiln" convert -S 0 -f raw -O qcow2 io.raw io.qcow2
sync # no writeback of the fresh files running under the measurement
read -r rr rw < <("$randio" io.raw 5)
read -r qr qw < <("$randio" io.qcow2 5)

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo
echo "kiln img vs qemu-img ($(qemu-img --version | head -1)), 1 GiB mixed image, best of 3"
printf '%-34s %10s %10s %14s\n' "conversion" "qemu-img s" "kiln s" "speed ratio"
printf '%-34s %10.2f %10.2f %13sx\n' "qcow2 -> raw" "${T[q_q2r]}" "${T[k_q2r]}" "$(ratio "${T[q_q2r]}" "${T[k_q2r]}")"
printf '%-34s %10.2f %10.2f %13sx\n' "raw -> qcow2" "${T[q_r2q]}" "${T[k_r2q]}" "$(ratio "${T[q_r2q]}" "${T[k_r2q]}")"
printf '%-34s %10.2f %10.2f %13sx\n' "raw -> qcow2 -c (zstd)" "${T[q_r2z]}" "${T[k_r2z]}" "$(ratio "${T[q_r2z]}" "${T[k_r2z]}")"
echo "compressed size: qemu-img $(stat -c %s q.zst.qcow2) bytes, kiln $(stat -c %s k.zst.qcow2) bytes"
echo
printf '%-34s %12s %12s %12s\n' "random 4 KiB via kiln-disk" "raw IOPS" "qcow2 IOPS" "qcow2/raw"
printf '%-34s %12s %12s %11s\n' "read" "$rr" "$qr" "$(ratio "$qr" "$rr")"
printf '%-34s %12s %12s %11s\n' "write" "$rw" "$qw" "$(ratio "$qw" "$rw")"
echo "(speed ratio > 1 means kiln is faster; work dir: $work)"
