#!/usr/bin/env bash
# Runs the probe's PCI and virtio checks under QEMU microvm (pcie=on) with
# virtio-rng, -blk, -net (tap) and -console, and checks the results from the
# host side too (the pattern the probe wrote, ping replies, the console line).
#
#   guest/probe/scripts/qemu-devices.sh [--bench]
#
# Needs qemu-system-x86_64 (7.2 tested), python3, /dev/kvm and root (for the
# tap). Fails loudly when one is missing. --bench adds the throughput modes.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bench=0
[[ ${1:-} == --bench ]] && bench=1

die() { echo "qemu-devices: $*" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (Debian: qemu-system-x86)"
command -v python3 >/dev/null || die "python3 is missing"
[[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is not usable"
[[ $(id -u) == 0 ]] || die "must run as root to create a tap"

cargo build --quiet --release --target x86_64-unknown-linux-gnu --manifest-path "$here/Cargo.toml"
probe=$here/target/x86_64-unknown-linux-gnu/release/probe
work=$(mktemp -d)
tap=kprobe$$
cleanup() { ip link del "$tap" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# A subnet of its own, so that no other interface's route takes the pings.
net_host=172.31.213.1 net_guest=172.31.213.15
[[ -z $(ip -o addr show to 172.31.213.0/24) ]] || die "172.31.213.0/24 is already on an interface"
ip tuntap add dev "$tap" mode tap
ip addr add "$net_host/24" dev "$tap"
ip link set "$tap" up

seed=0x5eed
img=$work/disk.img
python3 - "$img" "$seed" <<'EOF'
import struct, sys, os
path, seed = sys.argv[1], int(sys.argv[2], 0)
with open(path, 'wb') as f:
    f.write(b''.join(struct.pack('<Q', o ^ seed) for o in range(0, 1 << 20, 8)))
os.truncate(path, 64 << 20)
EOF

qemu() {  # qemu <append> <extra args...>
    local append=$1; shift
    timeout 120 qemu-system-x86_64 -M microvm,pcie=on,rtc=on -enable-kvm -m 512M -nodefaults \
        -no-user-config -display none -serial stdio -kernel "$probe" -append "$append" "$@" 2>/dev/null
}
expect() {  # expect <output> <regex>...
    local out=$1; shift
    for re in "$@"; do
        grep -Eq -- "$re" <<<"$out" || { echo "$out"; die "missing: $re"; }
    done
    echo "$out" | grep -E '^PROBE (pci|rng|blk|blk_bench|net|net_bench|console|hostile) (ok|fail)|^PROBE summary'
}
rng=(-device virtio-rng-pci)
blk=(-drive "if=none,id=d0,file=$img,format=raw" -device virtio-blk-pci,drive=d0,serial=probe0)
net=(-netdev "tap,id=n0,ifname=$tap,script=no,downscript=no,vhost=off" -device virtio-net-pci,netdev=n0)
con=(-device virtio-serial-pci -chardev "socket,id=c0,path=$work/con.sock,server=on,wait=off" -device virtconsole,chardev=c0)

echo "== pci, rng, blk (pattern read and write), console"
python3 - "$work/con.sock" >"$work/con.out" 2>&1 <<'EOF' &
import socket, sys, time
for _ in range(100):
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); break
    except OSError: time.sleep(0.05)
s.settimeout(10); buf = b''
while b'hello\n' not in buf: buf += s.recv(100)
s.sendall(b'line from the host\n'); buf = b''
while b'\n' not in buf: buf += s.recv(100)
print(buf.decode().strip())
EOF
out=$(qemu "probe.checks=pci,rng,blk,console probe.blk_seed=$seed probe.blk_read=0:1M probe.blk_write=2M:1M probe.console_wait_ms=5000" \
    "${rng[@]}" "${blk[@]}" "${con[@]}")
wait
expect "$out" '^PROBE pci ok config=dsdt ' '^PROBE rng ok ' \
    '^PROBE blk ok .* serial=probe0 ro=0 .*read=1048576 write=1048576 write_zeroes=ok discard=ok flush=ok oob=refused' \
    '^PROBE console ok .* read=line from the host$' '^PROBE summary ok=4 fail=0'
grep -q '^kiln-probe console echo line from the host$' "$work/con.out" || die "console echo not received: $(cat "$work/con.out")"
python3 - "$img" "$seed" <<'EOF' || die "the probe's pattern is not in the image"
import struct, sys
d = open(sys.argv[1], 'rb').read(); seed = int(sys.argv[2], 0)
bad = [o for o in range(2 << 20, 3 << 20, 8) if struct.unpack_from('<Q', d, o)[0] != ~(o ^ seed) & (2**64 - 1)]
sys.exit(1 if bad else 0)
EOF
echo "host: the probe's pattern is in the image, the console echo came back"

echo "== read-only disk"
out=$(qemu "probe.checks=blk probe.blk_seed=$seed probe.blk_read=0:1M probe.blk_write=2M:1M" \
    -drive "if=none,id=d0,file=$img,format=raw,readonly=on" -device virtio-blk-pci,drive=d0,serial=probe0)
expect "$out" '^PROBE blk ok .* ro=1 .*write=refused:' '^PROBE summary ok=1 fail=0'

echo "== net: ping from the host"
python3 - "$net_guest" >"$work/ping.out" 2>&1 <<'EOF' &
import socket, struct, time, os, sys
ip = sys.argv[1]
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(1)
ok = 0; seq = 0; end = time.time() + 20
while ok < 3 and time.time() < end:
    h = struct.pack('!BBHHH', 8, 0, 0, os.getpid() & 0xffff, seq) + b'kiln-probe'
    s.sendto(h[:2] + struct.pack('!H', csum(h)) + h[4:], (ip, 0))
    try:
        while True:
            d, a = s.recvfrom(2048); ihl = (d[0] & 15) * 4
            if a[0] == ip and d[ihl] == 0 and struct.unpack('!H', d[ihl + 6:ihl + 8])[0] == seq:
                ok += 1; break
    except socket.timeout: pass
    seq += 1; time.sleep(0.2)
print('replies', ok)
EOF
out=$(qemu "probe.checks=net probe.net_ip=$net_guest/24 probe.net_secs=20 probe.net_min_echo=3" "${net[@]}")
wait
expect "$out" '^PROBE net ok .* echo=3$' '^PROBE summary ok=1 fail=0'
grep -q 'replies 3' "$work/ping.out" || die "ping: $(cat "$work/ping.out")"
echo "host: 3 ping replies"

echo "== virtio-mmio (microvm without ACPI announces the devices on the command line)"
out=$(timeout 120 qemu-system-x86_64 -M microvm,rtc=on,acpi=off -no-reboot -global virtio-mmio.force-legacy=false \
    -enable-kvm -m 512M -nodefaults -no-user-config -display none -serial stdio -kernel "$probe" \
    -append "probe.checks=rng,blk probe.end=triplefault probe.blk_seed=$seed probe.blk_read=0:1M probe.blk_write=2M:1M" \
    -device virtio-rng-device -drive "if=none,id=d0,file=$img,format=raw" -device virtio-blk-device,drive=d0,serial=mm0 2>/dev/null)
expect "$out" '^PROBE rng ok dev=mmio@0x' '^PROBE blk ok dev=mmio@0x.* serial=mm0 .*write=1048576' '^PROBE summary ok=2 fail=0'

for target in rng blk net console; do
    echo "== hostile $target (QEMU 7.2 completes DMA outside RAM, so oob_addr is left out)"
    out=$(qemu "probe.checks=hostile probe.hostile=$target probe.hostile_cases=loop,huge_len,avail_idx,bad_head,bad_next,bad_size,ring_oob" \
        "${rng[@]}" "${blk[@]}" "${net[@]}" "${con[@]}")
    expect "$out" "^PROBE hostile ok .* target=$target cases=7 .* other=[a-z]+@" '^PROBE summary ok=1 fail=0'
done

if (( bench )); then
    for mode in randread,bs=4K randwrite,bs=4K seqread,bs=1M seqwrite,bs=1M; do
        echo "== blk_bench $mode"
        out=$(qemu "probe.checks=blk probe.blk_bench=$mode,qd=32,secs=3" \
            -drive "if=none,id=d0,file=$img,format=raw,aio=io_uring,cache=none" -device virtio-blk-pci,drive=d0)
        expect "$out" '^PROBE blk_bench ok '
    done
    echo "== net_bench source (host counts tap rx_packets)"
    before=$(cat "/sys/class/net/$tap/statistics/rx_packets")
    out=$(qemu "probe.checks=net probe.net_ip=$net_guest/24 probe.net_bench=source,secs=3" "${net[@]}")
    after=$(cat "/sys/class/net/$tap/statistics/rx_packets")
    expect "$out" '^PROBE net_bench ok .*mode=source'
    echo "host: tap received $((after - before)) frames"
fi
echo "qemu-devices: all passed"
