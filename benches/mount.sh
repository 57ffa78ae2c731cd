#!/usr/bin/env bash
# Catalog-mount benchmark: reading a backed-up image through `blockctl
# mount` vs through `restic mount`, in one run on this machine.
#
#   1. a BENCH_SIZE test image (as benches/cloudsnap.sh makes it: 1 MiB
#      stripes, per 4 MiB one zero, one of lz4-compressible text, two
#      random, shuffled), imported into volume `v` with nbdcopy; a full
#      backup of `v` to the `local` location, and a restic backup of the
#      image into a local restic repository (neither timed);
#   2. sequential read of the whole image (1 MiB reads) through each
#      mount, page cache dropped, mount fresh (blockd's chunk cache empty);
#      blockd's copy is then compared with the image (cmp), a mismatch
#      fails the run;
#   3. BENCH_RANDOM random 4 KiB reads (one seeded list of 4K-aligned
#      offsets) through each mount: cold (fresh mount, page cache dropped),
#      again with the page cache dropped (blockd: chunk cache warm; restic:
#      its in-memory blob cache warm), and a third pass (page cache warm);
#   4. with BENCH_GARAGE=1, 2 and 3 again with both repositories on a
#      single-node Garage (S3) on 127.0.0.1.
#
# Every cold pass starts with `sync; echo 3 > /proc/sys/vm/drop_caches`
# (needs root, as do the FUSE mounts of a daemon running as root). Output: a
# markdown table, speeds and the ratio blockd speed / restic speed.
#
# Usage: benches/mount.sh
# Env:
#   BENCH_SIZE     image / volume size, K/M/G = powers of 1024, a multiple of
#                  4M, at least 64M (default 1G; needs ~4x that on disk)
#   BENCH_RANDOM   random 4 KiB reads per pass (default 2000)
#   BENCH_DIR      parent of the temp dir (default /var/tmp)
#   BENCH_SEED     seed of the image and of the offsets (default 1)
#   BENCH_GARAGE   1 adds the Garage rows (default 0; skipped with a message
#                  when no garage binary is found)
#   BLOCKD_BIN, BLOCKCTL_BIN  binaries (default target/release/{blockd,blockctl})
#   BENCH_GARAGE_BIN  garage binary (default: PATH, ~/.cargo/bin)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/common.sh
. "$repo/benches/common.sh"
size_arg=${BENCH_SIZE:-1G}
nrandom=${BENCH_RANDOM:-2000}
bench_dir=${BENCH_DIR:-/var/tmp}
seed=${BENCH_SEED:-1}
want_garage=${BENCH_GARAGE:-0}
blockd_src=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_src=${BLOCKCTL_BIN:-$repo/target/release/blockctl}
python=python3
[[ -x /usr/bin/python3 ]] && python=/usr/bin/python3

die() { echo "mount-bench: $*" >&2; exit 1; }
note() { echo "mount-bench: $*" >&2; }

[[ $size_arg =~ ^([0-9]+)([KMG]?)$ ]] || die "BENCH_SIZE must be a number with an optional K/M/G suffix, not '$size_arg'"
size=${BASH_REMATCH[1]}
case ${BASH_REMATCH[2]} in
K) size=$((size << 10)) ;; M) size=$((size << 20)) ;; G) size=$((size << 30)) ;;
esac
((size >= 64 << 20 && size % (4 << 20) == 0)) || die "BENCH_SIZE must be a multiple of 4M and at least 64M"
[[ $nrandom =~ ^[0-9]+$ ]] && ((nrandom > 0)) || die "BENCH_RANDOM must be a positive number"
[[ $seed =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a number"
[[ $(id -u) == 0 ]] || die "run as root (FUSE mounts of the daemon, drop_caches)"
for tool in nbdcopy restic fusermount3 cmp "$python"; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install libnbd-bin restic fuse3 diffutils python3)"
done
[[ -x $blockd_src && -x $blockctl_src ]] || die "blockd binaries missing: run 'cargo build --release' in $repo"
garage_bin=
[[ $want_garage != 1 ]] || find_garage
mkdir -p "$bench_dir"
need=$((size * 4 + (1 << 30)))
avail=$(df -P -B1 "$bench_dir" | awk 'NR == 2 { print $4 }')
((avail >= need)) || die "not enough free space in $bench_dir: $((avail >> 20)) MiB free, $((need >> 20)) MiB needed"

# Catalog and restic mounts go before the processes serving them.
bench_unmount() {
    local m
    for m in "$tmp/cat" "$tmp/rmnt"; do
        grep -q " $m " /proc/self/mounts 2>/dev/null && fusermount3 -u -z "$m" 2>/dev/null
    done
    return 0
}
bench_tmp "$bench_dir" mount
mkdir "$tmp/cat" "$tmp/rmnt"

cat >"$tmp/bench.py" <<'PY'
import os, random, sys, time
from benchlib import gen, freeports, http_ok

MiB = 1 << 20

def seqread(path):
    """Reads the whole file in 1 MiB reads; prints MiB/s."""
    fd = os.open(path, os.O_RDONLY)
    n, t = 0, time.monotonic()
    while True:
        b = os.read(fd, MiB)
        if not b:
            break
        n += len(b)
    dt = time.monotonic() - t
    os.close(fd)
    print("%.1f" % (n / MiB / dt))

def randread(path, count, seed):
    """count 4 KiB preads at seeded 4K-aligned offsets; prints reads/s."""
    fd = os.open(path, os.O_RDONLY)
    blocks = os.fstat(fd).st_size // 4096
    rng = random.Random(seed)
    offs = [rng.randrange(blocks) * 4096 for _ in range(count)]
    t = time.monotonic()
    for o in offs:
        if len(os.pread(fd, 4096, o)) != 4096:
            sys.exit("short read at %d" % o)
    dt = time.monotonic() - t
    os.close(fd)
    print("%.0f" % (count / dt))

def table(path, size, nrandom):
    r = {}
    for line in open(path):
        k, v = line.split(None, 1)
        r[k] = float(v)
    print("| read through the mount | blockd | restic | blockd / restic |")
    print("|---|---:|---:|---:|")
    for loc, label in (("local", "local dir"), ("garage", "Garage S3")):
        if "%s.bd.seq" % loc not in r:
            continue
        rows = [
            ("seq", "sequential %d MiB, cold, MiB/s" % (size // MiB)),
            ("cold", "random 4 KiB x %d, cold mount and page cache, reads/s" % nrandom),
            ("chunk", "random 4 KiB, page cache dropped, tool's cache warm, reads/s"),
            ("warm", "random 4 KiB, third pass (page cache warm), reads/s"),
        ]
        for key, text in rows:
            b, p = r.get("%s.bd.%s" % (loc, key)), r.get("%s.rs.%s" % (loc, key))
            ratio = "%.2fx" % (b / p) if b and p else "-"
            print("| %s: %s | %.0f | %.0f | %s |" % (label, text, b or 0, p or 0, ratio))

if __name__ == "__main__":
    f = globals()[sys.argv[1].replace("-", "_")]
    args = [int(a) if a.isdigit() else a for a in sys.argv[2:]]
    f(*args)
PY
py() { "$python" "$tmp/bench.py" "$@"; }
put() { echo "$1 $2" >>"$tmp/results"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# --- 1. data, backups ---------------------------------------------------------
img=$tmp/image.img
echo "1. image ($size_arg), blockd and restic backups" >&2
py gen "$img" "$size" "$seed"
BLOCKD_LOG=${BLOCKD_LOG:-warn} start_blockd "$tmp/state"
ctl volume create v --size "$size" >/dev/null
nbdcopy "$img" "nbd+unix:///v?socket=$state/nbd.sock"
ctl cloudsnap backup v --wait >/dev/null
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$tmp/restic
restic init >/dev/null 2>&1 || die "restic init failed"
restic backup --host bench "$img" >/dev/null 2>&1 || die "restic backup failed"

rs_pid=
bd_mount() { ctl mount "$tmp/cat" --cred-id "$1" >/dev/null; }
bd_umount() { ctl umount "$tmp/cat" >/dev/null; }
rs_mount() {
    restic mount "$tmp/rmnt" >"$tmp/restic-mount.log" 2>&1 &
    rs_pid=$!
    for _ in $(seq 600); do
        [[ -e $tmp/rmnt/snapshots/latest$img ]] && return
        kill -0 "$rs_pid" 2>/dev/null || { cat "$tmp/restic-mount.log" >&2; die "restic mount exited"; }
        sleep 0.1
    done
    die "restic mount: no snapshot after 60 s"
}
rs_umount() { fusermount3 -u "$tmp/rmnt"; wait "$rs_pid" 2>/dev/null || true; }

# --- 2, 3. reads through the mounts -----------------------------------------------
measure() {
    local loc=$1 cred=$2
    local bd_file=$tmp/cat/v/latest/disk.img rs_file=$tmp/rmnt/snapshots/latest$img
    echo "2. $loc: sequential reads" >&2
    bd_mount "$cred"
    drop
    put "$loc.bd.seq" "$(py seqread "$bd_file")"
    cmp "$bd_file" "$img" || die "$loc: the image read through blockd's mount differs"
    bd_umount
    rs_mount
    drop
    put "$loc.rs.seq" "$(py seqread "$rs_file")"
    rs_umount
    echo "3. $loc: random 4 KiB reads" >&2
    bd_mount "$cred"
    drop
    put "$loc.bd.cold" "$(py randread "$bd_file" "$nrandom" "$seed")"
    drop
    put "$loc.bd.chunk" "$(py randread "$bd_file" "$nrandom" "$seed")"
    put "$loc.bd.warm" "$(py randread "$bd_file" "$nrandom" "$seed")"
    bd_umount
    rs_mount
    drop
    put "$loc.rs.cold" "$(py randread "$rs_file" "$nrandom" "$seed")"
    drop
    put "$loc.rs.chunk" "$(py randread "$rs_file" "$nrandom" "$seed")"
    put "$loc.rs.warm" "$(py randread "$rs_file" "$nrandom" "$seed")"
    rs_umount
}
measure local local

# --- 4. Garage ----------------------------------------------------------------
if [[ -n $garage_bin ]]; then
    echo "4. Garage" >&2
    start_garage "$tmp/garage"
    for b in blockd-bench restic-bench; do
        garage bucket create "$b" >/dev/null
        garage bucket allow --read --write --owner "$b" --key bench >/dev/null
    done
    BLOCKD_S3_SECRET_KEY=$secret ctl credentials create garage --provider s3 \
        --s3-endpoint "127.0.0.1:$s3_port" --s3-disable-ssl --s3-region garage \
        --s3-access-key "$key_id" --bucket blockd-bench >/dev/null
    ctl cloudsnap backup v --cred-id garage --wait >/dev/null
    export RESTIC_REPOSITORY=s3:http://127.0.0.1:$s3_port/restic-bench
    export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$secret AWS_DEFAULT_REGION=garage
    restic init >/dev/null 2>&1 || die "restic init on Garage failed"
    restic backup --host bench "$img" >/dev/null 2>&1 || die "restic backup to Garage failed"
    measure garage garage
fi

# --- results ------------------------------------------------------------------
echo
echo "blockd $("$tmp/bin/blockctl" --version | awk '{ print $2 }'), $(restic version | awk '{ print $1, $2 }'), $(nproc) CPUs, BENCH_SIZE=$size_arg, BENCH_RANDOM=$nrandom"
echo
py table "$tmp/results" "$size" "$nrandom"
