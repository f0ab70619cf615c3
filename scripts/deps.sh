#!/usr/bin/env bash
# Installs (with apt) what building and testing passt-rs needs on Debian 12, once.
# Quiet and quick when everything is already there.
set -euo pipefail

packages=(qemu-system-x86 linux-image-amd64 busybox-static cpio kmod xz-utils iproute2 util-linux
          iputils-ping socat iperf3 tcpdump passt procps)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "deps: installing ${missing[*]}" >&2
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
