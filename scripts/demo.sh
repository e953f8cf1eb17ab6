#!/bin/sh
# kiln demo: builds kiln and the probe guest, boots a 4-vCPU, 1 GiB VM, and prints what the
# guest saw from inside. Run it from anywhere on a fresh Debian or Ubuntu machine with KVM.
set -eu
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cc; then
    echo "==> installing a C toolchain (sudo apt-get install build-essential)"
    sudo apt-get update -qq && sudo apt-get install -y -qq build-essential
fi
if ! need cargo; then
    [ -x "$HOME/.cargo/bin/cargo" ] || {
        echo "==> installing Rust with rustup (https://rustup.rs)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    }
    PATH="$HOME/.cargo/bin:$PATH"
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "kiln needs KVM: /dev/kvm is missing or not accessible to $(id -un)." >&2
    echo "Enable virtualization, load kvm_intel or kvm_amd, and add yourself to the kvm group." >&2
    exit 1
fi

echo "==> building kiln and the probe guest (first build takes a few minutes)"
cargo build --release --quiet -p kiln -p kiln-bench
cargo build --release --quiet --manifest-path guest/probe/Cargo.toml --target x86_64-unknown-linux-gnu
kiln=target/x86_64-unknown-linux-gnu/release/kiln
probe=guest/probe/target/x86_64-unknown-linux-gnu/release/probe
cpus=4
mem=1G

echo "==> $kiln run --kernel $probe --cpus $cpus --memory $mem"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$(date +%s%N)
status=0
"$kiln" run --kernel "$probe" --cpus "$cpus" --memory "$mem" --cmdline "probe.checks=boot,acpi,smp,mem,cpu,rtc" </dev/null >"$out" || status=$?
end=$(date +%s%N)
sed 's/^/    guest| /' "$out"

field() {
    awk -v c="$1" -v k="$2" '$1 == "PROBE" && $2 == c && $3 == "ok" {
        for (i = 4; i <= NF; i++) if (index($i, k "=") == 1) { print substr($i, length(k) + 2); exit }
    }' "$out"
}
iters=$(field cpu iters)
guest_tpi=$(field cpu tsc_per_iter)
native_tpi=$(target/x86_64-unknown-linux-gnu/release/kiln-bench cpuloop "${iters:-100000000}")
echo
echo "==> what the guest saw"
echo "    vCPUs started:      $(field smp cpus) (APIC ids $(field smp apic_ids)); MADT lists $(field acpi cpus)"
echo "    RAM (e820 usable):  $(field boot ram) bytes in $(field boot e820) e820 entries; CMOS says $(field rtc cmos_mem)"
echo "    ACPI:               RSDP at $(field acpi rsdp), tables $(field acpi tables), power-off via $(field acpi poweroff)"
echo "    memory test:        $(field mem bytes) bytes written and verified at $(field mem mbps) MB/s"
echo "    RTC:                $(field rtc time) (host: $(date -u +%Y-%m-%dT%H:%M:%S))"
echo "    CPU loop:           $guest_tpi TSC ticks/iteration in the guest, $native_tpi natively" \
     "($(awk -v g="$guest_tpi" -v n="$native_tpi" 'BEGIN { if (g > 0) printf "%.1f", 100 * n / g; else print "?" }')% of native)"
echo "    result:             $(sed -n 's/^PROBE summary //p' "$out"); kiln exited $status after $(( (end - start) / 1000000 )) ms"
[ "$status" -eq 0 ] && grep -q "^PROBE summary ok=.* fail=0" "$out"
