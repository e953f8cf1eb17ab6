#!/usr/bin/env bash
# kiln img vs qemu-img: one run, ratios printed at the end.
#
#   bench/img/run.sh [WORKDIR]
#
# Makes a 1 GiB raw image of mixed content (random data, compressible data, written zeroes,
# holes), converts it with both tools (qcow2 -> raw, raw -> qcow2, raw -> qcow2 -c zstd),
# best of 5 wall-clock runs each, alternating the tools, with a warm page cache; checks
# kiln's outputs against the source with qemu-img; and measures random 4 KiB reads and
# writes through kiln-disk on qcow2 against raw (metadata cached), with 1 and 2 threads.
# Needs qemu-img, python3. RANDIO_SECONDS (default 14) sets the random I/O time per row.
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

# Best wall time of N runs each, qemu-img and kiln alternating so that load from other
# processes falls on both alike. Sets T[q_$1] and T[k_$1].
declare -A T
N=5
race() {
  local name=$1; shift
  local qcmd=() kcmd=() side=q
  for a in "$@"; do
    if [ "$a" = "::" ]; then side=k; continue; fi
    if [ $side = q ]; then qcmd+=("$a"); else kcmd+=("$a"); fi
  done
  local bq=999999 bk=999999 s e
  for _ in $(seq $N); do
    rm -f out.img; s=$(date +%s.%N); "${qcmd[@]}" >/dev/null; e=$(date +%s.%N)
    bq=$(python3 -c "print(min($bq, $e - $s))")
    rm -f out.img; s=$(date +%s.%N); "${kcmd[@]}" >/dev/null; e=$(date +%s.%N)
    bk=$(python3 -c "print(min($bk, $e - $s))")
  done
  T[q_$name]=$bq
  T[k_$name]=$bk
}

race q2r qemu-img convert -f qcow2 -O raw src.qcow2 out.img :: "$kiln" convert -f qcow2 -O raw src.qcow2 out.img
race r2q qemu-img convert -f raw -O qcow2 src.raw out.img :: "$kiln" convert -f raw -O qcow2 src.raw out.img
race r2z qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd src.raw out.img :: \
  "$kiln" convert -c -f raw -O qcow2 -o compression_type=zstd src.raw out.img
"$kiln" convert -c -f raw -O qcow2 -o compression_type=zstd src.raw k.zst.qcow2
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd src.raw q.zst.qcow2
qemu-img compare -q src.raw k.zst.qcow2
"$kiln" convert -f qcow2 -O raw src.qcow2 k.raw
qemu-img compare -q -f raw -F raw src.raw k.raw
"$kiln" convert -f raw -O qcow2 src.raw k.qcow2
qemu-img check -q k.qcow2
qemu-img compare -q src.raw k.qcow2

# Random I/O through the library (see crates/disk/examples/randio.rs for how both sides are
# put in the same state): a 1 GiB raw file and a 1 GiB qcow2, 1 and 2 threads.
rm -f io.raw io.qcow2
truncate -s 1G io.raw
"$kiln" create -q -f qcow2 io.qcow2 1G
randio_out=$("$randio" io.raw io.qcow2 "${RANDIO_SECONDS:-14}" 1 2)

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo
echo "kiln img vs qemu-img ($(qemu-img --version | head -1)), 1 GiB mixed image, best of $N alternating runs"
printf '%-34s %10s %10s %14s\n' "conversion" "qemu-img s" "kiln s" "speed ratio"
printf '%-34s %10.3f %10.3f %13sx\n' "qcow2 -> raw" "${T[q_q2r]}" "${T[k_q2r]}" "$(ratio "${T[q_q2r]}" "${T[k_q2r]}")"
printf '%-34s %10.3f %10.3f %13sx\n' "raw -> qcow2" "${T[q_r2q]}" "${T[k_r2q]}" "$(ratio "${T[q_r2q]}" "${T[k_r2q]}")"
printf '%-34s %10.3f %10.3f %13sx\n' "raw -> qcow2 -c (zstd)" "${T[q_r2z]}" "${T[k_r2z]}" "$(ratio "${T[q_r2z]}" "${T[k_r2z]}")"
echo "compressed size: qemu-img $(stat -c %s q.zst.qcow2) bytes, kiln $(stat -c %s k.zst.qcow2) bytes"
echo
printf '%-34s %12s %12s %12s\n' "random 4 KiB via kiln-disk" "raw IOPS" "qcow2 IOPS" "qcow2/raw"
while read -r _ threads op _ raw _ q; do
  printf '%-34s %12s %12s %11s\n' "$op, $threads thread(s)" "$raw" "$q" "$(ratio "$q" "$raw")"
done <<<"$randio_out"
echo "(speed ratio > 1 means kiln is faster; work dir: $work)"
