#!/bin/sh
# Runs every kiln test: unit tests, integration tests that boot real guests (needs /dev/kvm),
# qemu-img interop tests (needs qemu-utils), the probe guest's own tests, and lints.
set -eu
cd "$(dirname "$0")/.."

if [ ! -e guest/cache/vmlinuz-cloud-amd64 ]; then
    echo "==> fetching the Debian cloud kernel for the Linux boot test"
    ./guest/fetch-linux.sh
fi
echo "==> format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> probe guest"
cargo fmt --manifest-path guest/probe/Cargo.toml -- --check
cargo test --quiet --lib --manifest-path guest/probe/Cargo.toml
echo "==> workspace tests (boot real VMs: needs /dev/kvm)"
cargo test --workspace --release
