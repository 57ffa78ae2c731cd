#!/usr/bin/env bash
# Benchmark blockd against two established NBD servers, qemu-nbd and nbdkit's
# file plugin, in one run on this machine, so the numbers share hardware,
# kernel, page cache state and fio version.
#
# Every server exports a 1 GiB file on an ext4 temp dir through a Unix socket
# and fio's nbd engine (libnbd) drives it. Output: a markdown table.
#
# Usage: benches/nbd-peers.sh
# Env:
#   BENCH_RUNTIME     seconds per fio job (default 10)
#   BENCH_REPEAT      rounds per row, server order rotating (default 2)
#   BLOCKD_IO_ENGINE  threads|uring|auto, passed through to blockd
#   BLOCKD_BIN, BLOCKCTL_BIN  binaries (default target/release/{blockd,blockctl})
#   BENCH_TMPDIR      parent of the temp dir (default /var/tmp)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runtime=${BENCH_RUNTIME:-10}
blockd_bin=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_bin=${BLOCKCTL_BIN:-$repo/target/release/blockctl}
python=python3
[[ -x /usr/bin/python3 ]] && python=/usr/bin/python3

die() { echo "nbd-peers: $*" >&2; exit 1; }

[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME must be a positive number of seconds"
for tool in fio qemu-nbd nbdkit "$python"; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install fio qemu-utils nbdkit python3)"
done
[[ -x $blockd_bin && -x $blockctl_bin ]] ||
    die "blockd binaries missing: run 'cargo build --release' in $repo"
# fio only lists engines it was built with; without libnbd support every row
# would fail far into the run.
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"

# /var/tmp rather than a possible tmpfs /tmp: the files must live on a real
# disk like blockd's volumes would. The path stays short because Unix socket
# paths are limited to 108 bytes.
tmp=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/nbd-peers.XXXXXX")
pids=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # SIGTERM first so blockd exercises its clean shutdown path; SIGKILL
    # anything still around after a few seconds so the script never hangs.
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_socket NAME PID SOCKET LOG: the socket file can exist a moment before
# the server listens, so once it is there, probe with the start of an NBD
# handshake and end it politely with NBD_OPT_ABORT (a bare connect-and-close
# makes nbdkit log a broken pipe). Bail out with the server's log if it dies.
wait_socket() {
    local name=$1 pid=$2 sock=$3 log=$4
    for _ in $(seq 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$log" >&2
            die "$name exited during startup"
        fi
        if [[ -S $sock ]] && "$python" - "$sock" 2>/dev/null <<'EOF'; then
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
hello = b""
while len(hello) < 18:
    chunk = s.recv(18 - len(hello))
    if not chunk:
        sys.exit(1)
    hello += chunk
if hello[:16] != b"NBDMAGICIHAVEOPT":
    sys.exit(1)
# Client flags: fixed newstyle (+ no zeroes if offered), then OPT_ABORT.
flags = struct.unpack(">H", hello[16:])[0] & 3
s.sendall(struct.pack(">I", flags) + b"IHAVEOPT" + struct.pack(">II", 2, 0))
try:
    s.recv(20)
except OSError:
    pass
EOF
            return 0
        fi
        sleep 0.1
    done
    cat "$log" >&2
    die "$name: no socket at $sock after 30s"
}

# --- blockd -----------------------------------------------------------------
# Pin the log level: the engine is read from the "blockd ready" info line.
mkdir -m 700 "$tmp/blockd"
BLOCKD_LOG=info "$blockd_bin" --state-dir "$tmp/blockd" </dev/null 2>"$tmp/blockd.log" &
pids+=($!)
wait_socket blockd "$!" "$tmp/blockd/nbd.sock" "$tmp/blockd.log"
BLOCKD_SOCKET=$tmp/blockd/api.sock "$blockctl_bin" volume create bench --size 1G >/dev/null
engine=$(sed -n 's/.*blockd ready.*io_engine="\{0,1\}\([a-z_]*\).*/\1/p' "$tmp/blockd.log" | head -n1)
[[ -n $engine ]] || engine="unknown (no 'blockd ready ... io_engine=' line in log)"

# --- peers ------------------------------------------------------------------
# Same starting point as a fresh blockd volume: a sparse 1 GiB file. Both
# peers use buffered I/O through the page cache, as blockd does.
truncate -s 1G "$tmp/qemu.img" "$tmp/nbdkit.img"

# -t keeps the server up across fio runs and -e 8 allows several clients at
# once (libnbd, the readiness probe); writeback cache + thread pool is its
# default buffered setup and needs no io_uring.
qemu-nbd -f raw -k "$tmp/qemu.sock" --cache=writeback --aio=threads -t -e 8 \
    "$tmp/qemu.img" </dev/null 2>"$tmp/qemu-nbd.log" &
pids+=($!)
wait_socket qemu-nbd "$!" "$tmp/qemu.sock" "$tmp/qemu-nbd.log"

# -f keeps nbdkit in the foreground so $! is the server; --exit-with-parent
# is a second line of defence if this script is SIGKILLed. nbdkit accepts any
# export name and uses its default thread count (16).
nbdkit -f --exit-with-parent -U "$tmp/nbdkit.sock" file "$tmp/nbdkit.img" \
    </dev/null 2>"$tmp/nbdkit.log" &
pids+=($!)
wait_socket nbdkit "$!" "$tmp/nbdkit.sock" "$tmp/nbdkit.log"

servers=(blockd qemu-nbd nbdkit)
declare -A uri=(
    [blockd]="nbd+unix:///bench?socket=$tmp/blockd/nbd.sock"
    [qemu-nbd]="nbd+unix:///?socket=$tmp/qemu.sock"
    [nbdkit]="nbd+unix:///?socket=$tmp/nbdkit.sock"
)

# run_fio SERVER OUT ARGS...: one fio job against SERVER, JSON into OUT. The
# JSON goes to a file because fio may print warnings on stdout.
run_fio() {
    local server=$1 out=$2
    shift 2
    if ! fio --name=bench --ioengine=nbd --uri="${uri[$server]}" --size=1G \
        --output-format=json --output="$out" "$@" >"$out.stdout" 2>"$out.stderr"; then
        cat "$out.stderr" "$out.stdout" >&2
        die "fio failed against $server"
    fi
}

# Write every byte once before measuring, the same way through NBD for all
# three servers (blockd's volume file is only reachable that way): reads then
# hit real data instead of holes, and writes overwrite allocated blocks. The
# sync keeps one server's dirty pages from being flushed during another's run.
for s in "${servers[@]}"; do
    echo "prefill $s" >&2
    run_fio "$s" "$tmp/prefill-$s.json" --rw=write --bs=1M --iodepth=8
done
sync

# Label | side of the JSON (read/write) | unit | fio args. Time-based so every
# row runs the same wall time however fast the server is; random rows keep
# fio's default fixed seed so all servers see the same offsets, and skip the
# random map, which costs fio CPU the servers would otherwise get.
rows=(
    "1M seq write QD8 (GiB/s)|write|gib|--rw=write --bs=1M --iodepth=8"
    "1M seq read QD8 (GiB/s)|read|gib|--rw=read --bs=1M --iodepth=8"
    "4k rand write QD32 (k IOPS)|write|kiops|--rw=randwrite --bs=4k --iodepth=32 --norandommap"
    "4k rand read QD32 (k IOPS)|read|kiops|--rw=randread --bs=4k --iodepth=32 --norandommap"
    "4k write + FLUSH QD1 (k IOPS)|write|kiops|--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --norandommap"
)
# BENCH_ROWS=0,4 runs only those rows (numbered from 0 as listed above).
if [[ -n ${BENCH_ROWS:-} ]]; then
    picked=()
    IFS=',' read -ra want <<<"$BENCH_ROWS"
    for i in "${want[@]}"; do
        [[ $i =~ ^[0-9]+$ && $i -lt ${#rows[@]} ]] || die "BENCH_ROWS: no row $i (0-$((${#rows[@]} - 1)))"
        picked+=("${rows[$i]}")
    done
    rows=("${picked[@]}")
fi

# Servers run in turn inside each row (not row by row per server) so drift
# over the run, e.g. background writeback, spreads evenly across them. With
# BENCH_REPEAT=N (default 2) each row runs N rounds, the server order
# rotating every round so no server is always first after the sync, and
# each figure is the mean of its rounds; a second table lists every round,
# so a swing of one round shows.
repeat=${BENCH_REPEAT:-2}
[[ $repeat =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPEAT must be a positive number"
results=()
per_round=()
flush_lat=()
for i in "${!rows[@]}"; do
    IFS='|' read -r label dir unit args <<<"${rows[$i]}"
    declare -A sum=() each=()
    for s in "${servers[@]}"; do sum[$s]=0; each[$s]=; done
    for ((round = 0; round < repeat; round++)); do
        k=$((round % ${#servers[@]}))
        order=("${servers[@]:k}" "${servers[@]:0:k}")
        for s in "${order[@]}"; do
            echo "$label: $s (round $((round + 1)))" >&2
            out=$tmp/row$i-$s-$round.json
            # shellcheck disable=SC2086 # args is a word list on purpose
            run_fio "$s" "$out" $args --time_based --runtime="$runtime"
            v=$("$python" - "$out" "$dir" "$unit" <<'EOF'
import json, sys
path, side, unit = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
if job["error"]:
    sys.exit(f"fio job error {job['error']}")
r = job[side]
print(r["bw_bytes"] / 2**30 if unit == "gib" else r["iops"] / 1000)
EOF
            )
            sum[$s]=$("$python" -c "print(${sum[$s]} + $v)")
            each[$s]+="$("$python" -c "print('%.2f' % $v if '$unit' == 'gib' else '%.1f' % $v)") "
            # FLUSH latency where the row flushes (fio's "sync" side).
            if [[ $args == *--fsync=* ]]; then
                lat=$("$python" - "$out" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
sync = job["sync"]["lat_ns"]
pct = sync.get("percentile", {})
p50 = next((v for k, v in pct.items() if k.startswith("50.")), sync["mean"])
p99 = next((v for k, v in pct.items() if k.startswith("99.0")), sync["max"])
# The WRITE before each FLUSH, completion latency at p50.
wpct = job["write"]["clat_ns"].get("percentile", {})
w50 = next((v for k, v in wpct.items() if k.startswith("50.")), job["write"]["clat_ns"]["mean"])
print(f"{sync['min'] / 1000:.0f} / {p50 / 1000:.0f} / {p99 / 1000:.0f} | {w50 / 1000:.0f}")
EOF
                )
                flush_lat+=("| $s (round $((round + 1))) | $lat |")
            fi
            sync
        done
    done
    line="| $label"
    vals=()
    for s in "${servers[@]}"; do
        v=$("$python" -c "m = ${sum[$s]} / $repeat; print('%.2f' % m if '$unit' == 'gib' else '%.1f' % m)")
        vals+=("$v")
        line+=" | $v"
    done
    ratio=$("$python" -c 'import sys; b, q, n = map(float, sys.argv[1:]); print(f"{b / max(q, n):.2f}x" if max(q, n) > 0 else "n/a")' "${vals[@]}")
    results+=("$line | $ratio |")
    per_round+=("| $label | ${each[blockd]% } | ${each[qemu-nbd]% } | ${each[nbdkit]% } |")
done

echo
echo "blockd io_engine: $engine (BLOCKD_IO_ENGINE=${BLOCKD_IO_ENGINE:-<unset>}), runtime ${runtime}s per job, $repeat rounds, fio $(fio --version | sed 's/^fio-//'), $(nproc) CPUs"
echo
echo "| row | blockd | qemu-nbd | nbdkit | blockd / best peer |"
echo "|---|---:|---:|---:|---:|"
printf '%s\n' "${results[@]}"
echo
echo "| row, each round in run order | blockd | qemu-nbd | nbdkit |"
echo "|---|---|---|---|"
printf '%s\n' "${per_round[@]}"
if ((${#flush_lat[@]})); then
    echo
    echo "| 4k write + FLUSH QD1 row | FLUSH min / p50 / p99 (µs) | WRITE p50 (µs) |"
    echo "|---|---:|---:|"
    printf '%s\n' "${flush_lat[@]}"
fi
