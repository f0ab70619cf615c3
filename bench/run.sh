#!/usr/bin/env bash
# bench/run.sh: the benchmark suite's one entry command. See bench/README.md.
#
#   bench/run.sh            full run (3 repetitions, ~5 s per case), results in bench/results/
#   bench/run.sh --smoke    ~1 s per case, one repetition, no thresholds: checks the harness
#
# Environment: PASST_COMPARE=/path/to/passt (another passt-compatible binary, stream mode;
# PASST_COMPARE_VHOST=1 for vhost-user), BACKENDS="rs-vhost rs-stream debian-passt slirp4netns
# compare" (subset), MTUS="65520 1500", REPS=3, CARGO_TARGET_DIR.
#
# Everything runs in namespaces created here with unshare (user, network, mount): the real
# network is never touched.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=0
for a in "$@"; do
  case $a in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

say() { echo "bench: $*" >&2; }

# Tools: iperf3, busybox (udhcpc), ping, ss, python3 (results), gnuplot (plots), slirp4netns
# and Debian's passt (compared back-ends).
packages=(iperf3 busybox-static iputils-ping iproute2 util-linux python3 gnuplot-nox slirp4netns passt procps)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -q >/dev/null
  "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
say "building release (passt, passt-bridge, passt-rr) into $TARGET"
(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --workspace --bins -q)
BIN=$TARGET/release

RUN=$(mktemp -d /tmp/passt-bench.XXXXXX)
trap 'rm -rf "$RUN"' EXIT
if [ $SMOKE = 1 ]; then
  OUT=$RUN/results; REPS=${REPS:-1}
else
  OUT=${BENCH_OUT:-$ROOT/bench/results}; REPS=${REPS:-3}
fi
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
CSV=$OUT/raw-$STAMP.csv
echo "backend,mtu,case,rep,value,unit,backend_cpu_s,bytes,other_cpu" > "$CSV"

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "cpu: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1) x $(nproc)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "kernel: $(uname -r)"
  echo "passt-rs: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
  echo "passt (Debian): $(dpkg-query -W -f='${Version}' passt 2>/dev/null || echo none)"
  echo "slirp4netns: $(slirp4netns --version 2>/dev/null | head -1 || echo none)"
  echo "iperf3: $(iperf3 --version | head -1)"
  [ -n "${PASST_COMPARE:-}" ] && echo "compare: $PASST_COMPARE"
  echo "mode: $([ $SMOKE = 1 ] && echo smoke || echo full), repetitions: $REPS"
} > "$OUT/machine-$STAMP.txt"

say "running the suite in fresh namespaces (scratch $RUN)"
start=$(date +%s)
rc=0
BIN=$BIN RUN=$RUN CSV=$CSV SMOKE=$SMOKE REPS=$REPS PASST_COMPARE=${PASST_COMPARE:-} \
  unshare -Urnm --propagation private bash "$ROOT/bench/suite.sh" || rc=$?
say "suite finished in $(( $(date +%s) - start )) s (exit $rc)"
{
  echo "suite duration: $(( $(date +%s) - start )) s"
  echo "repetitions measured again because other processes were busy: $(cat "$RUN/busy-retries" 2>/dev/null | wc -l)"
} >> "$OUT/machine-$STAMP.txt"

python3 "$ROOT/bench/report.py" "$CSV" "$OUT/machine-$STAMP.txt" "$OUT" "$STAMP" || rc=1
if [ $SMOKE = 0 ]; then
  # Spread across runs, not only within this one: this run beside the two full runs before
  # it in $OUT (whatever their code: compare.py names each run's version and outside load).
  full=()
  for m in "$OUT"/machine-*.txt; do
    r=$(dirname "$m")/raw-$(basename "$m" .txt | sed 's/^machine-//').csv
    grep -q '^mode: full' "$m" && [ -f "$r" ] && full+=("$r")
  done
  if [ ${#full[@]} -ge 2 ]; then
    last=("${full[@]: -3}")
    {
      printf '\n## Across the last %d full runs\n\n' ${#last[@]}
      python3 "$ROOT/bench/compare.py" "${last[@]}"
    } > "$RUN/across.md" && cat "$RUN/across.md" >> "$OUT/results-$STAMP.md"
    cp "$OUT/results-$STAMP.md" "$OUT/latest.md"
    grep '^- ' "$RUN/across.md" | sed 's/^- /bench: across the last runs: /' >&2
  fi
  cp "$CSV" "$OUT/latest.csv"
  say "results: $OUT/results-$STAMP.md (also latest.md, latest.csv, *.png)"
else
  cat "$OUT/results-$STAMP.md"
fi
exit $rc
