#!/usr/bin/env bash
# Cost against volume size: the same few MiB of data on a 1 GiB volume and
# on a 64 TiB one (4 KiB extents both), every operation timed on each in
# one run, reported as the ratio big / small. The target is 1.5x at most:
# what an operation costs should follow the data and the change, not the
# size of the volume.
#
#   1. two volumes, `small` (1 GiB) and `big` (BENCH_BIG, default 64T),
#      each written with the same 6 MiB of random data over NBD: 2 MiB at
#      the start, 2 MiB at 512 MiB, 2 MiB in the volume's last 2 MiB;
#   2. per volume, BENCH_REPEAT rounds (the median counts) of
#      - full backup (`cloudsnap backup --full --wait`),
#      - one 64 KiB write at 256 MiB, then an incremental backup,
#      - `cloudsnap list` of the volume, `cloudsnap catalog` of the
#        snapshot and `catalog --verify`,
#      - full restore into a new volume (`--wait`), read back and compared
#        at the three data places, then deleted,
#      - lazy restore: ms from the command's return to the answer of a
#        4 KiB read in the volume's last 2 MiB (the hydrator running), and
#        the task's own time until its end (every unit present), as the
#        daemon reports it: polling its status from here would add up to
#        a poll's period (a blockctl start and a sleep, ~15 ms) to a
#        figure of 20-40 ms; compared, then deleted;
#   3. the daemon's RSS when idle, with both volumes.
#
# The state dir is on /dev/shm: tmpfs holds a sparse 64 TiB file, ext4
# stops at 16 TiB. Page cache is dropped before each timed step.
#
# Usage: benches/scale.sh
# Env:
#   BENCH_BIG      the big volume's size (default 64T)
#   BENCH_REPEAT   rounds per row, 1-15 (default 3)
#   BENCH_DIR      parent of the temp dir (default /dev/shm)
#   BLOCKD_BIN, BLOCKCTL_BIN  binaries (default target/release)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/common.sh
. "$repo/benches/common.sh"
bench_dir=${BENCH_DIR:-/dev/shm}
repeat=${BENCH_REPEAT:-3}
big=${BENCH_BIG:-64T}
blockd_src=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_src=${BLOCKCTL_BIN:-$repo/target/release/blockctl}
python=python3
[[ -x /usr/bin/python3 ]] && python=/usr/bin/python3

die() { echo "scale-bench: $*" >&2; exit 1; }

[[ $repeat =~ ^[0-9]+$ ]] && ((repeat >= 1 && repeat <= 15)) || die "BENCH_REPEAT must be 1 to 15"
"$python" -c 'import nbd' 2>/dev/null || die "the libnbd Python module is missing (apt-get install python3-libnbd)"
[[ -x $blockd_src && -x $blockctl_src ]] || die "blockd binaries missing: run 'cargo build --release' in $repo"

bench_tmp "$bench_dir" scale

cat >"$tmp/bench.py" <<'PY'
import json, random, statistics, subprocess, sys, time
import nbd

MiB = 1 << 20

def places(size):
    return [0, 512 * MiB, size - 2 * MiB]

def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h

def fill(uri):
    """The same 6 MiB on every volume (seeded)."""
    h = connect(uri)
    rng = random.Random(7)
    for off in places(h.get_size()):
        h.pwrite(rng.randbytes(2 * MiB), off)
    h.flush()
    h.shutdown()

def write64k(uri, seed):
    h = connect(uri)
    h.pwrite(random.Random(int(seed)).randbytes(64 << 10), 256 * MiB)
    h.flush()
    h.shutdown()

def same(uri_a, uri_b):
    """The restored volume reads as the source at the data places and the
    64 KiB write."""
    a, b = connect(uri_a), connect(uri_b)
    if a.get_size() != b.get_size():
        sys.exit("restored size %d, source %d" % (b.get_size(), a.get_size()))
    for off in places(a.get_size()) + [256 * MiB]:
        if a.pread(2 * MiB, off) != b.pread(2 * MiB, off):
            sys.exit("restored volume differs at %d" % off)
    a.shutdown()
    b.shutdown()

def first_read(ctl, sock, nbdsock, snap, vol):
    """restore --lazy, then one 4 KiB read in the last 2 MiB: ms from the
    command's return to the answer; then the task's own ms until every
    unit was present (its `elapsed_secs`)."""
    cmd = [ctl, "--socket", sock, "-j", "cloudsnap", "restore", "--snap", snap,
           "--volume", vol, "--lazy"]
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    t1 = time.monotonic()
    h = connect("nbd+unix:///%s?socket=%s" % (vol, nbdsock))
    data = h.pread(4096, h.get_size() - MiB)
    t2 = time.monotonic()
    h.shutdown()
    if data == bytes(4096):
        sys.exit("the lazy read returned zeros")
    task = json.loads(out)["tasks"][0]["id"]
    while True:
        st = subprocess.run([ctl, "--socket", sock, "-j", "cloudsnap", "status", "--name", task],
                            check=True, capture_output=True).stdout
        st = json.loads(st)[0]
        if st["state"] == "Done":
            break
        if st["state"] != "Active":
            sys.exit("lazy restore ended %s" % st["state"])
        time.sleep(0.01)
    print("%.2f %.2f" % ((t2 - t1) * 1000, st["elapsed_secs"] * 1000))

def snapshot(path):
    print(json.load(open(path))[0]["snapshot"])

def median(*xs):
    print("%.2f" % statistics.median(float(x) for x in xs))

def ratio(a, b):
    a, b = float(a), float(b)
    r = a / b if b > 0 else float("inf")
    print("%.2fx%s" % (r, "" if r <= 1.5 else " **over 1.5x**"))

if __name__ == "__main__":
    globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
PY
py() { "$python" "$tmp/bench.py" "$@"; }
drop_caches() { sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true; }
now() { date +%s%N; }
ms_since() { echo $((($(now) - $1) / 1000000)); }

start_blockd "$tmp/blockd"
ctl volume create small --size 1G >/dev/null
ctl volume create big --size "$big" >/dev/null
py fill "$(uri small)"
py fill "$(uri big)"

declare -A times
record() { times[$1.$2]+="$3 "; }

n=0
for ((round = 1; round <= repeat; round++)); do
    for v in small big; do
        echo "round $round: $v" >&2
        n=$((n + 1))
        drop_caches
        t=$(now)
        ctl -j cloudsnap backup "$v" --full --wait >"$tmp/b.json"
        record full "$v" "$(ms_since "$t")"
        py write64k "$(uri "$v")" "$n"
        drop_caches
        t=$(now)
        ctl -j cloudsnap backup "$v" --wait >"$tmp/b.json"
        record incr "$v" "$(ms_since "$t")"
        snap=$(py snapshot "$tmp/b.json")
        t=$(now)
        ctl cloudsnap list --src "$v" >/dev/null
        record list "$v" "$(ms_since "$t")"
        drop_caches
        t=$(now)
        ctl cloudsnap catalog "$snap" >/dev/null
        record catalog "$v" "$(ms_since "$t")"
        drop_caches
        t=$(now)
        ctl cloudsnap catalog --verify "$snap" >/dev/null
        record verify "$v" "$(ms_since "$t")"
        drop_caches
        t=$(now)
        ctl cloudsnap restore --snap "$snap" --volume "r$n" --wait >/dev/null
        record restore "$v" "$(ms_since "$t")"
        py same "$(uri "$v")" "$(uri "r$n")"
        ctl volume delete "r$n" >/dev/null
        drop_caches
        read -r ms hydrated < <(py first-read "$blockctl_bin" "$state/api.sock" "$state/nbd.sock" "$snap" "l$n")
        record lazy "$v" "$ms"
        record hydrated "$v" "$hydrated"
        py same "$(uri "$v")" "$(uri "l$n")"
        ctl volume delete "l$n" >/dev/null
    done
done
sleep 2
rss=$(awk '/VmRSS/ { print $2 }' "/proc/$blockd_pid/status")

echo
echo "blockd $("$blockctl_bin" --version | awk '{ print $2 }'), $(nproc) CPUs, small 1 GiB, big $big, 6 MiB of data each, $repeat rounds (median ms), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| operation | 1 GiB (ms) | $big (ms) | big / small (target <= 1.5x) |"
echo "|---|---:|---:|---:|"
for op in full incr list catalog verify restore lazy hydrated; do
    # shellcheck disable=SC2086
    s=$(py median ${times[$op.small]})
    # shellcheck disable=SC2086
    b=$(py median ${times[$op.big]})
    label=$(case $op in
        full) echo "full backup" ;;
        incr) echo "incremental of one 64 KiB write" ;;
        list) echo "cloudsnap list" ;;
        catalog) echo "cloudsnap catalog" ;;
        verify) echo "catalog --verify" ;;
        restore) echo "full restore" ;;
        lazy) echo "lazy restore, first 4 KiB read" ;;
        hydrated) echo "lazy restore, until hydrated" ;;
    esac)
    echo "| $label | $s | $b | $(py ratio "$b" "$s") |"
done
echo
echo "daemon RSS idle with both volumes: $((rss / 1024)) MiB"
