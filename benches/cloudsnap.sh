#!/usr/bin/env bash
# Cloud-snapshot benchmarks: blockd's `cloudsnap` backups and restores side
# by side with restic (and cp as the physical reference), in one run on this
# machine, so the numbers share hardware, kernel and page-cache state.
#
#   1. a BENCH_SIZE test image: 1 MiB stripes, per 4 MiB one zero (a hole),
#      one of unique lz4-compressible text, two random, shuffled; imported
#      into volume `v` with nbdcopy (not timed);
#   2. cp of the image (+ sync), the physical reference;
#   3. full backup of `v` to the default `local` location vs restic's first
#      backup of the image file into a local repository;
#   4. the same change on both: 1% of the size in scattered random 4 KiB
#      writes at 4K-aligned offsets (one seeded list, applied by one process
#      to the volume over NBD and to the image file);
#   5. incremental backup vs restic's second backup; bytes uploaded vs bytes
#      changed (index blocks counted apart);
#   5b. the same again after blockd was killed with SIGKILL once v's change
#      map had settled (idle): still an incremental;
#   6. full restore into a new volume vs `restic restore` and vs `cp` + sync
#      of the image, BENCH_REPEAT rounds; blockd's restore between two
#      `cp` + sync runs (its reference is their mean), restic's first or
#      last by turns; round 1's results are compared with the changed
#      image, a mismatch fails the run;
#   7. scaling: a 4x BENCH_SIZE sparse volume holding the image in its first
#      quarter, full backup; then BENCH_REPEAT rounds in which it and `v`
#      each get the same number of fresh 4 KiB writes (spread over the whole
#      of each) and an incremental: the time should track the bytes changed,
#      not the volume size (medians compared);
#   7b. BENCH_REPEAT first (full) backups of a volume holding the image,
#      each into a new local location, between two `cp` + sync runs;
#   8. the full + incremental pair again against a single-node Garage (S3)
#      on 127.0.0.1, for blockd and for restic (bucket per tool);
#   9. per phase, CPU seconds and peak RSS: blockd's from /proc/PID (VmHWM
#      reset through clear_refs at the start of each phase), restic's from
#      /usr/bin/time -v.
#
# Every timed phase starts with `sync; echo 3 > /proc/sys/vm/drop_caches`
# (needs root; without it the run goes on and says so). Times are wall
# clock, blockd's from `blockctl ... --wait` (which polls every 20 ms for two seconds, then every 250 ms; the
# daemon's own task time is printed too). Output: a markdown table with the
# issue's targets next to the measured figures.
#
# Usage: benches/cloudsnap.sh
# Env:
#   BENCH_SIZE     image / volume size, K/M/G/T = powers of 1024, a multiple
#                  of 4M, at least 64M (default 4G; needs ~6.5x that on disk)
#   BENCH_DIR      parent of the temp dir (default /var/tmp; BENCH_TMPDIR
#                  is accepted too)
#   BENCH_SEED     seed of the image and of the change lists (default 1)
#   BENCH_REPEAT   rounds of the full restores and of the 1x / 4x
#                  incremental comparison, 1-5 (default 3; the median counts,
#                  and the restore targets are checked in every round)
#   BENCH_GARAGE   0 skips the Garage rows (default 1; skipped with a
#                  message when no garage binary is found)
#   BENCH_PERF=1   perf record -e cpu-clock on blockd during its phases; the
#                  top symbols of the full backup, the restore and the 4x
#                  volume's full backup are printed after the tables
#                  (perturbs blockd's times)
#   BLOCKD_IO_ENGINE  threads|uring|auto, passed through to blockd
#   BLOCKD_BIN, BLOCKCTL_BIN  binaries (default target/release/{blockd,blockctl});
#                  copied into the temp dir first so a rebuild during the run
#                  cannot mix builds
#   BENCH_GARAGE_BIN  garage binary (default: BLOCKD_TEST_GARAGE, PATH, ~/.cargo/bin)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/common.sh
. "$repo/benches/common.sh"
size_arg=${BENCH_SIZE:-4G}
bench_dir=${BENCH_DIR:-${BENCH_TMPDIR:-/var/tmp}}
seed=${BENCH_SEED:-1}
want_garage=${BENCH_GARAGE:-1}
repeat=${BENCH_REPEAT:-3}
want_perf=${BENCH_PERF:-0}
blockd_src=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_src=${BLOCKCTL_BIN:-$repo/target/release/blockctl}
python=python3
[[ -x /usr/bin/python3 ]] && python=/usr/bin/python3

die() { echo "cloudsnap-bench: $*" >&2; exit 1; }
note() { echo "cloudsnap-bench: $*" >&2; }

# --- arguments and tools ----------------------------------------------------
[[ $size_arg =~ ^([0-9]+)([KMGT]?)$ ]] || die "BENCH_SIZE must be a number with an optional K/M/G/T suffix, not '$size_arg'"
size=${BASH_REMATCH[1]}
case ${BASH_REMATCH[2]} in
K) size=$((size << 10)) ;; M) size=$((size << 20)) ;; G) size=$((size << 30)) ;; T) size=$((size << 40)) ;;
esac
((size >= 64 << 20 && size % (4 << 20) == 0)) || die "BENCH_SIZE must be a multiple of 4M and at least 64M"
[[ $seed =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a number"
# At most 5: v gets 2 + rounds backups and every 7th backup reads everything.
[[ $repeat =~ ^[1-5]$ ]] || die "BENCH_REPEAT must be 1 to 5"
big_size=$((size * 4))
# 1% of the size in 4 KiB writes.
nwrites=$((size / 100 / 4096))
changed=$((nwrites * 4096))

for tool in nbdcopy qemu-img restic "$python"; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install libnbd-bin qemu-utils restic python3)"
done
"$python" -c 'import nbd' 2>/dev/null || die "the libnbd Python module is missing (apt-get install python3-libnbd)"
[[ -x $blockd_src && -x $blockctl_src ]] ||
    die "blockd binaries missing: run 'cargo build --release' in $repo"
time_bin=
if [[ -x /usr/bin/time ]] && /usr/bin/time -v true 2>/dev/null; then
    time_bin=/usr/bin/time
else
    note "/usr/bin/time (GNU, apt-get install time) missing: restic's peak RSS is not measured"
fi
garage_bin=
[[ $want_garage == 0 ]] || find_garage

mkdir -p "$bench_dir"
# Disk use in units of BENCH_SIZE: image 0.75 (its zero stripes are holes),
# volume v 0.75, local objects 1.3 (v and the 4x volume, one full each),
# restic repo 1.2 (its 2nd backup stores almost everything again), Garage
# 1.9 (blockd's full, restic's two); for a while also the restored volume
# 0.75, restic's restored file 1 (it writes the zeros) and the 4x volume
# 0.75 -- some 6x at the peak, asked with a margin.
need=$((size * 13 / 2 + (1 << 30)))
avail=$(df -P -B1 "$bench_dir" | awk 'NR == 2 { print $4 }')
((avail >= need)) ||
    die "not enough free space in $bench_dir: $((avail >> 20)) MiB free, $((need >> 20)) MiB needed for BENCH_SIZE=$size_arg (set BENCH_DIR or a smaller BENCH_SIZE)"

bench_tmp "$bench_dir" cloudsnap

# --- helpers in Python --------------------------------------------------------
cat >"$tmp/bench.py" <<'PY'
import json, os, random, sys
from benchlib import gen, freeports, http_ok

MiB = 1 << 20

def change(seed, count, span, targets):
    """count random 4 KiB writes at distinct 4K-aligned offsets below span,
    the same list to every target (file:PATH or an NBD URI)."""
    rng = random.Random(seed)
    blocks = rng.sample(range(span // 4096), count)
    writes = [(b * 4096, rng.randbytes(4096)) for b in blocks]
    for t in targets:
        if t.startswith("file:"):
            fd = os.open(t[5:], os.O_WRONLY)
            for off, data in writes:
                os.pwrite(fd, data, off)
            os.fsync(fd)
            os.close(fd)
        else:
            import nbd
            h = nbd.NBD()
            h.connect_uri(t)
            for off, data in writes:
                h.pwrite(data, off)
            h.flush()
            h.shutdown()

def task(path, prefix):
    """A `blockctl -j cloudsnap ... --wait` answer: shell assignments."""
    t = json.load(open(path))[0]
    if t["state"] != "Done":
        sys.exit("task %s ended %s: %s" % (t["id"], t["state"], t.get("error")))
    print("%s_snap=%s %s_daemon_s=%.3f %s_transferred=%d" % (
        prefix, t["snapshot"], prefix, t["elapsed_secs"], prefix, t["bytes_transferred"]))

def snap(path, sid):
    """One snapshot of `blockctl -j cloudsnap list`: full uploaded new read."""
    for s in json.load(open(path)):
        if s["id"] == sid:
            print(int(s["full"]), s["bytes_uploaded"], s["bytes_new"], s["bytes_read"])
            return
    sys.exit("snapshot %s not in cloudsnap list" % sid)

def objects(path):
    """`find -printf '%P %s'` of a local location: bytes by kind."""
    kinds = {}
    for line in open(path):
        rel, n = line.rsplit(" ", 1)
        kinds[rel.split("/")[0]] = kinds.get(rel.split("/")[0], 0) + int(n)
    return kinds

def objects_delta(before, after):
    """Bytes of objects that appeared between two listings: packs index other."""
    old = {l.rsplit(" ", 1)[0] for l in open(before)}
    packs = index = other = 0
    for line in open(after):
        rel, n = line.rsplit(" ", 1)
        if rel in old:
            continue
        kind = rel.split("/")[0]
        if kind == "packs":
            packs += int(n)
        elif kind == "index":
            index += int(n)
        else:
            other += int(n)
    print(packs, index, other)

def restic_summary(path):
    """restic backup --json: data_added of the summary line."""
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            m = json.loads(line)
            if m.get("message_type") == "summary":
                print(m["data_added"])
                return
    sys.exit("no summary in restic output %s" % path)

def table(path):
    r = {}
    for line in open(path):
        k, v = line.split(None, 1)
        r[k] = v.strip()
    f = lambda k: float(r[k]) if k in r else None
    size, changed, nw = f("size"), f("changed"), int(f("nwrites"))
    mib = lambda b: "%.1f MiB" % (b / MiB) if b is not None else "—"
    sec = lambda s: "%.2f" % s if s is not None else "—"
    rate = lambda b, s: "%.0f" % (b / MiB / s) if b is not None and s else "—"
    def ratio(p, b):
        return "%.2fx" % (p / b) if p is not None and b else "—"
    ok = lambda c: "yes" if c else "**NO**"
    rows = []
    def row(phase, b, p, nbytes, bb, pb, target):
        rows.append("| %s | %s | %s | %s | %s | %s | %s / %s | %s |" % (
            phase, sec(b), sec(p), ratio(p, b), rate(nbytes, b), rate(nbytes, p), mib(bb), mib(pb), target))

    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None
    bf, rf, cp = f("bd.full.s"), f("rs.full.s"), f("cp.s")
    row("full backup vs `cp` + sync of the image (peer: cp, physical reference)", bf, cp, size,
        f("bd.full.uploaded"), f("image.alloc"), "—")
    nf = sum(1 for k in r if k.startswith("cp.full.") and k.endswith(".s"))
    bd_f = [f("bd.fullr.%d.s" % i) for i in range(1, nf + 1)]
    cp_f = [f("cp.full.%d.s" % i) for i in range(1, nf + 1)]
    if nf and all(bd_f) and all(cp_f):
        each = [c / b for b, c in zip(bd_f, cp_f)]
        t = ">= 0.8x of cp + sync in every round: %s: %s" % (
            " ".join("%.2fx" % x for x in each), ok(min(each) >= 0.8))
        row("full backup (a first backup of the image into a new location per round) vs `cp` + sync just before and after it, median of %d rounds" % nf,
            med(bd_f), med(cp_f), size, f("bd.fullr.1.uploaded"), f("image.alloc"), t)
    t = "—"
    if bf and rf:
        t = ">= 2x restic: %s" % ok(rf / bf >= 2)
    row("full backup, local dir (peer: restic backup)", bf, rf, size,
        f("bd.full.uploaded"), f("rs.full.du"), t)
    bi, ri = f("bd.incr.s"), f("rs.incr.s")
    t = "—"
    if bi and ri:
        t = ">= 50x faster than restic's 2nd run: %s (daemon-side time: %.1fx)" % (
            ok(ri / bi >= 50), ri / f("bd.incr.daemon_s"))
    row("incremental, %d x 4 KiB scattered = 1%% (peer: restic 2nd backup)" % nw, bi, ri, changed,
        f("bd.incr.uploaded"), f("rs.incr.du"), t)
    bc, rc = f("bd.crash.s"), f("rs.crash.s")
    if bc is not None:
        t = "an incremental, not a full read: %s" % ok(f("bd.crash.full") == 0)
        if rc:
            t += "; >= 50x faster than restic: %s" % ok(rc / bc >= 50)
        row("incremental after `kill -9` of blockd (its map settled while idle), another %d x 4 KiB (peer: restic backup of the same change)" % nw,
            bc, rc, changed, f("bd.crash.uploaded"), f("rs.crash.du"), t)
    packs, index = f("bd.incr.packs"), f("bd.incr.index")
    if packs is not None:
        rows.append("| incremental upload vs %s changed: packs / index blocks / manifest+other | | | | | | %s / %s / %s | <= 1.5x changed + index: %.2fx + %s index: %s |" % (
            mib(changed), mib(packs), mib(index), mib(f("bd.incr.other")), packs / changed,
            mib(index), ok(packs <= 1.5 * changed)))
    # Restore rounds: round 1 under bd.restore / rs.restore, round n > 1
    # under bd.restore.n / rs.restore.n; cp.restore.n in every round.
    nr = sum(1 for k in r if k.startswith("cp.restore.") and k.endswith(".s"))
    key = lambda base, i: "%s.s" % base if i == 1 else "%s.%d.s" % (base, i)
    bd_r = [f(key("bd.restore", i)) for i in range(1, nr + 1)]
    rs_r = [f(key("rs.restore", i)) for i in range(1, nr + 1)]
    cp_r = [f("cp.restore.%d.s" % i) for i in range(1, nr + 1)]
    if nr and all(bd_r) and all(cp_r):
        each = [b / c for b, c in zip(bd_r, cp_r)]
        t = "within 1.1x of cp + sync (the mean of the runs just before and after) in every round: %s: %s" % (
            " ".join("%.2fx" % x for x in each), ok(max(each) <= 1.1))
        row("full restore vs `cp` + sync of the image, median of %d rounds (peer: cp)" % nr,
            med(bd_r), med(cp_r), size, f("bd.restore.transferred"), f("image.alloc"), t)
    if nr and all(bd_r) and all(rs_r):
        each = [p / b for b, p in zip(bd_r, rs_r)]
        t = ">= 1.5x restic restore in every round: %s: %s" % (
            " ".join("%.2fx" % x for x in each), ok(min(each) >= 1.5))
        row("full restore, median of %d rounds (peer: restic restore)" % nr,
            med(bd_r), med(rs_r), size, f("bd.restore.transferred"), None, t)
    if "bd.big_full.s" in r:
        rounds = lambda x, k: [float(v) for key, v in r.items() if key.startswith("bd.%s." % x) and key.endswith("." + k)]
        row("full backup, %s sparse volume, first quarter = the image (blockd only)" % mib(4 * size).replace(".0 MiB", " MiB"),
            f("bd.big_full.s"), None, 4 * size, f("bd.big_full.uploaded"), None, "—")
        bg, sm = med(rounds("x4", "daemon_s")), med(rounds("x1", "daemon_s"))
        n = len(rounds("x4", "daemon_s"))
        t = "—"
        if bg and sm:
            t = "within 1.5x of the 1x volume's: %.2fx (daemon-side medians %.2f s vs %.2f s): %s" % (
                bg / sm, bg, sm, ok(bg / sm <= 1.5))
        # blockd column: 4x volume; peer column: the 1x volume, same writes.
        row("incremental, 4x volume (peer column: 1x volume), same %d x 4 KiB, median of %d rounds" % (nw, n),
            med(rounds("x4", "s")), med(rounds("x1", "s")), changed,
            med(rounds("x4", "uploaded")), med(rounds("x1", "uploaded")), t)
    if "g.bd.full.s" in r:
        row("full backup, Garage S3 on loopback (peer: restic on the same Garage)",
            f("g.bd.full.s"), f("g.rs.full.s"), size, f("g.bd.full.uploaded"), f("g.rs.full.stored"), "—")
        row("incremental, Garage S3, another %d x 4 KiB (peer: restic 2nd backup)" % nw,
            f("g.bd.incr.s"), f("g.rs.incr.s"), changed, f("g.bd.incr.uploaded"), f("g.rs.incr.stored"), "—")
    print("| phase | blockd s | peer s | peer/blockd (speedup) | blockd MiB/s | peer MiB/s | bytes: blockd / peer | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print()
    print("| resources per phase | blockd CPU s | restic CPU s | blockd peak RSS (RSS at start) | restic peak RSS |")
    print("|---|---:|---:|---:|---:|")
    m = lambda v: "%.0f MiB" % (v / 1024) if v is not None else "—"
    c = lambda v: "%.1f" % v if v is not None else "—"
    for label, b, p in (("full backup, local", "bd.full", "rs.full"),
                        ("incremental, local", "bd.incr", "rs.incr"),
                        ("full restore", "bd.restore", "rs.restore"),
                        ("full backup, 4x sparse volume", "bd.big_full", None),
                        ("incremental, 4x volume (round 1)", "bd.x4.1", None),
                        ("full backup, Garage", "g.bd.full", "g.rs.full"),
                        ("incremental, Garage", "g.bd.incr", "g.rs.incr")):
        if f(b + ".s") is None:
            continue
        print("| %s | %s | %s | %s (%s) | %s |" % (label, c(f(b + ".cpu_s")), c(f(p + ".cpu_s") if p else None),
              m(f(b + ".rss_kib")), m(f(b + ".rss0_kib")), m(f(p + ".rss_kib") if p else None)))
    if nr > 1:
        peaks = [f("bd.restore.rss_kib")] + [f("bd.restore.%d.rss_kib" % i) for i in range(2, nr + 1)]
        after = [f("bd.restore.%d.rss0_kib" % i) for i in range(2, nr + 1)]
        print()
        print("blockd during the %d full restores: peak RSS %s; RSS before rounds 2-%d (after the one before): %s" % (
            nr, " ".join(m(v) for v in peaks), nr, " ".join(m(v) for v in after)))
    # Each round's blockd time with the cp + sync runs just before and just
    # after it (the reference is their mean).
    for label, bd, cpk, n in (("restore", bd_r, "restore", nr), ("full backup", bd_f, "full", nf)):
        if n and all(bd):
            print()
            print("%s rounds, blockd s / cp + sync just before / just after: %s" % (label, "  ".join(
                "%.2f / %.2f / %.2f" % (b, f("cp0.%s.%d.s" % (cpk, i)), f("cp1.%s.%d.s" % (cpk, i)))
                for i, b in enumerate(bd, 1))))

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "gen":
        gen(args[0], int(args[1]), int(args[2]))
    elif cmd == "change":
        change(int(args[0]), int(args[1]), int(args[2]), args[3:])
    elif cmd == "freeports":
        freeports(int(args[0]))
    elif cmd == "http-ok":
        http_ok(args[0])
    elif cmd == "task":
        task(args[0], args[1])
    elif cmd == "snap":
        snap(args[0], args[1])
    elif cmd == "objects-delta":
        objects_delta(args[0], args[1])
    elif cmd == "restic-summary":
        restic_summary(args[0])
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit("unknown helper " + cmd)
PY
py() { "$python" "$tmp/bench.py" "$@"; }

results=$tmp/results
: >"$results"
put() { echo "$1 $2" >>"$results"; }
failures=()
fail() { echo "cloudsnap-bench: FAILED: $*" >&2; failures+=("$*"); }

warned_cache=0
drop_caches() {
    sync
    if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
        ((warned_cache)) || note "cannot drop the page cache (not root?): phases run with a warm cache"
        warned_cache=1
    fi
}
clock() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
bytes_of() { du -sb "$1" | cut -f1; }

# --- blockd -------------------------------------------------------------------
start_blockd "$tmp/blockd"
ctl volume list >/dev/null
engine=$(sed -n 's/.*blockd ready.*io_engine="\{0,1\}\([a-z_]*\).*/\1/p' "$tmp/blockd.log" | head -n1)

# Daemon-side figures of a phase: peak RSS (VmHWM, reset through clear_refs
# at the start; KEY.rss0_kib is the RSS it was reset to, memory the daemon
# already held) and CPU seconds (utime + stime of every blockd thread).
clk_tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$blockd_pid/stat"; }
vm() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$blockd_pid/status"; }

perf_pid=
perf_start() {
    [[ $want_perf == 1 ]] || return 0
    perf record -e cpu-clock -g -p "$blockd_pid" -o "$tmp/perf.$1.data" >/dev/null 2>&1 &
    perf_pid=$!
    pids+=("$perf_pid")
    sleep 0.5
}
perf_stop() {
    [[ -n $perf_pid ]] || return 0
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    perf_pid=
}

# bd_start KEY / bd_end KEY: around a timed blockd phase. bd_start drops the
# page cache, resets the RSS high-water mark and starts the clock; bd_end
# records KEY.s (wall), KEY.rss_kib, KEY.rss0_kib, KEY.cpu_s, then syncs
# (KEY.sync_s, not part of KEY.s).
bd_t0= bd_cpu0= bd_rss0=
bd_start() {
    drop_caches
    echo 5 >"/proc/$blockd_pid/clear_refs"
    bd_rss0=$(vm VmRSS)
    perf_start "$1"
    bd_cpu0=$(cpu_ticks)
    bd_t0=$(clock)
}
bd_end() {
    local key=$1
    put "$key.s" "$(since "$bd_t0")"
    put "$key.cpu_s" "$(awk -v a="$bd_cpu0" -v b="$(cpu_ticks)" -v t="$clk_tck" 'BEGIN { printf "%.2f", (b - a) / t }')"
    perf_stop
    put "$key.rss_kib" "$(vm VmHWM)"
    put "$key.rss0_kib" "$bd_rss0"
    local t0
    t0=$(clock)
    sync
    put "$key.sync_s" "$(since "$t0")"
}
get() { awk -v k="$1" '$1 == k { v = $2 } END { print v }' "$results"; }

# list_objects FILE: "path size" of every object of the local location (none
# before its first backup).
list_objects() {
    if [[ -d $state/objects ]]; then
        (cd "$state/objects" && find . -type f -printf '%P %s\n') | sort >"$1"
    else
        : >"$1"
    fi
}

# bd_backup KEY VOLUME [ARGS...]: a timed `cloudsnap backup --wait` after a
# cache drop; records KEY.s (wall), KEY.daemon_s, KEY.rss_kib, KEY.uploaded,
# KEY.new, KEY.read, KEY.full and, for the local location, the objects that
# appeared (KEY.packs, KEY.index, KEY.other); then a timed sync (KEY.sync_s).
bd_backup() {
    local key=$1 vol=$2
    shift 2
    local loc=local local_loc=1
    [[ " $* " =~ \ --cred-id\ ([^ ]+)\  ]] && loc=${BASH_REMATCH[1]}
    [[ $loc == local ]] || local_loc=0
    ((local_loc)) && list_objects "$tmp/$key.before"
    bd_start "$key"
    ctl -j cloudsnap backup "$vol" "$@" --wait >"$tmp/$key.json" ||
        { cat "$tmp/$key.json" >&2; die "blockd backup $key failed"; }
    bd_end "$key"
    local bd_snap bd_daemon_s bd_transferred
    eval "$(py task "$tmp/$key.json" bd)"
    put "$key.daemon_s" "$bd_daemon_s"
    ctl -j cloudsnap list --cred-id "$loc" >"$tmp/$key.list"
    local full up new rd
    read -r full up new rd < <(py snap "$tmp/$key.list" "$bd_snap")
    put "$key.full" "$full"
    put "$key.uploaded" "$up"
    put "$key.new" "$new"
    put "$key.read" "$rd"
    if ((local_loc)); then
        list_objects "$tmp/$key.after"
        local p i o
        read -r p i o < <(py objects-delta "$tmp/$key.before" "$tmp/$key.after")
        put "$key.packs" "$p"
        put "$key.index" "$i"
        put "$key.other" "$o"
    fi
    echo "  $key: $(get "$key.s") s wall, daemon ${bd_daemon_s} s, read $((rd >> 20)) MiB, new $((new >> 20)) MiB, uploaded $((up >> 20)) MiB, full=$full" >&2
    bd_last_full=$full
}

# rs_run KEY ARGS...: a timed restic command after a cache drop (wall time
# in KEY.s; max RSS and CPU seconds in KEY.rss_kib, KEY.cpu_s when GNU time
# is there), output in $tmp/KEY.out; then a sync (KEY.sync_s).
rs_run() {
    local key=$1
    shift
    drop_caches
    local t0 wrap=()
    [[ -n $time_bin ]] && wrap=("$time_bin" -v -o "$tmp/$key.time")
    t0=$(clock)
    "${wrap[@]}" restic "$@" >"$tmp/$key.out" 2>"$tmp/$key.err" ||
        { cat "$tmp/$key.err" >&2; die "restic $key failed"; }
    put "$key.s" "$(since "$t0")"
    if [[ -n $time_bin ]]; then
        put "$key.rss_kib" "$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$tmp/$key.time")"
        put "$key.cpu_s" "$(awk -F': ' '/(User|System) time \(seconds\)/ { t += $2 } END { printf "%.2f", t }' "$tmp/$key.time")"
    fi
    t0=$(clock)
    sync
    put "$key.sync_s" "$(since "$t0")"
    echo "  $key: $(get "$key.s") s" >&2
}

export RESTIC_PASSWORD=cloudsnap-bench
export RESTIC_CACHE_DIR=$tmp/restic-cache
export RESTIC_PROGRESS_FPS=0.2

echo "cloudsnap bench: BENCH_SIZE=$size_arg, $nwrites x 4 KiB changes, temp dir $tmp" >&2
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# --- 1. image, imported into volume v ----------------------------------------
img=$tmp/img/disk.img
mkdir "$tmp/img"
echo "1. image" >&2
composition=$(py gen "$img" "$size" "$seed")
put size "$size"
put changed "$changed"
put nwrites "$nwrites"
put image.alloc "$(($(stat -c %b "$img") * $(stat -c %B "$img")))"
ctl volume create v --size "$size" >/dev/null
nbdcopy "$img" "$(uri v)"

# --- 2. cp, the physical reference -------------------------------------------
echo "2. cp" >&2
drop_caches
t0=$(clock)
cp "$img" "$tmp/img/copy.img"
sync
put cp.s "$(since "$t0")"
rm -f "$tmp/img/copy.img"

# --- 3. full backups ---------------------------------------------------------------
echo "3. full backups" >&2
bd_backup bd.full v
((bd_last_full == 1)) || fail "the first backup of v was not full"
export RESTIC_REPOSITORY=$tmp/restic
restic init >"$tmp/restic-init.out" 2>&1 || { cat "$tmp/restic-init.out" >&2; die "restic init failed"; }
rs_run rs.full backup --json --host bench "$img"
put rs.full.du "$(bytes_of "$RESTIC_REPOSITORY")"

# --- 4. the 1% change ------------------------------------------------------------
echo "4. change $nwrites x 4 KiB" >&2
py change "$((seed * 1000 + 1))" "$nwrites" "$size" "file:$img" "$(uri v)"

# --- 5. incrementals -------------------------------------------------------------
echo "5. incrementals" >&2
bd_backup bd.incr v
((bd_last_full == 0)) || fail "the incremental of v read the whole volume (full=true)"
rs_before=$(bytes_of "$RESTIC_REPOSITORY")
rs_run rs.incr backup --json --host bench "$img"
put rs.incr.du "$(($(bytes_of "$RESTIC_REPOSITORY") - rs_before))"
put rs.incr.added "$(py restic-summary "$tmp/rs.incr.out")"

# --- 5b. an incremental after the daemon was killed ---------------------------------
# Another change of the same size on both; once v has been idle long enough
# for its change map to settle on disk, blockd is killed with SIGKILL and
# started again on the same state directory. Its next backup must still be
# an incremental; restic, which keeps no state between runs, backs up the
# same change as its peer.
echo "5b. incremental after kill -9" >&2
py change "$((seed * 1000 + 2))" "$nwrites" "$size" "file:$img" "$(uri v)"
settled=0
for _ in $(seq 300); do
    if ctl -j volume inspect v | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin).get("tracking_settled") else 1)'; then
        settled=1
        break
    fi
    sleep 0.1
done
((settled)) || fail "v's change map did not settle within 30 s of its last write"
kill -KILL "$blockd_pid"
wait "$blockd_pid" 2>/dev/null || true
start_blockd "$state"
bd_backup bd.crash v
((bd_last_full == 0)) || fail "the incremental after kill -9 read the whole volume (full=true)"
rs_before=$(bytes_of "$RESTIC_REPOSITORY")
rs_run rs.crash backup --json --host bench "$img"
put rs.crash.du "$(($(bytes_of "$RESTIC_REPOSITORY") - rs_before))"

# --- 6. full restores, verified, in rounds -----------------------------------------
# BENCH_REPEAT rounds of restores of the same data, each after a cache
# drop: blockd's into a new volume (durable when its task ends) between two
# `cp` of the image + sync (the disk's pace; cp_around), restic's into a new
# directory, before or after by turns. Round 1's keys are bd.restore and
# rs.restore (the resource table and perf use them), later rounds' add the
# round's number.
echo "6. restores, $repeat rounds" >&2
restore_blockd() {
    local key=$1 verify=$2
    bd_start "$key"
    ctl -j cloudsnap restore --snap v --volume r --cred-id local --wait >"$tmp/$key.json" ||
        { cat "$tmp/$key.json" >&2; die "blockd restore failed"; }
    bd_end "$key"
    local rr_snap rr_daemon_s rr_transferred
    eval "$(py task "$tmp/$key.json" rr)"
    put "$key.daemon_s" "$rr_daemon_s"
    put "$key.transferred" "$rr_transferred"
    echo "  $key: $(get "$key.s") s wall, daemon $rr_daemon_s s" >&2
    if ((verify)); then
        if qemu-img compare -q -f raw -F raw "$img" "$(uri r)"; then
            echo "  blockd restore == changed image" >&2
        else
            fail "blockd's restored volume r differs from the changed image"
        fi
    fi
    ctl volume delete r >/dev/null
}
restore_restic() {
    local key=$1 verify=$2
    mkdir "$tmp/restic-out"
    rs_run "$key" restore latest --target "$tmp/restic-out"
    local restored=$tmp/restic-out$img
    if ((verify)); then
        if [[ -f $restored ]] && cmp -s "$img" "$restored"; then
            echo "  restic restore == changed image" >&2
        else
            fail "restic's restored file $restored differs from the changed image"
        fi
    fi
    rm -rf "$tmp/restic-out"
}
cp_sync() {
    local key=$1 t0
    drop_caches
    t0=$(clock)
    cp "$img" "$tmp/img/copy.img"
    sync
    put "$key.s" "$(since "$t0")"
    rm -f "$tmp/img/copy.img"
    echo "  $key: $(get "$key.s") s" >&2
}
# cp_around KEY CMD...: `cp` + sync of the image just before and just after
# CMD (KEY0.s, KEY1.s), and their mean as the reference for CMD (KEY.s): the
# disk's speed drifts within minutes on a shared host, and a reference
# taken on both sides of the measurement cancels a steady drift.
cp_around() {
    local key=$1
    shift
    cp_sync "${key/./0.}"
    "$@"
    cp_sync "${key/./1.}"
    put "$key.s" "$(awk -v a="$(get "${key/./0.}.s")" -v b="$(get "${key/./1.}.s")" 'BEGIN { printf "%.3f", (a + b) / 2 }')"
}
for ((round = 1; round <= repeat; round++)); do
    suffix=.$round
    ((round == 1)) && suffix=
    verify=$((round == 1))
    order=(blockd restic)
    ((round % 2 == 0)) && order=(restic blockd)
    for what in "${order[@]}"; do
        case $what in
        blockd) cp_around "cp.restore.$round" restore_blockd "bd.restore$suffix" "$verify" ;;
        restic) restore_restic "rs.restore$suffix" "$verify" ;;
        esac
    done
done

# --- 7. scaling: same writes, 4x the volume ---------------------------------------
echo "7. 4x volume, $repeat rounds" >&2
ctl volume create big --size "$big_size" >/dev/null
nbdcopy "$img" "$(uri big)"
bd_backup bd.big_full big
# Rounds alternate which volume goes first; each round gives both volumes
# a fresh list of writes (v's also to the image, so the two stay equal) and
# an incremental. The check compares the medians.
for ((round = 1; round <= repeat; round++)); do
    order=(x1 x4)
    ((round % 2 == 0)) && order=(x4 x1)
    for x in "${order[@]}"; do
        if [[ $x == x1 ]]; then
            py change "$((seed * 1000 + 10 + round))" "$nwrites" "$size" "file:$img" "$(uri v)"
            bd_backup "bd.x1.$round" v
        else
            py change "$((seed * 1000 + 20 + round))" "$nwrites" "$big_size" "$(uri big)"
            bd_backup "bd.x4.$round" big
        fi
        ((bd_last_full == 0)) || fail "scaling round $round: the incremental ($x) read the whole volume (full=true)"
    done
done
ctl volume delete big >/dev/null

# --- 7b. full backups in rounds -------------------------------------------------
# A first backup in every round: volume w (the image) into a new local
# location per round, between two `cp` + sync of the image (cp_around).
# Each round's location is removed after it.
echo "7b. full backups, $repeat rounds" >&2
ctl volume create w --size "$size" >/dev/null
nbdcopy "$img" "$(uri w)"
for ((round = 1; round <= repeat; round++)); do
    ctl credentials create "full$round" --provider local --path "$tmp/full$round" >/dev/null
    cp_around "cp.full.$round" bd_backup "bd.fullr.$round" w --cred-id "full$round"
    ((bd_last_full == 1)) || fail "full backup round $round of w was not full"
    rm -rf "${tmp:?}/full$round"
done
ctl volume delete w >/dev/null

# --- 8. Garage ------------------------------------------------------------------------
garage_version=
if [[ -n $garage_bin ]]; then
    echo "8. Garage" >&2
    start_garage "$tmp/garage"
    for b in blockd-bench restic-bench; do
        garage bucket create "$b" >/dev/null
        garage bucket allow --read --write --owner "$b" --key bench >/dev/null
    done
    BLOCKD_S3_SECRET_KEY=$secret ctl credentials create garage --provider s3 \
        --s3-endpoint "127.0.0.1:$s3_port" --s3-disable-ssl --s3-region garage \
        --s3-access-key "$key_id" --bucket blockd-bench >/dev/null

    # v's last backup went to another location: this one reads everything.
    bd_backup g.bd.full v --cred-id garage
    ((bd_last_full == 1)) || fail "the first Garage backup of v was not full"
    export RESTIC_REPOSITORY=s3:http://127.0.0.1:$s3_port/restic-bench
    export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$secret AWS_DEFAULT_REGION=garage
    restic init >"$tmp/restic-s3-init.out" 2>&1 || { cat "$tmp/restic-s3-init.out" >&2; die "restic init on Garage failed"; }
    # Stored bytes (compressed blobs) from restic's index, not timed.
    rs_stored() { restic stats --mode raw-data --json | "$python" -c 'import json, sys; print(json.load(sys.stdin)["total_size"])'; }
    rs_run g.rs.full backup --json --host bench "$img"
    g_rs_full=$(rs_stored)
    put g.rs.full.stored "$g_rs_full"
    py change "$((seed * 1000 + 3))" "$nwrites" "$size" "file:$img" "$(uri v)"
    bd_backup g.bd.incr v --cred-id garage
    ((bd_last_full == 0)) || fail "the Garage incremental of v read the whole volume (full=true)"
    rs_run g.rs.incr backup --json --host bench "$img"
    put g.rs.incr.stored "$(($(rs_stored) - g_rs_full))"
fi

# --- results ---------------------------------------------------------------------------
rs_full_added=$(py restic-summary "$tmp/rs.full.out")
echo
echo "blockd $("$blockctl_bin" --version | awk '{ print $2 }') (io_engine ${engine:-unknown}), $(restic version | awk '{ print $1, $2 }'), ${garage_version:+garage $garage_version, }$(nproc) CPUs, load average $load_start at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
echo "BENCH_SIZE=$size_arg image: $composition; $((size >> 20)) MiB, $(($(get image.alloc) >> 20)) MiB allocated; change: $nwrites x 4 KiB random = $(awk -v c="$changed" 'BEGIN { printf "%.1f", c / 1048576 }') MiB"
echo "Page cache dropped before every timed phase. MiB/s: BENCH_SIZE (4x for the 4x volume) / time for full backups, restores and cp; bytes changed / time for incrementals."
echo "Bytes: blockd's bytes_uploaded (restore: fetched) vs the restic repository's growth (du; on Garage: stored blob bytes from restic stats); cp: the image's allocated bytes."
echo
py table "$results"
echo
echo "blockd daemon-side task times (s): full $(get bd.full.daemon_s), incremental $(get bd.incr.daemon_s), restore $(get bd.restore.daemon_s), 4x full $(get bd.big_full.daemon_s), incrementals 1x / 4x by round $(for ((i = 1; i <= repeat; i++)); do printf '%s/%s ' "$(get "bd.x1.$i.daemon_s")" "$(get "bd.x4.$i.daemon_s")"; done)${garage_bin:+, Garage full $(get g.bd.full.daemon_s), Garage incremental $(get g.bd.incr.daemon_s)}"
echo "sync right after each phase (s), not in the times above: blockd full $(get bd.full.sync_s), incremental $(get bd.incr.sync_s); restic full $(get rs.full.sync_s), 2nd $(get rs.incr.sync_s), restore $(get rs.restore.sync_s)"
echo "restic data_added (before compression): full $((rs_full_added >> 20)) MiB, 2nd $(($(get rs.incr.added) >> 20)) MiB; local objects: blockd $(($(bytes_of "$state/objects") >> 20)) MiB (two full backups, 4x volume included), restic $(($(bytes_of "$tmp/restic") >> 20)) MiB"

if [[ $want_perf == 1 ]]; then
    for k in bd.full bd.restore bd.big_full; do
        [[ -f $tmp/perf.$k.data ]] || continue
        echo
        echo "perf, blockd during $k (cpu-clock, self time, top symbols):"
        echo '```'
        perf report -i "$tmp/perf.$k.data" --no-children --sort dso,symbol --stdio -g none \
            --percent-limit 1 2>/dev/null | grep '%' | grep -v '^#' | sed 's/ *$//' || true
        echo '```'
    done
fi

if ((${#failures[@]})); then
    echo
    echo "!!! FAILED CHECKS:"
    printf '!!!   %s\n' "${failures[@]}"
    exit 1
fi
