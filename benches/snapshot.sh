#!/usr/bin/env bash
# Snapshot engine benchmarks, in one run on this machine:
#   1. change-tracking overhead: the nbd-peers fio rows against blockd with
#      tracking on and off (--no-change-tracking), interleaved per row;
#   2. freeze pause: a group of 4 volumes under fio 4k random writes, 100
#      group freezes; p50/p99/max of the I/O pause blockd measures;
#   3. copy-on-write cost: 4k random-write IOPS with a snapshot held vs not.
#
# Usage: benches/snapshot.sh      Env: BENCH_RUNTIME (seconds per fio job,
# default 8), BENCH_FREEZES (default 100), BENCH_TMPDIR (default /var/tmp),
# BENCH_CONTROL=1 (A/A run: tracking on for both columns), BENCH_PARTS
# (which parts to run, default 123), BENCH_COW_ROUNDS (default 6), BLOCKD_BIN
# (default target/release/blockd: another build to compare).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runtime=${BENCH_RUNTIME:-8}
freezes=${BENCH_FREEZES:-100}
blockd_bin=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_bin=$repo/target/release/blockctl
python=python3
[[ -x /usr/bin/python3 ]] && python=/usr/bin/python3
[[ -x $blockd_bin && -x $blockctl_bin ]] || { echo "run cargo build --release first" >&2; exit 1; }
command -v fio >/dev/null || { echo "fio missing (apt-get install fio)" >&2; exit 1; }

tmp=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/snapbench.XXXXXX")
pids=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT INT TERM

# start_blockd NAME [ARGS...]: a daemon with state in $tmp/NAME.
start_blockd() {
    local name=$1
    shift
    "$blockd_bin" --state-dir "$tmp/$name" "$@" >"$tmp/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 200); do
        [[ -S $tmp/$name/api.sock && -S $tmp/$name/nbd.sock ]] && return 0
        sleep 0.05
    done
    echo "blockd $name did not start:" >&2
    cat "$tmp/$name.log" >&2
    exit 1
}
ctl() { local name=$1; shift; "$blockctl_bin" --socket "$tmp/$name/api.sock" "$@"; }
uri() { echo "nbd+unix:///$2?socket=$tmp/$1/nbd.sock"; }

# fio_metric URI RW BS QD: GiB/s for 1M rows, k IOPS for 4k rows.
fio_metric() {
    local out=$tmp/fio.json
    fio --name=b --ioengine=nbd --uri="$1" --size=1G --rw="$2" --bs="$3" --iodepth="$4" \
        --norandommap --time_based --runtime="$runtime" --output-format=json >"$out" 2>/dev/null
    "$python" - "$out" "$2" "$3" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
d = job["write" if "write" in sys.argv[2] else "read"]
print("%.2f" % (d["bw_bytes"] / 2**30) if sys.argv[3] == "1M" else "%.1f" % (d["iops"] / 1000))
PY
}

prefill() { fio --name=p --ioengine=nbd --uri="$1" --size=1G --rw=write --bs=1M --iodepth=8 >/dev/null 2>&1; }

parts=${BENCH_PARTS:-123}
echo "blockd snapshot benchmarks: runtime ${runtime}s per fio job, $(nproc) CPUs, fio $(fio --version | sed 's/fio-//')"
echo

# 1. Tracking overhead. One volume file serves both sides: the daemon is
# restarted on the same state dir with tracking on or off, in the order
# on, off, off, on per row, and each figure is the mean of its two runs.
# (Two daemons with a file each differ by up to 15% with tracking on in
# both: file placement, not tracking.) BENCH_CONTROL=1 keeps tracking on
# for both columns, an A/A run that shows the noise.
track_pid=
track_start() {
    local args=()
    [[ $1 == off && ${BENCH_CONTROL:-0} != 1 ]] && args=(--no-change-tracking)
    "$blockd_bin" --state-dir "$tmp/track" "${args[@]}" >>"$tmp/track.log" 2>&1 &
    track_pid=$!
    pids+=($!)
    for _ in $(seq 200); do
        [[ -S $tmp/track/api.sock && -S $tmp/track/nbd.sock ]] && return 0
        sleep 0.05
    done
    cat "$tmp/track.log" >&2
    exit 1
}
track_stop() {
    kill -TERM "$track_pid"
    wait "$track_pid" 2>/dev/null || true
}
if [[ $parts == *1* ]]; then
track_start on
ctl track volume create bench --size 1G >/dev/null
prefill "$(uri track bench)"
track_stop
echo "| row | tracking on | tracking off | on / off |"
echo "|---|---:|---:|---:|"
for row in "1M seq write QD8 (GiB/s)|write|1M|8" "1M seq read QD8 (GiB/s)|read|1M|8" \
           "4k rand write QD32 (k IOPS)|randwrite|4k|32" "4k rand read QD32 (k IOPS)|randread|4k|32"; do
    IFS='|' read -r label rw bs qd <<<"$row"
    declare -A sum=([on]=0 [off]=0)
    for mode in on off off on; do
        track_start "$mode"
        v=$(fio_metric "$(uri track bench)" "$rw" "$bs" "$qd")
        track_stop
        sum[$mode]=$("$python" -c "print(${sum[$mode]} + $v)")
    done
    "$python" -c "a=${sum[on]}/2; b=${sum[off]}/2; print('| $label | %.2f | %.2f | %.3fx |' % (a, b, a / b))"
done
echo
fi

# 2. Freeze pause under load.
if [[ $parts == *2* ]]; then
start_blockd group
for v in v1 v2 v3 v4; do ctl group volume create "$v" --size 1G >/dev/null; done
loaders=()
for v in v1 v2 v3 v4; do
    fio --name=l --ioengine=nbd --uri="$(uri group "$v")" --size=1G --rw=randwrite --bs=4k \
        --iodepth=32 --norandommap --time_based --runtime=3600 >/dev/null 2>&1 &
    loaders+=($!)
    pids+=($!)
done
sleep 2
: >"$tmp/pauses"
for i in $(seq "$freezes"); do
    ctl group -j snapshot create v1 v2 v3 v4 --name "f$i" |
        "$python" -c 'import json,sys; print(json.load(sys.stdin)[0]["pause_us"])' >>"$tmp/pauses"
    for v in v1 v2 v3 v4; do ctl group snapshot delete "$v@f$i" >/dev/null; done
done
for p in "${loaders[@]}"; do kill "$p" 2>/dev/null || true; done
"$python" - "$tmp/pauses" <<'PY'
import sys
p = sorted(int(x) for x in open(sys.argv[1]))
q = lambda f: p[min(len(p) - 1, int(round(f * (len(p) - 1))))] / 1000
print("| freeze pause, 4-volume group, 4 x fio 4k randwrite QD32 | n=%d |" % len(p))
print("|---|---:|")
print("| p50 | %.3f ms |" % q(0.50))
print("| p99 | %.3f ms |" % q(0.99))
print("| max | %.3f ms |" % (p[-1] / 1000))
PY
echo
fi

# 3. Copy-on-write cost. Each round writes with no snapshot, then freezes
# and writes again (every first write to an extent is then copied), then
# deletes the snapshot. One more run with no snapshot closes the last
# round, and each held run is compared with the mean of the runs with no
# snapshot just before and just after it, so drift over the run (the host,
# background writeback) weighs on both columns alike; the figures are
# means over the rounds. The last column is the share of a CPU blockd used
# in each phase (kernel-notes/README.md, "Copy-on-write").
if [[ $parts == *3* ]]; then
start_blockd cow
ctl cow volume create bench --size 1G >/dev/null
prefill "$(uri cow bench)"
rounds=${BENCH_COW_ROUNDS:-6}
cow_pid=${pids[-1]}
# cpu_mark: blockd's CPU ticks and the wall clock; cpu_since MARK: the
# share of a CPU blockd used since MARK. Its connection's one reader
# thread serves these writes, so near 1.0 means that thread is the limit.
cpu_mark() { echo "$(awk '{print $14 + $15}' "/proc/$cow_pid/stat") $(date +%s.%N)"; }
cpu_since() {
    local now
    now=$(cpu_mark)
    "$python" -c "a, b, c, d = map(float, '$1 $now'.split()); print('%.2f' % ((c - a) / $(getconf CLK_TCK) / (d - b)))"
}
echo "| 4k rand write QD32 (k IOPS), round | no snapshot (before, after) | snapshot held | held / none | blockd CPU (none after / held) |"
echo "|---|---:|---:|---:|---:|"
psum=0
hsum=0
before=$(fio_metric "$(uri cow bench)" randwrite 4k 32)
for r in $(seq "$rounds"); do
    ctl cow snapshot create bench --name "held$r" >/dev/null
    mark=$(cpu_mark)
    held=$(fio_metric "$(uri cow bench)" randwrite 4k 32)
    cpu_held=$(cpu_since "$mark")
    cow=$(ctl cow -j snapshot inspect "bench@held$r" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["cow_bytes"] >> 20)')
    ctl cow snapshot delete "bench@held$r" >/dev/null
    mark=$(cpu_mark)
    after=$(fio_metric "$(uri cow bench)" randwrite 4k 32)
    cpu_after=$(cpu_since "$mark")
    plain=$("$python" -c "print('%.1f' % (($before + $after) / 2))")
    echo "| first ${runtime}s after freeze $r (${cow} MiB preserved) | $plain ($before, $after) | $held | $("$python" -c "print('%.3fx' % ($held / $plain))") | $cpu_after / $cpu_held |"
    psum=$("$python" -c "print($psum + $plain)")
    hsum=$("$python" -c "print($hsum + $held)")
    before=$after
done
echo "| mean of $rounds | $("$python" -c "print('%.1f' % ($psum / $rounds))") | $("$python" -c "print('%.1f' % ($hsum / $rounds))") | $("$python" -c "print('%.3fx' % ($hsum / $psum))") | |"
fi
