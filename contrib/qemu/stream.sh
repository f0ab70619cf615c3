#!/usr/bin/env bash
# Boots a QEMU guest on passt-rs in stream mode (-netdev stream).
#   contrib/qemu/stream.sh KERNEL INITRD [extra QEMU args...]
# Starts passt (PASST=path, default target/release/passt) on a fresh socket, then QEMU with
# that socket. passt exits with QEMU (--one-off). Run it inside a network namespace unless
# you mean the guest to reach your network.
set -euo pipefail
kernel=${1:?usage: $0 KERNEL INITRD [QEMU args...]}; initrd=${2:?usage: $0 KERNEL INITRD [QEMU args...]}; shift 2
passt=${PASST:-target/release/passt}
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
"$passt" --one-off --socket "$dir/passt.socket" --pid "$dir/passt.pid"
exec qemu-system-x86_64 -accel "${ACCEL:-tcg}" -m 512 -nographic -no-reboot \
  -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 ${APPEND:-}" \
  -device virtio-net-pci,netdev=n,mac=52:54:00:12:34:56 \
  -netdev stream,id=n,server=off,addr.type=unix,addr.path="$dir/passt.socket" "$@"
