#!/usr/bin/env bash
# Lifecycle at scale: `cloudsnap list`, `repo check`, `repo gc` on a local
# location holding BENCH_VOLUMES x BENCH_SNAPS snapshots (default 1000 x 10
# = 10,000) and BENCH_CHUNKS chunks per snapshot (default 100: 1,000,000
# chunks), written through blockd's own repository module by
# `cargo run --release --example repo_gen` (each snapshot an incremental of
# BENCH_CHUNKS small chunks in a pack of its own, its index block a complete
# map of the volume, as scattered writes leave them). Time and the daemon's
# peak RSS (VmHWM, reset through clear_refs) per phase.
#
# Then the same phases side by side with restic on a smaller pair of
# repositories of the same shape (BENCH_RESTIC_VOLUMES volumes, default 20,
# x BENCH_SNAPS snapshots; restic backs up each snapshot's data as a file):
# `repo check` vs `restic check`, `--read-data` vs `--read-data`, deleting
# half the snapshots then `repo gc` (a mark run and, after the grace
# period, the sweep) vs `restic forget` + `restic prune`. One run, ratios.
# On the large repository the mark and sweep run first without repacking
# (`--max-unused unlimited`), then a default run merges the small packs
# (one per snapshot) and a last one sweeps them. The small comparison
# runs with defaults on both sides: both repack to 5% unused.
#
# Usage: benches/lifecycle.sh     (after cargo build --release --workspace
#                                  --bins --examples)
# Env: BENCH_VOLUMES, BENCH_SNAPS, BENCH_CHUNKS, BENCH_CHUNK_BYTES (512),
#      BENCH_RESTIC_VOLUMES, BENCH_DIR (parent of the temp dir, /var/tmp).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$repo/benches/common.sh"
vols=${BENCH_VOLUMES:-1000}
snaps=${BENCH_SNAPS:-10}
chunks=${BENCH_CHUNKS:-100}
bytes=${BENCH_CHUNK_BYTES:-512}
rvols=${BENCH_RESTIC_VOLUMES:-20}
bench_dir=${BENCH_DIR:-/var/tmp}
blockd_src=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_src=${BLOCKCTL_BIN:-$repo/target/release/blockctl}
gen=$repo/target/release/examples/repo_gen

die() { echo "lifecycle-bench: $*" >&2; exit 1; }
note() { echo "lifecycle-bench: $*" >&2; }
[[ -x $blockd_src && -x $blockctl_src && -x $gen ]] ||
    die "binaries missing: cargo build --release --workspace --bins --examples"
command -v restic >/dev/null || die "restic not found (apt-get install restic)"
[[ -x /usr/bin/time ]] && /usr/bin/time -v true 2>/dev/null || die "GNU time missing (apt-get install time)"
bench_tmp "$bench_dir" lifecycle

state=$tmp/state
mkdir -m 700 "$state"
note "generating $((vols * snaps)) snapshots, $((vols * snaps * chunks)) chunks of $bytes bytes"
"$gen" "$state/objects" "$vols" "$snaps" "$chunks" "$bytes" >&2
mkdir "$tmp/small"
"$gen" "$tmp/small" "$rvols" "$snaps" "$chunks" "$bytes" >&2
start_blockd() {
    "$blockd_src" --state-dir "$state" --gc-every off </dev/null >>"$tmp/blockd.log" 2>&1 &
    blockd_pid=$!
    pids+=("$blockd_pid")
    for _ in $(seq 300); do [[ -S $state/api.sock ]] && break; sleep 0.1; done
}
start_blockd
ctl() { "$blockctl_src" --socket "$state/api.sock" "$@"; }
ctl credentials create small --provider local --path "$tmp/small" >/dev/null

rows=()
now() { date +%s.%N; }
# blockd_phase NAME CMD...: the command's wall time and the daemon's peak RSS.
blockd_phase() {
    local name=$1 t0 t1 rss
    shift
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    echo 5 >"/proc/$blockd_pid/clear_refs"
    t0=$(now)
    "$@" >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; die "$name failed"; }
    t1=$(now)
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$blockd_pid/status")
    declare -g "t_$name=$(printf '%.2f' "$(echo "$t1 - $t0" | bc)")" "rss_$name=$rss"
    printf '%-28s %8.2f s %8d KiB\n' "$name" "$(echo "$t1 - $t0" | bc)" "$rss" >&2
}
# restic_phase NAME CMD...: wall time and peak RSS from GNU time.
restic_phase() {
    local name=$1
    shift
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f '%e %M' -o "$tmp/time" "$@" >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; die "$name failed"; }
    read -r secs rss <"$tmp/time"
    declare -g "t_$name=$secs" "rss_$name=$rss"
    printf '%-28s %8.2f s %8d KiB\n' "$name" "$secs" "$rss" >&2
}
delete_half() { # LOCATION: the older half of every volume's snapshots
    ctl -j cloudsnap list --cred-id "$1" | python3 -c '
import json, sys, collections
by = collections.defaultdict(list)
for s in json.load(sys.stdin):
    by[s["volume"]].append(s["id"])
for ids in by.values():
    for i in sorted(ids)[: len(ids) // 2]:
        print(i)' | xargs -P 4 -I{} "$blockctl_src" --socket "$state/api.sock" cloudsnap delete --cred-id "$1" --snap {} >/dev/null
}

note "large repository"
blockd_phase big_list ctl cloudsnap list --cred-id local
blockd_phase big_check ctl repo check --cred-id local
blockd_phase big_check_data ctl repo check --cred-id local --read-data
blockd_phase big_gc_nothing ctl repo gc --cred-id local --dry-run
before=$(du -sb "$state/objects" | cut -f1)
blockd_phase big_delete_half delete_half local
blockd_phase big_gc_mark ctl repo gc --cred-id local --grace 1s --max-unused unlimited
sleep 1.1
blockd_phase big_gc_sweep ctl repo gc --cred-id local --grace 1s --max-unused unlimited
after=$(du -sb "$state/objects" | cut -f1)
packs_before=$(find "$state/objects/packs" -type f | wc -l)
blockd_phase big_gc_repack ctl repo gc --cred-id local --grace 1s
sleep 1.1
blockd_phase big_gc_repack_sweep ctl repo gc --cred-id local --grace 1s
packs_after=$(find "$state/objects/packs" -type f | wc -l)
relocs_after=$(find "$state/objects/relocs" -type f | wc -l)
blockd_phase big_check_after ctl repo check --cred-id local --read-data

# A fresh daemon for the comparison: the peak RSS of the small phases is
# theirs, not memory the allocator kept from the large ones.
kill "$blockd_pid"
wait "$blockd_pid" || true
start_blockd
note "restic: $((rvols * snaps)) snapshots of the same shape"
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$tmp/restic
restic init -q >/dev/null
python3 - "$tmp/rdata" "$rvols" "$snaps" "$chunks" "$bytes" <<'EOF' | while read -r f; do restic backup -q --host gen "$f" >/dev/null; done
import os, random, sys
out, vols, snaps, chunks, size = sys.argv[1], *map(int, sys.argv[2:])
os.makedirs(out, exist_ok=True)
for v in range(vols):
    data = bytearray()
    for s in range(snaps):
        for c in range(chunks):
            data += random.Random((v << 40) ^ (s << 20) ^ c).randbytes(size)
        p = os.path.join(out, f"vol{v:05}.img")
        with open(p, "wb") as f:
            f.write(data)
        print(p, flush=True)
EOF
blockd_phase small_check ctl repo check --cred-id small
restic_phase restic_check restic check -q
blockd_phase small_check_data ctl repo check --cred-id small --read-data
restic_phase restic_check_data restic check -q --read-data
blockd_phase small_delete_half delete_half small
blockd_phase small_gc_mark ctl repo gc --cred-id small --grace 1s
sleep 1.1
blockd_phase small_gc_sweep ctl repo gc --cred-id small --grace 1s
t_small_gc=$(printf '%.2f' "$(echo "$t_small_gc_mark + $t_small_gc_sweep" | bc)")
rss_small_gc=$((rss_small_gc_mark > rss_small_gc_sweep ? rss_small_gc_mark : rss_small_gc_sweep))
restic snapshots --json | python3 -c '
import json, sys, collections
by = collections.defaultdict(list)
for s in json.load(sys.stdin):
    by[s["paths"][0]].append((s["time"], s["short_id"]))
for ids in by.values():
    for _, i in sorted(ids)[: len(ids) // 2]:
        print(i)' | xargs restic forget -q >/dev/null
restic_phase restic_prune restic prune -q

ratio() { printf '%.1f' "$(echo "scale=4; $1 / ($2 + 0.005)" | bc)"; }
cat <<EOF

Large repository: $((vols * snaps)) snapshots, $((vols * snaps * chunks)) chunks ($bytes B), $(numfmt --to=iec "$before") on disk

| phase | time | blockd peak RSS |
|---|---:|---:|
| cloudsnap list | ${t_big_list} s | $((rss_big_list / 1024)) MiB |
| repo check | ${t_big_check} s | $((rss_big_check / 1024)) MiB |
| repo check --read-data | ${t_big_check_data} s | $((rss_big_check_data / 1024)) MiB |
| repo gc --dry-run (nothing to do) | ${t_big_gc_nothing} s | $((rss_big_gc_nothing / 1024)) MiB |
| delete half the snapshots (cloudsnap delete, 4 at a time) | ${t_big_delete_half} s | $((rss_big_delete_half / 1024)) MiB |
| repo gc: mark | ${t_big_gc_mark} s | $((rss_big_gc_mark / 1024)) MiB |
| repo gc: sweep | ${t_big_gc_sweep} s | $((rss_big_gc_sweep / 1024)) MiB |
| repo gc: merge small packs (copy, check, relocate) | ${t_big_gc_repack} s | $((rss_big_gc_repack / 1024)) MiB |
| repo gc: sweep the merged packs | ${t_big_gc_repack_sweep} s | $((rss_big_gc_repack_sweep / 1024)) MiB |
| repo check --read-data after | ${t_big_check_after} s | $((rss_big_check_after / 1024)) MiB |

Reclaimed: $(numfmt --to=iec "$before") -> $(numfmt --to=iec "$after").
Packs: $packs_before -> $packs_after after merging ($relocs_after relocations).

Against restic, $((rvols * snaps)) snapshots of the same shape (restic / blockd; > 1 means blockd is faster):

| phase | blockd | restic | ratio | blockd RSS | restic RSS |
|---|---:|---:|---:|---:|---:|
| check | ${t_small_check} s | ${t_restic_check} s | $(ratio "$t_restic_check" "$t_small_check")x | $((rss_small_check / 1024)) MiB | $((rss_restic_check / 1024)) MiB |
| check --read-data | ${t_small_check_data} s | ${t_restic_check_data} s | $(ratio "$t_restic_check_data" "$t_small_check_data")x | $((rss_small_check_data / 1024)) MiB | $((rss_restic_check_data / 1024)) MiB |
| gc (mark + sweep) vs prune | ${t_small_gc} s | ${t_restic_prune} s | $(ratio "$t_restic_prune" "$t_small_gc")x | $((rss_small_gc / 1024)) MiB | $((rss_restic_prune / 1024)) MiB |
EOF
