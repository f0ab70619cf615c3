#!/bin/sh
# Build the test guest: the host's Debian kernel plus a busybox initramfs with the virtio-net
# modules, an /init that brings eth0 up and hands the serial console to a non-echoing shell.
#
# Usage: tests/guest/build.sh [OUTDIR]     (default: tests/guest/out, or $GUEST_OUT)
# Environment: KVER=<version> picks a kernel from /lib/modules (default: newest one that has a
# matching /boot/vmlinuz-<version>).
#
# Outputs (paths printed on stdout, one "name=path" per line):
#   OUTDIR/vmlinuz          copy of /boot/vmlinuz-$KVER
#   OUTDIR/initramfs.img    cpio newc, gzip
#
# Idempotent: outputs are keyed on a hash of every input (this script, busybox, the kernel and
# the modules); when the key matches, nothing is rebuilt. Concurrent runs serialise on a lock.
#
# Needs (Debian): linux-image-amd64 busybox-static cpio gzip coreutils util-linux (flock),
# plus xz-utils or zstd only if the modules are compressed. Booting it needs qemu-system-x86.
# Root is not needed.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${GUEST_OUT:-$here/out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)

die() { echo "guest/build.sh: $*" >&2; exit 1; }

for tool in cpio gzip sha256sum flock find; do
	command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done

busybox=
for b in /bin/busybox /usr/bin/busybox; do
	[ -x "$b" ] && busybox=$b && break
done
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
# A dynamically linked busybox would need its libraries in the initramfs: insist on static.
if command -v file >/dev/null 2>&1 && file -L "$busybox" | grep -q 'dynamically linked'; then
	die "$busybox is dynamically linked (apt-get install busybox-static)"
fi

if [ -z "${KVER:-}" ]; then
	for v in $(ls -1 /lib/modules 2>/dev/null | sort -V -r); do
		[ -r "/boot/vmlinuz-$v" ] && KVER=$v && break
	done
fi
[ -n "${KVER:-}" ] || die "no kernel with modules found (apt-get install linux-image-amd64)"
kernel=/boot/vmlinuz-$KVER
[ -r "$kernel" ] || die "$kernel not readable"
moddir=/lib/modules/$KVER

# Load order matters: each module's dependencies come before it.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net"

modfiles=
for m in $MODULES; do
	f=$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
	[ -n "$f" ] || die "module $m not found under $moddir"
	modfiles="$modfiles $f"
done

# gtool (tests/guest/tool): what busybox lacks, static and std-only. Built with cargo when
# it is there (it is wherever the tests run); the image works without it otherwise.
gtool=
if command -v cargo >/dev/null 2>&1; then
	gtool_target=$(cd "$here/../.." && pwd)/target/gtool
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
		--manifest-path "$here/tool/Cargo.toml" --target-dir "$gtool_target" >&2 ||
		die "building gtool failed"
	gtool=$gtool_target/release/gtool
fi

exec 9>"$out/.lock"
flock 9

key=$(
	{
		sha256sum "$0" "$busybox" "$kernel" $modfiles $gtool
		echo "$KVER $MODULES"
	} | sha256sum | cut -d' ' -f1
)

if [ -f "$out/key" ] && [ "$(cat "$out/key")" = "$key" ] &&
	[ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.img" ]; then
	echo "kernel=$out/vmlinuz"
	echo "initramfs=$out/initramfs.img"
	exit 0
fi

stage=$(mktemp -d "$out/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT INT TERM
root=$stage/root
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/etc" "$root/proc" \
	"$root/sys" "$root/dev" "$root/tmp" "$root/run" "$root/root" "$root/lib/modules" \
	"$root/usr/share/udhcpc"

cp "$busybox" "$root/bin/busybox"
# Applet links, placed where busybox itself would install them.
for path in $("$busybox" --list-full); do
	[ "$path" = bin/busybox ] && continue
	mkdir -p "$root/$(dirname "$path")"
	ln -sf /bin/busybox "$root/$path"
done

[ -z "$gtool" ] || cp "$gtool" "$root/bin/gtool"

for f in $modfiles; do
	name=$(basename "$f")
	case "$name" in
	*.ko.xz) xz -dc "$f" >"$root/lib/modules/${name%.xz}" ;;
	*.ko.zst) zstd -qdc "$f" >"$root/lib/modules/${name%.zst}" ;;
	*.ko.gz) gzip -dc "$f" >"$root/lib/modules/${name%.gz}" ;;
	*) cp "$f" "$root/lib/modules/$name" ;;
	esac
done

echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
echo "guest" >"$root/etc/hostname"
: >"$root/etc/resolv.conf"

cat >"$root/init" <<EOF
#!/bin/sh
# Test guest init: no device nodes in the archive, so the console is opened from devtmpfs.
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname guest
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
# Keep kernel messages off the console the tests parse (panics still print).
echo 1 >/proc/sys/kernel/printk
for m in $MODULES; do
	insmod /lib/modules/\$m.ko || echo "GUEST-ERROR: insmod \$m failed"
done
ip link set lo up
# virtio_net probes during insmod; the bound is for a slow probe, not expected to be hit.
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
	i=\$((i + 1))
	[ \$i -gt 100 ] && echo "GUEST-ERROR: no eth0" && break
	sleep 0.1
done
ip link set eth0 up
# A shell on the serial console with echo off (busybox line editing then reads plain lines
# without echoing them) and no prompt, so what the console prints is command output only.
export PS1=
exec setsid cttyhack sh -c 'stty -echo; echo GUEST-READY; exec sh'
EOF
chmod 755 "$root/init"

cat >"$root/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook: apply the lease (address, mask, router, DNS, search, MTU) to $interface.
case "$1" in
deconfig)
	ip -4 addr flush dev "$interface"
	ip link set "$interface" up
	;;
bound | renew)
	[ -n "${mtu:-}" ] && ip link set "$interface" mtu "$mtu"
	ip -4 addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
	if [ -n "${router:-}" ]; then
		ip -4 route del default 2>/dev/null
		for r in $router; do
			ip route add default via "$r" dev "$interface" && break
		done
	fi
	{
		[ -n "${search:-}" ] && echo "search $search"
		[ -z "${search:-}" ] && [ -n "${domain:-}" ] && echo "search $domain"
		for d in ${dns:-}; do echo "nameserver $d"; done
	} >/etc/resolv.conf
	echo "udhcpc: $interface ip=$ip mask=${mask:-} router=${router:-} dns=${dns:-} mtu=${mtu:-}"
	;;
esac
exit 0
EOF
chmod 755 "$root/usr/share/udhcpc/default.script"
# Upstream busybox looks in /usr/share/udhcpc, Debian's build in /etc/udhcpc.
mkdir -p "$root/etc/udhcpc"
ln -s /usr/share/udhcpc/default.script "$root/etc/udhcpc/default.script"

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$stage/initramfs.img"
cp "$kernel" "$stage/vmlinuz"
mv -f "$stage/initramfs.img" "$out/initramfs.img"
mv -f "$stage/vmlinuz" "$out/vmlinuz"
echo "$key" >"$out/key"

echo "kernel=$out/vmlinuz"
echo "initramfs=$out/initramfs.img"
