#!/usr/bin/env bash
# The benchmark proper. Runs inside `unshare -Urnm` (started by bench/run.sh): this process's
# network namespace is the "host" one, where back-ends run. It creates, inside the same user
# namespace:
#
#   guest ns (one per back-end run)      host ns (this one)              peer ns
#   tap0  <-- passt-bridge -->  back-end (passt-rs, passt, slirp4netns)
#   kernel TCP/IP = the "guest"          veth0 192.0.2.2/24  <------>   veth1 192.0.2.1/24
#                                        default via 192.0.2.1          lo 198.51.100.1/32
#                                                                       iperf3 / passt-rr servers
#
# Namespaces are held by `sleep infinity` processes; every process started here is recorded
# and killed by PID on exit, so the kernel frees the namespaces with them. Nothing touches the
# machine's real interfaces: all of this lives in namespaces created above.
#
# Environment (set by run.sh): BIN (directory with passt, passt-bridge, passt-rr), RUN (scratch
# directory), CSV (raw results file), LOG (progress log), SMOKE (1: ~1 s per case), REPS,
# BACKENDS (space-separated), MTUS, PASST_COMPARE, PASST_COMPARE_VHOST.

set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
: "${BIN:?}" "${RUN:?}" "${CSV:?}"
SMOKE=${SMOKE:-0}
REPS=${REPS:-3}
MTUS=${MTUS:-"65520 1500"}
BACKENDS=${BACKENDS:-"rs-vhost rs-stream debian-passt slirp4netns compare"}
CASES=${CASES:-"ref icmp rr tcp udp scale"}
has_case() { case " $CASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# CPU placement, the same for every back-end and repetition (PIN=none: the scheduler's).
# The back-end and the bridge run on CPU 1. Throughput clients and servers (iperf3) run on
# CPU 0: guest and back-end work in parallel, as a VM's vCPU and its back-end would.
# Latency cases (ping, TCP_RR, TCP_CRR, flow setup) run everything on CPU 1: a transaction
# is a chain of wake-ups (client, bridge, back-end, server and back), and across CPUs each
# costs an inter-processor wake-up whose price in this VM varies from run to run (TCP_RR
# through passt-rs: 5,000-28,000 trans/s unpinned or split, 31,900 ±2 % on one CPU).
PIN=${PIN:-split}
if [ "$PIN" = split ] && [ "$(nproc)" -ge 2 ]; then
  TPUT=(taskset -c 0); LAT=(taskset -c 1); BE=(taskset -c 1)
else
  TPUT=(); LAT=(); BE=()
fi
# TIME_WAIT sockets the guest keeps at most. None of the back-ends sends TCP timestamps,
# so the guest can't reuse a local port still in TIME_WAIT (tcp_tw_reuse needs them): once
# CRR and the scale cases have used up half the port range within a minute, every connect()
# scans ~32000 ports (16 ms each, seen as a CRR rate falling 20-fold). Without the bucket
# the port is free at once.
TW_MAX=${TW_MAX:-4096}
REMOTE=198.51.100.1
T0=$(date +%s)
HZ=$(getconf CLK_TCK)

if [ "$SMOKE" = 1 ]; then
  DUR=1; UDUR=1; RRDUR=1; FLOWS="100"; PINGS=20; MEMDUR=0.5
else
  DUR=${DUR:-3}; UDUR=${UDUR:-2}; RRDUR=${RRDUR:-2}; FLOWS=${FLOWS:-"1000 10000"}; PINGS=200
  MEMDUR=${MEMDUR:-2}
fi
FLOW_LIMIT=${FLOW_LIMIT:-20}
BUSY_CPU=${BUSY_CPU:-0.25}; BUSY_RETRIES=${BUSY_RETRIES:-2}; BUSY_BUDGET=${BUSY_BUDGET:-60}
[ "$SMOKE" = 1 ] && BUSY_RETRIES=0

PIDS=()
HARNESS_ERRORS=0
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '[%4ds] %s\n' $(( $(date +%s) - T0 )) "$*" >&2; }
harness_error() { say "HARNESS ERROR: $*"; HARNESS_ERRORS=$((HARNESS_ERRORS + 1)); }
# Raw result: backend,mtu,case,rep,value,unit,cpu_s,bytes,other_cpu (see measured).
record() { echo "$1,$2,$3,$4,$5,$6,${7:-},${8:-},${OTHER:-}" >> "$CSV"; }
# Unsupported marker: value empty, unit is the reason. Once per run: a back-end's support is
# decided in the first repetition, and later ones would only repeat it.
unsupported() { [ "${REP:-1}" = 1 ] || return 0; echo "$1,$2,$3,,,unsupported: ${4//,/;},,," >> "$CSV"; }
# measured KEY CMD...: runs a measurement and sets OTHER to the CPUs that processes outside
# the benchmark took meanwhile (bench/cpuload.py): the machine is shared, and a repetition
# measured beside someone's compile is not comparable. If they took BUSY_CPU or more, the
# measurement runs again, up to BUSY_RETRIES times per case (KEY) and BUSY_BUDGET seconds
# of such runs in all, so a short burst of outside work costs a repetition, not the cell.
declare -A RETRIED=()
BUSY_SPENT=0
measured() {
  local key=$1 snap t0; shift
  while :; do
    snap=$(python3 "$HERE/cpuload.py" snap 2>/dev/null); t0=$(date +%s)
    "$@"
    OTHER=$(python3 "$HERE/cpuload.py" since "$snap" 2>/dev/null)
    awk -v o="${OTHER:-0}" -v b="$BUSY_CPU" 'BEGIN {exit !(o >= b)}' || return 0
    [ "${RETRIED[$key]:-0}" -lt "$BUSY_RETRIES" ] && [ "$BUSY_SPENT" -lt "$BUSY_BUDGET" ] || return 0
    RETRIED[$key]=$(( ${RETRIED[$key]:-0} + 1 ))
    BUSY_SPENT=$(( BUSY_SPENT + $(date +%s) - t0 ))
    echo "$key" >> "$RUN/busy-retries"
    say "$key: other processes used $OTHER CPUs meanwhile: measuring again"
  done
}

holder() { unshare -n sleep infinity </dev/null >/dev/null 2>&1 & HOLDER=$!; PIDS+=("$HOLDER"); }
nsg() { nsenter -t "$GUEST" -n -- "$@"; }
nsp() { nsenter -t "$PEER" -n -- "$@"; }
cpu_ticks() { # utime+stime of $1 and its threads, in ticks; 0 if gone
  local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  s=${s##*) }; set -- $s; echo $(( ${12} + ${13} ))
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
wait_for() { # seconds, command...: polls every 50 ms
  local n=$(( $1 * 20 )); shift
  while [ $n -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; n=$((n - 1)); done
  return 1
}
listening() { nsp ss -Hltn "sport = :$1" | grep -q .; }

# --- The fixed part: peer namespace, veth, addresses -------------------------------------

ulimit -n "$(ulimit -Hn)"
holder; PEER=$HOLDER
wait_for 5 test -e "/proc/$PEER/ns/net" || { harness_error "peer namespace"; exit 1; }
sleep 0.1
for ns in host peer; do
  run=(); [ $ns = peer ] && run=(nsenter -t "$PEER" -n --)
  "${run[@]}" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
    net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65000" >/dev/null
done
ip link add veth0 type veth peer name veth1 netns "/proc/$PEER/ns/net" || { harness_error "veth"; exit 1; }
nsp sh -ec "
  ip link set lo up
  ip addr add $REMOTE/32 dev lo
  ip addr add 2001:db8:ffff::1/128 dev lo
  ip link set veth1 up
  ip addr add 192.0.2.1/24 dev veth1
  ip addr add 2001:db8::1/64 dev veth1 nodad
  ip addr add fe80::1/64 dev veth1 nodad" || { harness_error "peer addresses"; exit 1; }
ip link set lo up
ip link set veth0 up
ip addr add 192.0.2.2/24 dev veth0
ip addr add 2001:db8::2/64 dev veth0 nodad
ip route add default via 192.0.2.1 dev veth0
ip -6 route add default via fe80::1 dev veth0
gid=$(awk '{print $1; exit}' /proc/self/gid_map)
echo "$gid $gid" > /proc/sys/net/ipv4/ping_group_range
printf 'nameserver 198.51.100.53\n' > "$RUN/resolv.conf"
mount --bind "$RUN/resolv.conf" /etc/resolv.conf 2>/dev/null || true

# Servers on the peer, for the whole run.
nsenter -t "$PEER" -n -- "${LAT[@]}" "$BIN/passt-rr" server --listen 0.0.0.0:12865 2>>"$RUN/rr-server.log" & PIDS+=($!)
wait_for 5 listening 12865 || { harness_error "passt-rr server did not start"; exit 1; }

# --- Measurements ---------------------------------------------------------------------------
# Each case function measures repetition $REP only (its loop over "$REP" runs once): the
# suite's outer loop is over repetitions (see the end), so a cell's repetitions lie minutes
# apart rather than seconds.

# One iperf3 run. $1: where the client runs (guest|host), $2: server address, rest: iperf3
# options. Prints "bits_per_second lost_percent bytes" or an error line starting with "ERR".
iperf() {
  local where=$1 addr=$2; shift 2
  local srvns=(nsenter -t "$PEER" -n --)
  [ "$addr" = 127.0.0.1 ] && srvns=()
  "${srvns[@]}" "${TPUT[@]}" iperf3 -s -1 -B "$addr" -p 5201 >/dev/null 2>&1 &
  local srv=$!; PIDS+=("$srv")
  if [ ${#srvns[@]} -eq 0 ]; then wait_for 5 sh -c 'ss -Hltn "sport = :5201" | grep -q .'
  else wait_for 5 listening 5201; fi || { echo "ERR iperf3 server did not start"; return; }
  local cli=()
  [ "$where" = guest ] && cli=(nsenter -t "$GUEST" -n --)
  "${cli[@]}" "${TPUT[@]}" timeout $(( DUR + 15 )) iperf3 -c "$addr" -p 5201 --connect-timeout 3000 -J "$@" \
    > "$RUN/iperf.json" 2> "$RUN/iperf.err"
  kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null
  python3 - "$RUN/iperf.json" <<'EOF'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception as e:
    # Warnings (e.g. "UDP block size exceeds TCP MSS") go to stderr, not into the JSON.
    err = open(sys.argv[1][:-5] + ".err").read().strip().replace(",", ";").replace("\n", " ")
    print("ERR no JSON from iperf3 (timed out?) " + err[:200]); sys.exit()
if j.get("error"):
    print("ERR " + j["error"].replace(",", ";")); sys.exit()
e = j["end"]
# The receiver's view. iperf3 3.12 gives UDP a sum_received too, so the protocol decides
# (older versions have only "sum" for UDP).
udp = j.get("start", {}).get("test_start", {}).get("protocol") == "UDP"
s = e.get("sum_received") or e["sum"]
print(s["bits_per_second"], s.get("lost_percent", 0) if udp else 0, s["bytes"])
EOF
}

# TCP/UDP throughput cases. $1 label, $2 mtu, $3 where, $4 server address, $5 back-end PID or
# empty. Sets TCP_OK=0 (and records "unsupported") when the first case cannot connect.
throughput() {
  local label=$1 mtu=$2 where=$3 addr=$4 bpid=$5
  local dir streams rep out c0 c1 cpu name ulen
  for dir in up down; do
    has_case tcp || break
    for streams in 1 4; do
      name="tcp_${dir}_P${streams}"
      [ "$TCP_OK" = 1 ] || { unsupported "$label" "$mtu" "$name" "$TCP_WHY"; continue; }
      for rep in $REP; do
        local extra=(); [ $dir = down ] && extra=(-R)
        c0=$(cpu_ticks "${bpid:-0}")
        measured "$label $mtu $name" eval 'out=$(iperf "$where" "$addr" -t "$DUR" -P "$streams" "${extra[@]}")'
        c1=$(cpu_ticks "${bpid:-0}")
        if [ "${out%% *}" = ERR ]; then
          if [ "$rep" = 1 ] && [ "$streams" = 1 ] && [ "$dir" = up ]; then
            TCP_OK=0; TCP_WHY="not supported by this back-end yet (${out#ERR })"
            say "$label mtu $mtu: TCP $TCP_WHY"
            unsupported "$label" "$mtu" "$name" "$TCP_WHY"
            continue 2
          fi
          say "$label mtu $mtu $name rep $rep: ${out#ERR }"
          record "$label" "$mtu" "$name" "$rep" "" "error: ${out#ERR }"
          continue
        fi
        set -- $out
        cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" 'BEGIN {printf "%.2f", (b - a) / hz}')
        [ -n "$bpid" ] || cpu=""
        record "$label" "$mtu" "$name" "$rep" "$(awk -v b="$1" 'BEGIN {printf "%.1f", b / 1e6}')" \
          Mbit/s "$cpu" "$3"
        say "$label mtu $mtu $name rep $rep: $(awk -v b="$1" 'BEGIN {printf "%.0f", b / 1e6}') Mbit/s${cpu:+, back-end CPU $cpu s}"
      done
    done
  done
  # UDP: iperf3's control connection is TCP, so this needs TCP too.
  ulen=1400; [ "$mtu" -gt 9000 ] && ulen=32000
  for dir in up down; do
    has_case udp || break
    name="udp_${dir}"
    [ "$TCP_OK" = 1 ] || { unsupported "$label" "$mtu" "$name" "iperf3 needs TCP for its control connection"; continue; }
    for rep in $REP; do
      local extra=(); [ $dir = down ] && extra=(-R)
      c0=$(cpu_ticks "${bpid:-0}")
      # -w: both ends' socket buffers. With the default (208 KiB) the receiving iperf3,
      # which shares CPU 0 with the sender, overflowed its socket: 18-43 % "loss" at MTU
      # 1500 that UdpRcvbufErrors placed in the receiver, not in the back-end.
      measured "$label $mtu $name" eval 'out=$(DUR=$UDUR iperf "$where" "$addr" -u -b "${UDP_RATE:-1G}" -l "$ulen" -w "${UDP_WINDOW:-4M}" -t "$UDUR" "${extra[@]}")'
      c1=$(cpu_ticks "${bpid:-0}")
      if [ "${out%% *}" = ERR ]; then
        say "$label mtu $mtu $name rep $rep: ${out#ERR }"
        record "$label" "$mtu" "$name" "$rep" "" "error: ${out#ERR }"
        continue
      fi
      set -- $out
      cpu=""; [ -n "$bpid" ] && cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" 'BEGIN {printf "%.2f", (b - a) / hz}')
      record "$label" "$mtu" "$name" "$rep" "$(awk -v b="$1" 'BEGIN {printf "%.1f", b / 1e6}')" Mbit/s "$cpu" "$3"
      record "$label" "$mtu" "${name}_loss" "$rep" "$2" "%"
      say "$label mtu $mtu $name rep $rep: $(awk -v b="$1" 'BEGIN {printf "%.0f", b / 1e6}') Mbit/s, loss $2 %"
    done
  done
}

# TCP_RR and TCP_CRR with passt-rr. $1 label, $2 mtu, $3 where.
rr_cases() {
  local label=$1 mtu=$2 where=$3 kind rep out cli=()
  [ "$where" = guest ] && cli=(nsenter -t "$GUEST" -n --)
  for kind in rr crr; do
    [ "$TCP_OK" = 1 ] || { unsupported "$label" "$mtu" "tcp_$kind" "$TCP_WHY"; continue; }
    # Warm-up, not recorded: the first connections after an attach grow the back-end's
    # tables and fault its memory in.
    "${cli[@]}" "${LAT[@]}" timeout 10 "$BIN/passt-rr" $kind --to "$REMOTE:12865" --seconds 0.5 >/dev/null 2>&1
    for rep in $REP; do
      measured "$label $mtu tcp_$kind" eval 'out=$("${cli[@]}" "${LAT[@]}" timeout $(( RRDUR + 10 )) "$BIN/passt-rr" $kind --to "$REMOTE:12865" --seconds "$RRDUR" 2>&1)'
      local tps lat
      tps=$(sed -n 's/.*trans_per_s=\([0-9.]*\).*/\1/p' <<<"$out")
      lat=$(sed -n 's/.*mean_us=\([0-9.]*\).*/\1/p' <<<"$out")
      if [ -z "$tps" ]; then
        say "$label tcp_$kind rep $rep: ${out//$'\n'/ }"
        record "$label" "$mtu" "tcp_$kind" "$rep" "" "error: ${out//[,$'\n']/ }"
        continue
      fi
      record "$label" "$mtu" "tcp_$kind" "$rep" "$tps" trans/s
      record "$label" "$mtu" "tcp_${kind}_lat" "$rep" "$lat" us
      say "$label tcp_$kind rep $rep: $tps trans/s, mean $lat us"
    done
  done
}

# ICMP echo round trip: the middle half of PINGS replies, each request sent as soon as the last
# reply is in (-A), as TCP_RR does: with requests 10 ms apart, every one of them found the
# CPUs asleep, and how long they took to wake (30-90 µs here, depending on what else ran)
# made most of the round trip. Not all replies: one that waited for a preempted process
# moves a mean of ~20 µs round trips by half. $1 label, $2 mtu, $3 where.
ping_case() {
  local label=$1 mtu=$2 where=$3 rep out avg cli=()
  [ "$where" = guest ] && cli=(nsenter -t "$GUEST" -n --)
  for rep in $REP; do
    measured "$label $mtu icmp" eval 'out=$("${cli[@]}" "${LAT[@]}" ping -n -A -c "$PINGS" -W 2 "$REMOTE" 2>&1)'
    # Mean of the middle half: ping prints whole microseconds, so a median would move in
    # 5 % steps.
    avg=$(sed -n 's/.* time=\([0-9.]*\) ms.*/\1/p' <<<"$out" | sort -g |
      awk '{v[NR] = $1} END {lo = int(NR / 4) + 1; hi = NR - int(NR / 4); for (i = lo; i <= hi; i++) s += v[i]; if (hi >= lo) printf "%.5f", s / (hi - lo + 1)}')
    if [ -z "$avg" ]; then
      record "$label" "$mtu" icmp_rtt "$rep" "" "error: ${out//[,$'\n']/ }"
      say "$label icmp rep $rep: no reply"
      continue
    fi
    record "$label" "$mtu" icmp_rtt "$rep" "$(awk -v a="$avg" 'BEGIN {printf "%.1f", a * 1000}')" us
    say "$label icmp rep $rep: $avg ms"
  done
}

# Idle flows: setup rate and back-end RSS while they are held. $1 label, $2 mtu, $3 back-end
# PID. A back-end that runs out of file descriptors or is slower than FLOW_LIMIT seconds gets
# "unsupported" with the reason (what it can't do here) and isn't asked again in later
# repetitions; anything else is an error.
declare -A NO_FLOWS=()
scale_cases() {
  local label=$1 mtu=$2 bpid=$3 n rss0 rss1 rate fds maxfds fdlim why
  fdlim=$(awk '/^Max open files/ {print $4}' "/proc/$bpid/limits" 2>/dev/null)
  for n in $FLOWS; do
    [ "$TCP_OK" = 1 ] || { unsupported "$label" "$mtu" "flows_$n" "$TCP_WHY"; continue; }
    [ -n "${NO_FLOWS[$label/$n]:-}" ] && continue
    rss0=$(rss_kib "$bpid"); rss1=""
    : > "$RUN/flows.out"
    local snap; snap=$(python3 "$HERE/cpuload.py" snap 2>/dev/null)
    nsenter -t "$GUEST" -n -- "${LAT[@]}" timeout $(( FLOW_LIMIT + 60 )) "$BIN/passt-rr" flows \
      --to "$REMOTE:12865" --count "$n" --hold 1 --limit "$FLOW_LIMIT" > "$RUN/flows.out" 2>&1 &
    local fp=$!; PIDS+=("$fp")
    # Until the flows are up (or the client gave up): the back-end's descriptors, to tell
    # "out of descriptors" from other failures.
    maxfds=0
    while kill -0 "$fp" 2>/dev/null && ! grep -q '^held' "$RUN/flows.out"; do
      fds=$(ls "/proc/$bpid/fd" 2>/dev/null | wc -l)
      [ "$fds" -gt "$maxfds" ] && maxfds=$fds
      sleep 0.25
    done
    grep -q '^held' "$RUN/flows.out" && rss1=$(rss_kib "$bpid")
    wait "$fp"
    OTHER=$(python3 "$HERE/cpuload.py" since "$snap" 2>/dev/null)
    rate=$(sed -n 's/.*setup_per_s=\([0-9.]*\).*/\1/p' "$RUN/flows.out")
    if [ -z "$rate" ] || [ -z "$rss1" ] || ! grep -q alive_after_hold=ok "$RUN/flows.out"; then
      why=$(tr ',\n' '  ' < "$RUN/flows.out")
      say "$label flows $n: $why (back-end peak $maxfds fds, limit ${fdlim:-?})"
      if [ -n "$fdlim" ] && [ "$fdlim" != unlimited ] && [ "$maxfds" -ge $(( fdlim - 16 )) ]; then
        unsupported "$label" "$mtu" "flows_$n" "back-end at its open-file limit ($maxfds of $fdlim descriptors; RLIMIT_NOFILE here) at: $why"
        NO_FLOWS[$label/$n]=1
      elif grep -q "flows in [0-9.]* s" "$RUN/flows.out"; then
        unsupported "$label" "$mtu" "flows_$n" "setup slower than the ${FLOW_LIMIT} s limit: $why"
        NO_FLOWS[$label/$n]=1
      else
        record "$label" "$mtu" "flows_$n" "$REP" "" "error: $why"
      fi
    else
      record "$label" "$mtu" "flows_${n}_setup" "$REP" "$rate" flows/s
      record "$label" "$mtu" "flows_${n}_rss" "$REP" "$rss1" KiB
      record "$label" "$mtu" "flows_${n}_rss_delta" "$REP" "$(( rss1 - rss0 ))" KiB
      say "$label flows $n: $rate flows/s, back-end RSS $rss0 -> $rss1 KiB"
    fi
  done
}

# --- Back-ends -----------------------------------------------------------------------------

BACKEND_PID=""; BRIDGE_PID=""; GUEST=""
detach() {
  local p
  for p in $BRIDGE_PID $BACKEND_PID $GUEST; do kill "$p" 2>/dev/null; done
  for p in $BRIDGE_PID $BACKEND_PID $GUEST; do wait "$p" 2>/dev/null; done
  BACKEND_PID=""; BRIDGE_PID=""; GUEST=""
  rm -f "$RUN"/*.sock "$RUN/ready"
}

# Starts back-end $1 for MTU $2 with a fresh guest namespace; returns non-zero when it
# cannot be attached (the reason is in ATTACH_WHY).
attach() {
  local be=$1 mtu=$2 sock="$RUN/be.sock" mode bin
  ATTACH_WHY=""
  holder; GUEST=$HOLDER
  wait_for 5 test -e "/proc/$GUEST/ns/net"
  sleep 0.05
  nsg sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65000" \
    net.ipv4.tcp_max_tw_buckets="$TW_MAX" net.ipv6.conf.all.disable_ipv6=1 >/dev/null
  nsg ip link set lo up
  case $be in
    rs-vhost) bin="$BIN/passt"; mode=vhost ;;
    rs-stream) bin="$BIN/passt"; mode=stream ;;
    debian-passt) bin=/usr/bin/passt; mode=stream ;;
    compare) bin=$PASST_COMPARE; mode=stream; [ "${PASST_COMPARE_VHOST:-0}" = 1 ] && mode=vhost ;;
    slirp4netns) mode=slirp ;;
  esac
  if [ $mode = slirp ]; then
    "${BE[@]}" slirp4netns --configure --mtu="$mtu" --disable-host-loopback "$GUEST" tap0 \
      > "$RUN/$be.log" 2>&1 &
    BACKEND_PID=$!; PIDS+=("$BACKEND_PID")
    wait_for 10 sh -c "nsenter -t $GUEST -n -- ip -4 addr show dev tap0 | grep -q inet" ||
      { ATTACH_WHY="slirp4netns did not configure tap0: $(tail -3 "$RUN/$be.log")"; return 1; }
    nsg ip link set tap0 txqueuelen 10000 # as for the bridge's tap, below
    return 0
  fi
  local vh=(); [ $mode = vhost ] && vh=(--vhost-user)
  "${BE[@]}" "$bin" -f -q -4 -s "$sock" -m "$mtu" "${vh[@]}" > "$RUN/$be.log" 2>&1 &
  BACKEND_PID=$!; PIDS+=("$BACKEND_PID")
  wait_for 10 test -S "$sock" || { ATTACH_WHY="no socket from $bin: $(tail -3 "$RUN/$be.log")"; return 1; }
  local bm=(--stream "$sock"); [ $mode = vhost ] && bm=(--vhost-user "$sock")
  nsenter -t "$GUEST" -n -- "${BE[@]}" "$BIN/passt-bridge" --tap tap0 "${bm[@]}" --ready "$RUN/ready" > "$RUN/$be-bridge.log" 2>&1 &
  BRIDGE_PID=$!; PIDS+=("$BRIDGE_PID")
  wait_for 10 test -e "$RUN/ready" || { ATTACH_WHY="bridge did not attach: $(tail -3 "$RUN/$be-bridge.log")"; return 1; }
  # A VM's virtio-net stops its queue when the ring is full; a tap drops beyond txqueuelen
  # (1000), which at MTU 1500 a window of 1.5 MB overruns: drops the bridge would not cause.
  nsg ip link set tap0 mtu "$mtu" txqueuelen 10000 up || { ATTACH_WHY="tap0 mtu $mtu"; return 1; }
  nsg busybox udhcpc -i tap0 -s "$HERE/udhcpc.script" -f -q -n -t 5 -T 1 > "$RUN/$be-dhcp.log" 2>&1 ||
    { ATTACH_WHY="DHCP failed: $(tail -2 "$RUN/$be-dhcp.log")"; return 1; }
  return 0
}

required() { case $1 in rs-vhost|rs-stream) return 0 ;; *) return 1 ;; esac; }

label_of() {
  case $1 in
    rs-vhost) echo passt-rs-vhost ;; rs-stream) echo passt-rs-stream ;;
    debian-passt) echo passt-debian ;; compare) echo compare ;; *) echo "$1" ;;
  esac
}

available() {
  case $1 in
    slirp4netns) command -v slirp4netns >/dev/null ;;
    debian-passt) [ -x /usr/bin/passt ] ;;
    compare) [ -n "${PASST_COMPARE:-}" ] && [ -x "$PASST_COMPARE" ] ;;
    *) [ -x "$BIN/passt" ] ;;
  esac
}

# --- References: no back-end ----------------------------------------------------------------

# How steady the machine was: memory copy bandwidth on the throughput CPU, which nothing but
# the machine moves.
memory_ref() {
  local out
  measured "ref-machine memcpy" eval 'out=$("${TPUT[@]}" python3 "$HERE/membw.py" "$MEMDUR")'
  if [ -z "$out" ]; then harness_error "memory reference: no result"; return; fi
  record ref-machine - memcpy "$REP" "$out" GB/s
  say "ref-machine memcpy rep $REP: $out GB/s"
}

references() {
  local r addr streams rep out
  for r in loopback veth; do
    addr=$REMOTE; [ $r = loopback ] && addr=127.0.0.1
    for streams in 1 4; do
      for rep in $REP; do
        measured "ref-$r tcp_up_P$streams" eval 'out=$(iperf host "$addr" -t "$DUR" -P "$streams")'
        if [ "${out%% *}" = ERR ]; then harness_error "reference $r: ${out#ERR }"; continue; fi
        set -- $out
        record "ref-$r" - "tcp_up_P$streams" "$rep" "$(awk -v b="$1" 'BEGIN {printf "%.1f", b / 1e6}')" Mbit/s "" "$3"
        say "ref-$r tcp P$streams rep $rep: $(awk -v b="$1" 'BEGIN {printf "%.0f", b / 1e6}') Mbit/s"
      done
    done
  done
  has_case rr && rr_cases ref-veth - host
  memory_ref
}

# One repetition of every case of back-end $1: both MTUs, each with a fresh guest namespace.
# Per back-end, decided in the first repetition and kept for the others: whether it is
# available, can attach at an MTU, carries TCP (TCP_OK_OF, TCP_WHY_OF), and how many idle
# flows it can hold (NO_FLOWS).
declare -A TCP_OK_OF=() TCP_WHY_OF=() NO_ATTACH=()
backend_rep() {
  local be=$1 label first mtu out
  label=$(label_of "$be")
  if ! available "$be"; then
    if [ "$REP" = 1 ]; then
      say "$label: not available here, skipped"
      echo "$label,-,available,,,unsupported: not installed or not set,,," >> "$CSV"
    fi
    return
  fi
  TCP_OK=${TCP_OK_OF[$be]:-1}; TCP_WHY=${TCP_WHY_OF[$be]:-}
  first=1
  for mtu in $MTUS; do
    [ -n "${NO_ATTACH[$be/$mtu]:-}" ] && continue
    # slirp4netns caps its MTU at 65520 as well; every back-end gets both MTUs.
    say "$label: attaching (guest MTU $mtu, repetition $REP)"
    if ! attach "$be" "$mtu"; then
      if required "$be"; then harness_error "$label: $ATTACH_WHY"
      else say "$label: cannot attach: $ATTACH_WHY"; fi
      if [ "$REP" = 1 ]; then
        echo "$label,$mtu,attach,,,unsupported: ${ATTACH_WHY//[,$'\n']/ },,," >> "$CSV"
        NO_ATTACH[$be/$mtu]=1
      fi
      detach
      continue
    fi
    say "$label: attached (back-end PID $BACKEND_PID, RSS $(rss_kib "$BACKEND_PID") KiB)"
    if [ -n "${BENCH_HOOK:-}" ]; then
      # Debugging: run a command with the back-end attached instead of the cases.
      # Evaluated here (in a subshell): it may call the case functions, e.g.
      # BENCH_HOOK='rr_cases $label $mtu guest'.
      ( export GUEST PEER BACKEND_PID BIN RUN; eval "$BENCH_HOOK" )
      detach; continue
    fi
    if [ $first = 1 ] && [ "$REP" = 1 ]; then
      OTHER="" record "$label" - rss_idle 1 "$(rss_kib "$BACKEND_PID")" KiB
      # Can it carry TCP at all? Otherwise every TCP case is "not supported".
      if ! out=$(nsg "${LAT[@]}" timeout 10 "$BIN/passt-rr" rr --to "$REMOTE:12865" --seconds 0.2 2>&1); then
        TCP_OK=0; TCP_WHY="not supported by this back-end yet (${out//[,$'\n']/ })"
        say "$label: TCP $TCP_WHY"
      fi
    fi
    if [ $first = 1 ] && has_case icmp; then
      ping_case "$label" "$mtu" guest
      if required "$be" && ! grep -q "^$label,$mtu,icmp_rtt,[0-9]*,[0-9]" "$CSV"; then
        harness_error "$label: no ICMP echo reply through the back-end"
      fi
    fi
    [ $first = 1 ] && has_case rr && rr_cases "$label" "$mtu" guest
    throughput "$label" "$mtu" guest "$REMOTE" "$BACKEND_PID"
    # Last: closing thousands of flows takes a while (slirp4netns: over 20 s for 6,000),
    # and the back-end goes with them. In every repetition: one setup of 1,000 flows takes
    # 0.2 s, too short to say much alone (±17-21 % from run to run).
    [ $first = 1 ] && has_case scale && scale_cases "$label" "$mtu" "$BACKEND_PID"
    first=0
    detach
  done
  TCP_OK_OF[$be]=$TCP_OK; TCP_WHY_OF[$be]=$TCP_WHY
}

# Repetitions outermost: each visits the references and every back-end once, so a slow
# minute of the machine (its DRAM copy bandwidth fell from 17.9 to 8.3 GB/s within one run)
# lands in one repetition of many cells rather than in every repetition of a few, and each
# cell's mean samples the whole run.
[ -n "${BENCH_HOOK:-}" ] && REPS=1
for REP in $(seq 1 "$REPS"); do
  say "repetition $REP of $REPS"
  TCP_OK=1; TCP_WHY=""
  has_case ref && references
  for be in $BACKENDS; do backend_rep "$be"; done
done

say "done in $(( $(date +%s) - T0 )) s ($BUSY_SPENT s measuring again while the machine was busy), harness errors: $HARNESS_ERRORS"
[ "$HARNESS_ERRORS" = 0 ]
