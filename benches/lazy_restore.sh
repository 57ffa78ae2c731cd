#!/usr/bin/env bash
# Instant-restore benchmark: how soon a `cloudsnap restore --lazy` volume
# serves its first read, next to how long a full restore keeps the volume
# unusable, in one run on this machine.
#
#   1. two volumes: `s1` (1 GiB: per 4 MiB one zero, one base64 text and two
#      random MiB) and `s16` (16 GiB: the same 1 GiB at the start plus 4 MiB
#      of random data every 256 MiB, the rest holes), each backed up in full
#      to the `local` location (and to Garage unless BENCH_GARAGE=0);
#   2. per snapshot and location, BENCH_REPEAT times: `blockctl cloudsnap
#      restore --lazy`, then, from the moment it returns, connect over NBD
#      and read 4 KiB of data near the end of the snapshot (page cache
#      dropped before each round). Reported: median milliseconds from the
#      command returning to the read's answer, and the command's own time.
#      The task is then stopped (which deletes the volume);
#   3. the same snapshots restored lazily with nothing reading: the time
#      until the hydrator has brought every unit (its throughput);
#   4. the same snapshots restored in full with `--wait`: the time before a
#      full restore's volume can serve its first read.
#
# The hydrator runs at full speed during the reads: the figures include it
# competing for the store and the disk, as it would in use.
#
# Usage: benches/lazy_restore.sh
# Env:
#   BENCH_DIR      parent of the temp dir (default /var/tmp); needs ~4 GiB
#   BENCH_REPEAT   rounds per row, 1-15 (default 5; the median counts)
#   BENCH_GARAGE   0 skips the Garage rows (default 1)
#   BLOCKD_BIN, BLOCKCTL_BIN, BENCH_GARAGE_BIN  binaries, as benches/cloudsnap.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/common.sh
. "$repo/benches/common.sh"
bench_dir=${BENCH_DIR:-/var/tmp}
repeat=${BENCH_REPEAT:-5}
want_garage=${BENCH_GARAGE:-1}
blockd_src=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_src=${BLOCKCTL_BIN:-$repo/target/release/blockctl}
python=python3
[[ -x /usr/bin/python3 ]] && python=/usr/bin/python3

die() { echo "lazy-bench: $*" >&2; exit 1; }
note() { echo "lazy-bench: $*" >&2; }

[[ $repeat =~ ^[0-9]+$ ]] && ((repeat >= 1 && repeat <= 15)) || die "BENCH_REPEAT must be 1 to 15"
"$python" -c 'import nbd' 2>/dev/null || die "the libnbd Python module is missing (apt-get install python3-libnbd)"
[[ -x $blockd_src && -x $blockctl_src ]] || die "blockd binaries missing: run 'cargo build --release' in $repo"
garage_bin=
[[ $want_garage == 0 ]] || find_garage

bench_tmp "$bench_dir" lazy

cat >"$tmp/bench.py" <<'PY'
import base64, json, random, statistics, subprocess, sys, time
import nbd
from benchlib import freeports, http_ok

MiB = 1 << 20

def fill(uri, size):
    """s1's layout, written over NBD: per 4 MiB one hole, one base64 text
    (compresses 4:3), two random; for a 16 GiB volume also 4 MiB of random
    every 256 MiB after the first GiB."""
    rng = random.Random(7)
    h = nbd.NBD()
    h.connect_uri(uri)
    for g in range(0, 1024, 4):
        order = ["zero", "text", "random", "random"]
        rng.shuffle(order)
        for j, kind in enumerate(order):
            if kind == "random":
                h.pwrite(rng.randbytes(MiB), (g + j) * MiB)
            elif kind == "text":
                h.pwrite(base64.b64encode(rng.randbytes(MiB * 3 // 4)), (g + j) * MiB)
    if size > 1 << 30:
        for off in range(1 << 30, size, 256 * MiB):
            h.pwrite(rng.randbytes(4 * MiB), off)
    h.flush()
    h.shutdown()

def first_read(ctl, sock, nbdsock, snap, vol, cred, off):
    """restore --lazy, then one 4 KiB read: ms of the command, ms from its
    return to the read's answer; the task id."""
    cmd = [ctl, "--socket", sock, "-j", "cloudsnap", "restore", "--snap", snap,
           "--volume", vol, "--lazy"] + (["--cred-id", cred] if cred else [])
    t0 = time.monotonic()
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    t1 = time.monotonic()
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (vol, nbdsock))
    data = h.pread(4096, int(off))
    t2 = time.monotonic()
    h.shutdown()
    if data == bytes(4096):
        sys.exit("the read at %s returned zeros: not a data block" % off)
    task = json.loads(out)["tasks"][0]["id"]
    print("%.2f %.2f %s" % ((t1 - t0) * 1000, (t2 - t1) * 1000, task))

def hydrate(ctl, sock, snap, vol, cred):
    """restore --lazy with nothing reading: ms until every unit is
    present (the task Done)."""
    cmd = [ctl, "--socket", sock, "-j", "cloudsnap", "restore", "--snap", snap,
           "--volume", vol, "--lazy"] + (["--cred-id", cred] if cred else [])
    t0 = time.monotonic()
    task = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)["tasks"][0]["id"]
    while True:
        st = json.loads(subprocess.run([ctl, "--socket", sock, "-j", "cloudsnap", "status",
                                        "--name", task], check=True, capture_output=True).stdout)[0]
        if st["state"] == "Done":
            break
        if st["state"] != "Active":
            sys.exit("lazy restore ended %s: %s" % (st["state"], st.get("error")))
        time.sleep(0.02)
    print("%.0f" % ((time.monotonic() - t0) * 1000))

def median(*xs):
    print("%.2f" % statistics.median(float(x) for x in xs))

def snapshot(path):
    print(json.load(open(path))[0]["snapshot"])

def elapsed(path):
    t = json.load(open(path))[0]
    if t["state"] != "Done":
        sys.exit("restore ended %s: %s" % (t["state"], t.get("error")))

if __name__ == "__main__":
    f = globals()[sys.argv[1].replace("-", "_")]
    args = sys.argv[2:]
    if f is fill:
        fill(args[0], int(args[1]))
    elif f is freeports:
        freeports(int(args[0]))
    else:
        f(*args)
PY
py() { "$python" "$tmp/bench.py" "$@"; }
drop_caches() { sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true; }

start_blockd "$tmp/blockd"

echo "1. volumes and backups" >&2
ctl volume create s1 --size 1G >/dev/null
ctl volume create s16 --size 16G >/dev/null
py fill "$(uri s1)" $((1 << 30))
py fill "$(uri s16)" $((16 << 30))
locations=(local)
if [[ -n $garage_bin ]]; then
    start_garage "$tmp/garage"
    garage bucket create blockd-bench >/dev/null
    garage bucket allow --read --write --owner blockd-bench --key bench >/dev/null
    BLOCKD_S3_SECRET_KEY=$secret ctl credentials create garage --provider s3 \
        --s3-endpoint "127.0.0.1:$s3_port" --s3-disable-ssl --s3-region garage \
        --s3-access-key "$key_id" --bucket blockd-bench >/dev/null
    locations+=(garage)
fi
declare -A snap
for loc in "${locations[@]}"; do
    for v in s1 s16; do
        ctl -j cloudsnap backup "$v" --cred-id "$loc" --full --wait >"$tmp/b.json"
        snap[$loc.$v]=$(py snapshot "$tmp/b.json")
    done
done

# Offsets of data near the end of each snapshot: the 1 GiB image's last
# random stripe region, and the last 4 MiB stripe of the 16 GiB volume.
declare -A off=([s1]=$(((1 << 30) - 3 * (1 << 20) + 8192)) [s16]=$(((16 << 30) - (256 << 20) + 12288)))
# s1's last 4 MiB group is shuffled: pick a stripe that holds data.
for try in 1 2 3 4; do
    o=$(((1 << 30) - try * (1 << 20) + 8192))
    if "$python" -c "import nbd,sys; h=nbd.NBD(); h.connect_uri('$(uri s1)'); sys.exit(0 if h.pread(4096,$o) != bytes(4096) else 1)"; then
        off[s1]=$o
        break
    fi
done

echo "2. lazy restores, first read" >&2
rows=()
n=0
for loc in "${locations[@]}"; do
    for v in s1 s16; do
        cmd_ms=() read_ms=()
        for ((i = 1; i <= repeat; i++)); do
            n=$((n + 1))
            drop_caches
            read -r c r task < <(py first-read "$blockctl_bin" "$state/api.sock" "$state/nbd.sock" "${snap[$loc.$v]}" "l$n" "$loc" "${off[$v]}")
            cmd_ms+=("$c")
            read_ms+=("$r")
            ctl cloudsnap stop "$task" >/dev/null
        done
        echo "3. lazy restore until hydrated $loc $v" >&2
        drop_caches
        hyd_ms=$(py hydrate "$blockctl_bin" "$state/api.sock" "${snap[$loc.$v]}" "h$n" "$loc")
        ctl volume delete "h$n" >/dev/null
        echo "4. full restore $loc $v" >&2
        drop_caches
        t0=$(date +%s.%N)
        ctl -j cloudsnap restore --snap "${snap[$loc.$v]}" --volume "f$loc$v" --cred-id "$loc" --wait >"$tmp/r.json"
        t1=$(date +%s.%N)
        py elapsed "$tmp/r.json"
        ctl volume delete "f$loc$v" >/dev/null
        full_ms=$("$python" -c "print('%.0f' % (($t1 - $t0) * 1000))")
        mr=$(py median "${read_ms[@]}")
        mc=$(py median "${cmd_ms[@]}")
        ratio=$("$python" -c "print('%.0fx' % ($full_ms / $mr))")
        ok=$("$python" -c "print('yes' if $mr <= 10 else '**NO**')")
        size=$([[ $v == s1 ]] && echo "1 GiB" || echo "16 GiB")
        rows+=("| $loc | $size | $mc | $mr ($(IFS=/; echo "${read_ms[*]}")) | $full_ms | $ratio | $ok | $hyd_ms |")
    done
done

echo
echo "blockd $("$blockctl_bin" --version | awk '{ print $2 }'), ${garage_version:+garage $garage_version, }$(nproc) CPUs, $repeat rounds per row, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| location | snapshot | restore --lazy returns (ms, median) | first 4 KiB read after it (ms, median; all rounds) | full restore until usable (ms) | full / lazy first read | first read <= 10 ms | lazy restore until hydrated (ms) |"
echo "|---|---|---:|---:|---:|---:|---|---:|"
printf '%s\n' "${rows[@]}"
