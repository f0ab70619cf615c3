#!/usr/bin/env bash
# Boots a QEMU guest on passt-rs as a vhost-user-net back-end.
#   contrib/qemu/vhost-user.sh KERNEL INITRD [extra QEMU args...]
# Guest RAM must be shareable (memfd, share=on) so passt-rs can map it. Under TCG with
# QEMU 7.2, MSI-X with vhost-user crashes QEMU: vectors=0. Run it inside a network
# namespace unless you mean the guest to reach your network.
set -euo pipefail
kernel=${1:?usage: $0 KERNEL INITRD [QEMU args...]}; initrd=${2:?usage: $0 KERNEL INITRD [QEMU args...]}; shift 2
passt=${PASST:-target/release/passt}
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
"$passt" --vhost-user --one-off --socket "$dir/passt.socket" --pid "$dir/passt.pid"
exec qemu-system-x86_64 -accel "${ACCEL:-tcg}" -m 512 -nographic -no-reboot \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 ${APPEND:-}" \
  -chardev socket,id=c,path="$dir/passt.socket" \
  -netdev vhost-user,id=n,chardev=c \
  -device virtio-net-pci,netdev=n,mac=52:54:00:12:34:56,vectors=0,host_mtu=65520 "$@"
