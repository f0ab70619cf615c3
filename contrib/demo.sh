#!/usr/bin/env bash
# passt-rs demo: a guest gets its network from passt, in namespaces of its own.
#
# Usage: contrib/demo.sh
# Environment:
#   PASST=path        passt binary (default: target/release/passt; /usr/bin/passt works too)
#   PASST_ARGS="..."  extra passt arguments
#   QEMU=path         QEMU binary (default: qemu-system-x86_64)
#
# Builds the test guest (tests/guest/build.sh), then, inside new user, network, mount (and
# PID, where allowed) namespaces, sets up the same network as the end-to-end tests:
#
#   this namespace: passt + QEMU                  peer namespace: router and "internet"
#   veth0 192.0.2.2/24 2001:db8::2/64   <----->   veth1 192.0.2.1/24 2001:db8::1/64 fe80::1
#   default via 192.0.2.1 / fe80::1               lo 198.51.100.1 2001:db8:ffff::1
#
# starts passt in stream mode, boots the guest on its socket, and drives the guest console:
# DHCP lease, SLAAC address, pings to the peer, power off. Nothing reaches the real network.
# Non-interactive; exits 0 on success, non-zero with a message on failure.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"

die() {
	echo "demo: FAILED: $*" >&2
	exit 1
}
say() { printf '\n=== %s\n' "$*"; }

if [ "${1:-}" != --inside ]; then
	if [ -z "${PASST:-}" ]; then
		say "Installing what the demo needs (apt) and building passt-rs"
		"$repo/scripts/deps.sh"
		(cd "$repo" && cargo build --release --quiet)
	fi
	PASST=${PASST:-$repo/target/release/passt}
	[ -x "$PASST" ] || die "no passt binary at $PASST (cargo build --release, or set PASST=)"
	QEMU=${QEMU:-qemu-system-x86_64}
	for tool in unshare nsenter ip "$QEMU"; do
		command -v "$tool" >/dev/null || die "missing $tool (apt-get install util-linux iproute2 qemu-system-x86)"
	done

	say "Building the guest image"
	image=$(sh "$repo/tests/guest/build.sh") || die "guest image build failed"
	echo "$image"
	kernel=$(echo "$image" | sed -n 's/^kernel=//p')
	initramfs=$(echo "$image" | sed -n 's/^initramfs=//p')

	work=$(mktemp -d /tmp/passt-rs-demo.XXXXXX)
	trap 'rm -rf "$work"' EXIT
	export PASST QEMU kernel initramfs work
	# A PID namespace makes the kernel kill everything left when the inner script ends; some
	# container setups forbid mounting its /proc, then the inner trap alone cleans up.
	if unshare -Urnmp --fork --mount-proc true 2>/dev/null; then
		ns=(-Urnmp --fork --mount-proc --kill-child)
	else
		ns=(-Urnm --fork --kill-child)
	fi
	rc=0
	unshare "${ns[@]}" bash "$self" --inside || rc=$?
	exit "$rc"
fi

# --- From here on: inside the new namespaces, as root of the user namespace. ---

pids=()
cleanup() {
	local rc=$?
	for pid in "${pids[@]}"; do
		kill -9 "$pid" 2>/dev/null || true
	done
	if [ "$rc" -ne 0 ] && [ -s "$work/passt.log" ]; then
		echo "--- passt log:" >&2
		grep -v 'Failed to send .* to syslog' "$work/passt.log" | tail -n 40 >&2
	fi
	if [ "$rc" -ne 0 ] && [ -s "$work/console.log" ]; then
		echo "--- guest console (last lines):" >&2
		tail -n 40 "$work/console.log" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "Setting up namespaces"
# Peer namespace: a holder process prints "ready" once it is inside its own network namespace.
exec {peer_out}< <(exec unshare -n sh -c 'echo ready; exec sleep infinity')
peer=$!
pids+=("$peer")
read -r line <&"$peer_out" && [ "$line" = ready ] || die "peer namespace holder failed"
exec {peer_out}<&-
peer_do() { nsenter -t "$peer" -n "$@"; }

sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
peer_do sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
ip link add veth0 type veth peer name veth1 netns "/proc/$peer/ns/net"
peer_do sh -ec '
	ip link set lo up
	ip addr add 198.51.100.1/32 dev lo
	ip addr add 2001:db8:ffff::1/128 dev lo
	ip link set veth1 up
	ip addr add 192.0.2.1/24 dev veth1
	ip addr add 2001:db8::1/64 dev veth1 nodad
	ip addr add fe80::1/64 dev veth1 nodad'
ip link set lo up
ip link set veth0 up
ip addr add 192.0.2.2/24 dev veth0
ip addr add 2001:db8::2/64 dev veth0 nodad
ip route add default via 192.0.2.1 dev veth0
ip -6 route add default via fe80::1 dev veth0
# Unprivileged ICMP echo sockets, for the GIDs mapped in this user namespace.
read -r gid_in _ gid_count </proc/self/gid_map
echo "$gid_in $((gid_in + gid_count - 1))" >/proc/sys/net/ipv4/ping_group_range
printf 'nameserver 198.51.100.53\nnameserver 2001:db8:ffff::53\nsearch example.test\n' >"$work/resolv.conf"
mount --bind "$work/resolv.conf" /etc/resolv.conf
ip -br addr show dev veth0
ip -6 route show default

say "Starting $PASST"
sock=$work/passt.sock
# Without -f passt daemonises once the socket listens: its parent's exit is the ready event.
# shellcheck disable=SC2086 # PASST_ARGS is a word list on purpose
if ! timeout 30 "$PASST" -s "$sock" -P "$work/passt.pid" ${PASST_ARGS:-} </dev/null >"$work/passt.log" 2>&1; then
	die "passt did not start"
fi
read -r passt_pid <"$work/passt.pid" || die "passt wrote no PID file"
pids+=("$passt_pid")
echo "passt running, PID $passt_pid, socket $sock"

say "Booting the guest (TCG, this takes a few seconds)"
coproc QEMUP {
	exec "$QEMU" -accel tcg -m 512 \
		-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
		-nographic -no-reboot -nic none \
		-kernel "$kernel" -initrd "$initramfs" -append 'console=ttyS0 quiet panic=-1' \
		-device virtio-net-pci,netdev=n,mac=52:54:00:12:34:56,vectors=0,romfile= \
		-netdev "stream,id=n,server=off,addr.type=unix,addr.path=$sock" 2>&1
}
qemu=$QEMUP_PID
pids+=("$qemu")
exec {qin}>&"${QEMUP[1]}" {qout}<&"${QEMUP[0]}"
: >"$work/console.log"

# Reads console lines until one contains $1, within $2 seconds. Lines after the guest's
# readiness line are shown with a prefix; the boot noise (BIOS escapes) only goes to the log.
show=0
expect() {
	local pattern=$1 deadline=$((SECONDS + $2)) line left rc
	while :; do
		left=$((deadline - SECONDS))
		[ "$left" -gt 0 ] || die "no '$pattern' from the guest within $2 s"
		rc=0
		IFS= read -r -t "$left" line <&"$qout" || rc=$?
		# Above 128 is a timeout (the deadline is checked at the top); else end of file.
		[ "$rc" -gt 128 ] && continue
		[ "$rc" -eq 0 ] || die "QEMU exited while waiting for '$pattern'"
		line=${line%$'\r'}
		printf '%s\n' "$line" >>"$work/console.log"
		case "$line" in
		*GUEST-ERROR*) die "guest: $line" ;;
		"@@END "*) ;;
		*) [ "$show" = 1 ] && printf '    %s\n' "$line" ;;
		esac
		case "$line" in *"$pattern"*)
			last=$line
			return 0
			;;
		esac
	done
}

# Runs a guest command, shows it and its output, fails on a non-zero exit status.
step=0
guest() {
	step=$((step + 1))
	printf 'guest# %s\n' "$1"
	printf '%s\necho "@@EN""D %s $?"\n' "$1" "$step" >&"$qin"
	expect "@@END $step " 60
	local status=${last##* }
	[ "$status" = 0 ] || die "guest command '$1' exited $status"
}

start=$SECONDS
expect GUEST-READY 120
echo "guest up after $((SECONDS - start)) s"
# The shell's start-up banner follows the ready line: one round trip swallows it.
printf 'echo "@@EN""D 0 $?"\n' >&"$qin"
expect "@@END 0 " 60
show=1

say "DHCP"
guest 'udhcpc -i eth0 -n -q -f 2>&1'
guest 'ip -4 addr show dev eth0; ip -4 route; cat /etc/resolv.conf'

say "IPv6: SLAAC from passt's router advertisement"
# Bounded wait for the address, past duplicate address detection (tentative is unusable).
guest 'slaac() { ip -6 addr show dev eth0 scope global | grep "inet6 2001:db8::" | grep -qv tentative; }'
guest 'i=0; while [ $i -lt 200 ] && ! slaac; do i=$((i+1)); sleep 0.1; done; ip -6 addr show dev eth0; ip -6 route'
guest 'slaac'

say "Ping the peer's \"internet\" addresses"
guest 'ping -c 3 198.51.100.1'
guest 'ping6 -c 3 2001:db8:ffff::1'

say "Power off"
printf 'poweroff -f\n' >&"$qin"
# QEMU closing its output (end of file, not a timeout) is the power-off.
rc=0
while [ "$rc" -eq 0 ]; do
	IFS= read -r -t 30 line <&"$qout" || rc=$?
	printf '%s\n' "${line%$'\r'}" >>"$work/console.log"
done
[ "$rc" -le 128 ] || die "guest did not power off within 30 s"
wait "$qemu" 2>/dev/null || true
echo "guest powered off"
say "Demo completed successfully"
