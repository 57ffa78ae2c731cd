#!/usr/bin/env bash
# A database on blockd against the same database on qemu-nbd, in one run:
# PostgreSQL with its data directory and its WAL on two volumes, each an
# ext4 file system on a real block device (nbdfuse exposes the export as a
# file, losetup makes it a loop device: this kernel has no nbd module).
# pgbench's TPC-B-like load at scale 10 with 4 clients: every commit is a
# WAL write and an fdatasync, which reaches the server as NBD writes and a
# FLUSH.
#
# Per round and server (the order alternates): fresh file systems, initdb,
# `pgbench -i -s 10`, then `pgbench -c 4 -j 2 -T BENCH_RUNTIME`; the
# transactions per second are reported per round with the median, and
# blockd's ratio to qemu-nbd: the ratio of the medians, and the median of
# each round's own ratio (the three configurations of a round run back to
# back, so a drift of the machine over the run, which moves whole rounds
# by 10% here, cancels out of the second). A third configuration is blockd again with a
# group backup of both volumes (one freeze point for data and WAL: a
# crash-consistent database) started a third of the way into the run: its
# tps, and the backup's own time and size, show what protecting a busy
# database costs it.
#
# Usage: benches/pgbench.sh   (as root: losetup, mount, runuser)
# Env:
#   BENCH_RUNTIME  seconds of pgbench per round (default 30)
#   BENCH_REPEAT   rounds per server (default 5: single rounds swing by
#                  about 5%, and the ratio of medians needs several)
#   BENCH_SCALE    pgbench scale (default 10)
#   PG_BIN         PostgreSQL's bin directory (default: pg_config --bindir,
#                  else the newest /usr/lib/postgresql/*/bin)
#   BLOCKD_BIN, BLOCKCTL_BIN  binaries (default target/release)
#   BENCH_DIR      parent of the temp dir (default /var/tmp)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/common.sh
. "$repo/benches/common.sh"
runtime=${BENCH_RUNTIME:-30}
repeat=${BENCH_REPEAT:-5}
scale=${BENCH_SCALE:-10}
blockd_src=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_src=${BLOCKCTL_BIN:-$repo/target/release/blockctl}

die() { echo "pgbench-bench: $*" >&2; exit 1; }

[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME must be a positive number of seconds"
[[ $repeat =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPEAT must be a positive number"
[[ $(id -u) == 0 ]] || die "needs root (losetup, mount)"
pg_bin=${PG_BIN:-$(pg_config --bindir 2>/dev/null || true)}
[[ -x $pg_bin/initdb ]] || pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[[ -x $pg_bin/initdb && -x $pg_bin/pgbench ]] || die "PostgreSQL not found (apt-get install postgresql postgresql-contrib, or set PG_BIN)"
id postgres >/dev/null 2>&1 || die "no 'postgres' user (the postgresql package creates it)"
for tool in qemu-nbd nbdfuse losetup mkfs.ext4 fusermount3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install qemu-utils nbdfuse fuse3 e2fsprogs)"
done
[[ -x $blockd_src && -x $blockctl_src ]] || die "blockd binaries missing: run 'cargo build --release' in $repo"

bench_tmp "${BENCH_DIR:-/var/tmp}" pgbench
chmod 755 "$tmp"
mounted=()
bench_unmount() {
    local m
    for m in "${mounted[@]}"; do
        runuser -u postgres -- "$pg_bin/pg_ctl" -D "$m/data/pg" -m immediate stop >/dev/null 2>&1 || true
    done
    undo_disks
}

# disks SERVER URI_DATA URI_WAL: mounts ext4 over each export at
# $tmp/mnt/SERVER/{data,wal}; undo_disks takes everything down.
steps=()
disks() {
    local server=$1 uri d dev
    shift
    for d in data wal; do
        uri=$1
        shift
        mkdir -p "$tmp/fuse/$server-$d" "$tmp/mnt/$server/$d"
        rm -f "$tmp/fuse/$server-$d.pid"
        nbdfuse -P "$tmp/fuse/$server-$d.pid" "$tmp/fuse/$server-$d/disk" "$uri" &
        pids+=($!)
        for _ in $(seq 200); do [[ -e $tmp/fuse/$server-$d.pid ]] && break; sleep 0.05; done
        [[ -e $tmp/fuse/$server-$d.pid ]] || die "nbdfuse did not start for $uri"
        steps+=("fusermount3 -u $tmp/fuse/$server-$d")
        dev=$(losetup -f --show "$tmp/fuse/$server-$d/disk")
        steps+=("losetup -d $dev")
        mkfs.ext4 -q -F -E nodiscard "$dev"
        mount -o noatime "$dev" "$tmp/mnt/$server/$d"
        steps+=("umount $tmp/mnt/$server/$d")
        mkdir "$tmp/mnt/$server/$d/pg"
        chown postgres: "$tmp/mnt/$server/$d/pg"
    done
    mounted+=("$tmp/mnt/$server")
}
undo_disks() {
    local i
    for ((i = ${#steps[@]} - 1; i >= 0; i--)); do
        ${steps[i]} >/dev/null 2>&1 || true
    done
    steps=()
    mounted=()
    sleep 0.2
}

pg() { runuser -u postgres -- "$@"; }

# round SERVER URI_DATA URI_WAL [backup]: sets `result` to the tps of one
# pgbench run (not in a subshell, so the cleanup trap knows what is
# mounted); with `backup`, a group backup of pgdata and pgwal starts a
# third of the way in, and `backup_note` says how long it took and what it
# uploaded.
round() {
    local server=$1 m=$tmp/mnt/$1 sock=$tmp/sock-$1 backup=${4:-}
    disks "$1" "$2" "$3"
    mkdir -p "$sock"
    chown postgres: "$sock"
    pg "$pg_bin/initdb" -A trust -D "$m/data/pg" --waldir="$m/wal/pg" -U postgres >/dev/null
    pg "$pg_bin/pg_ctl" -D "$m/data/pg" -l "$sock/postgres.log" -w \
        -o "-k $sock -c listen_addresses='' -c shared_buffers=128MB" start >/dev/null
    pg "$pg_bin/pgbench" -h "$sock" -U postgres -i -q -s "$scale" postgres >/dev/null 2>&1
    pg "$pg_bin/psql" -h "$sock" -U postgres -qc checkpoint postgres >/dev/null
    local out
    if [[ -n $backup ]]; then
        pg "$pg_bin/pgbench" -h "$sock" -U postgres -c 4 -j 2 -T "$runtime" postgres >"$tmp/pgbench.out" 2>&1 &
        local bench=$!
        sleep "$((runtime / 3))"
        local t0=$EPOCHREALTIME
        ctl -j cloudsnap backup-group -v pgdata,pgwal --wait >"$tmp/backup.json" ||
            die "the group backup failed: $(cat "$tmp/backup.json")"
        local took
        took=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
        wait "$bench" || die "pgbench failed: $(cat "$tmp/pgbench.out")"
        out=$(cat "$tmp/pgbench.out")
        backup_note+="$took s/$(python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
tasks = d if isinstance(d, list) else d.get("tasks", [d])
print("%.0f MiB" % (sum(t.get("bytes_transferred", 0) for t in tasks) / 2**20))' "$tmp/backup.json") "
    else
        out=$(pg "$pg_bin/pgbench" -h "$sock" -U postgres -c 4 -j 2 -T "$runtime" postgres 2>&1)
    fi
    pg "$pg_bin/pg_ctl" -D "$m/data/pg" -m fast -w stop >/dev/null
    undo_disks
    result=$(sed -n 's/^tps = \([0-9]*\).*/\1/p' <<<"$out" | head -n1)
}

start_blockd "$tmp/blockd"
ctl volume create pgdata --size 4G >/dev/null
ctl volume create pgwal --size 2G >/dev/null
truncate -s 4G "$tmp/qdata.img"
truncate -s 2G "$tmp/qwal.img"
for f in data wal; do
    qemu-nbd -f raw -k "$tmp/q$f.sock" --cache=writeback --aio=threads -t -e 8 \
        "$tmp/q$f.img" </dev/null 2>"$tmp/qemu-$f.log" &
    pids+=($!)
done
for f in data wal; do
    for _ in $(seq 100); do [[ -S $tmp/q$f.sock ]] && break; sleep 0.1; done
done

declare -A tps
backup_note=
for ((r = 1; r <= repeat; r++)); do
    order=(blockd qemu-nbd blockd+backup)
    ((r % 2)) || order=(blockd+backup qemu-nbd blockd)
    for s in "${order[@]}"; do
        echo "round $r: $s" >&2
        result=
        if [[ $s == blockd ]]; then
            round blockd "$(uri pgdata)" "$(uri pgwal)"
        elif [[ $s == blockd+backup ]]; then
            round blockd "$(uri pgdata)" "$(uri pgwal)" backup
        else
            round qemu-nbd "nbd+unix:///?socket=$tmp/qdata.sock" "nbd+unix:///?socket=$tmp/qwal.sock"
        fi
        [[ -n $result ]] || die "pgbench on $s reported no tps (see $tmp/sock-$s/postgres.log)"
        tps[$s]+="$result "
    done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
b=$(median <<<"${tps[blockd]}")
bb=$(median <<<"${tps[blockd+backup]}")
q=$(median <<<"${tps[qemu-nbd]}")
echo
echo "blockd $("$blockctl_bin" --version | awk '{ print $2 }'), PostgreSQL $("$pg_bin/postgres" --version | awk '{ print $3 }'), $(nproc) CPUs, pgbench -c 4 -j 2 -T $runtime at scale $scale, data and WAL on two ext4 volumes (nbdfuse + loop), $repeat rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| server | tps per round | median tps | blockd / qemu-nbd |"
echo "|---|---|---:|---:|"
echo "| blockd | ${tps[blockd]% } | $b | $(awk -v b="$b" -v q="$q" 'BEGIN { printf "%.2fx", b / q }') |"
echo "| blockd, group backup of both volumes at $((runtime / 3)) s | ${tps[blockd+backup]% } | $bb | $(awk -v b="$bb" -v q="$q" 'BEGIN { printf "%.2fx", b / q }') |"
echo "| qemu-nbd | ${tps[qemu-nbd]% } | $q | |"
# paired A: each round's tps of A over qemu-nbd's in the same round, and
# their median.
paired() {
    python3 - "${tps[$1]}" "${tps[qemu-nbd]}" <<'EOF'
import statistics, sys
r = [a / b for a, b in zip(map(float, sys.argv[1].split()), map(float, sys.argv[2].split()))]
print(" ".join(f"{x:.2f}" for x in r), f"| {statistics.median(r):.2f}x")
EOF
}
echo
echo "| per round, against qemu-nbd in the same round | each round | median |"
echo "|---|---|---:|"
echo "| blockd | $(paired blockd) |"
echo "| blockd, group backup | $(paired blockd+backup) |"
echo
echo "Group backups (time to done / bytes uploaded, per round): ${backup_note% }"
