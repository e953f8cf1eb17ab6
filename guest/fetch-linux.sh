#!/bin/sh
# Fetches the Debian cloud kernel (linux-image-cloud-amd64) into guest/cache/ for the Linux
# boot test and the demo. Uses apt-get download: no root needed for the download itself,
# but the package lists must be current (`apt-get update`).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cache="$here/cache"
out="$cache/vmlinuz-cloud-amd64"
if [ -f "$out" ]; then
    echo "$out already present"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download linux-image-cloud-amd64 >/dev/null
meta=$(ls linux-image-cloud-amd64_*.deb)
# The metapackage depends on the versioned image package that holds the kernel.
image=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -n1)
[ -n "$image" ] || { echo "cannot find the kernel package behind $meta" >&2; exit 1; }
apt-get download "$image" >/dev/null
dpkg-deb -x "$image"_*.deb x
mkdir -p "$cache"
cp x/boot/vmlinuz-* "$out"
echo "$out ($image)"
