#!/usr/bin/env bash
# NBD over TCP, plain and with TLS: what TLS costs blockd, next to what it
# costs qemu-nbd, in one run on this machine.
#
# One image of BENCH_SIZE (default 1G) of random data is served by blockd
# (a volume filled from it) and by qemu-nbd (the image file itself), each on
# 127.0.0.1 in plain text and with TLS (x509, TLS 1.3, certificates made by
# openssl for the run; qemu-nbd through --object tls-creds-x509). nbdcopy
# (libnbd) then reads the whole export to null: and writes the image back,
# BENCH_REPEAT times each (median), with the page cache dropped before each
# round. Reported: MiB/s per row, TLS/plain per server, blockd/qemu-nbd per
# mode.
#
# Usage: benches/tls.sh
# Env: BENCH_DIR (default /var/tmp), BENCH_SIZE (default 1G),
#      BENCH_REPEAT (default 3), BLOCKD_BIN, BLOCKCTL_BIN
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/common.sh
. "$repo/benches/common.sh"
bench_dir=${BENCH_DIR:-/var/tmp}
size=${BENCH_SIZE:-1G}
repeat=${BENCH_REPEAT:-3}
blockd_src=${BLOCKD_BIN:-$repo/target/release/blockd}
blockctl_src=${BLOCKCTL_BIN:-$repo/target/release/blockctl}

die() { echo "tls-bench: $*" >&2; exit 1; }
note() { echo "tls-bench: $*" >&2; }

for t in nbdcopy qemu-nbd openssl; do
    command -v "$t" >/dev/null || die "$t is missing (tests/run --install-only installs the peers)"
done
[[ -x $blockd_src && -x $blockctl_src ]] || die "blockd binaries missing: run 'cargo build --release' in $repo"
bench_tmp "$bench_dir" tls

# Certificates: one CA, a server certificate for localhost, the client
# trusting the CA (the directory layouts blockd, qemu and libnbd share).
pki=$tmp/pki
mkdir -p "$pki/srv" "$pki/cli"
(
    cd "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench-ca -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
        -keyout srv/server-key.pem -out server.csr 2>/dev/null
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -days 2 \
        -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') \
        -out srv/server-cert.pem 2>/dev/null
    cp ca-cert.pem srv/ && cp ca-cert.pem cli/
)

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listens on $1"
}

note "writing a $size image of random data"
img=$tmp/src.img
bytes=$(numfmt --from=iec "$size")
head -c "$bytes" /dev/urandom >"$img"

# blockd: plain on one port, TLS offered on another (one daemon each, so
# the plain one really has no TLS).
state_plain=$tmp/bp
state_tls=$tmp/bt
bp_port=$(port)
bt_port=$(port)
mkdir -m 700 "$state_plain" "$state_tls"
"$blockd_bin" --state-dir "$state_plain" --nbd-listen "127.0.0.1:$bp_port" >"$tmp/bp.log" 2>&1 &
pids+=($!)
"$blockd_bin" --state-dir "$state_tls" --nbd-listen "127.0.0.1:$bt_port" \
    --nbd-tls require --nbd-tls-certificates "$pki/srv" >"$tmp/bt.log" 2>&1 &
pids+=($!)
wait_port "$bp_port"
wait_port "$bt_port"
for s in "$state_plain" "$state_tls"; do
    "$blockctl_bin" --socket "$s/api.sock" volume create vol --size "$bytes" >/dev/null
    nbdcopy "$img" "nbd+unix:///vol?socket=$s/nbd.sock"
done

# qemu-nbd on a copy of the image, plain and TLS.
cp "$img" "$tmp/q.img"
qp_port=$(port)
qt_port=$(port)
qemu-nbd -f raw -x vol -b 127.0.0.1 -p "$qp_port" --shared=8 -t "$tmp/q.img" &
pids+=($!)
qemu-nbd -f raw -x vol -b 127.0.0.1 -p "$qt_port" --shared=8 -t \
    --object "tls-creds-x509,id=tls0,endpoint=server,dir=$pki/srv,verify-peer=off" --tls-creds tls0 "$tmp/q.img" &
pids+=($!)
wait_port "$qp_port"
wait_port "$qt_port"

declare -A uris=(
    [blockd/plain]="nbd://localhost:$bp_port/vol"
    [blockd/tls]="nbds://localhost:$bt_port/vol?tls-certificates=$pki/cli"
    [qemu-nbd/plain]="nbd://localhost:$qp_port/vol"
    [qemu-nbd/tls]="nbds://localhost:$qt_port/vol?tls-certificates=$pki/cli"
)

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timed() { # prints seconds taken by "$@"
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null || { echo failed; return; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}

declare -A mibs
for row in blockd/plain blockd/tls qemu-nbd/plain qemu-nbd/tls; do
    u=${uris[$row]}
    r=$(for _ in $(seq "$repeat"); do timed timeout 300 nbdcopy "$u" null:; done | median)
    w=$(for _ in $(seq "$repeat"); do timed timeout 300 nbdcopy "$img" "$u"; done | median)
    [[ $r =~ ^[0-9.]+$ && $w =~ ^[0-9.]+$ ]] || die "$row: nbdcopy failed (see above)"
    mibs[$row/read]=$(echo "$bytes / 1048576 / $r" | bc -l)
    mibs[$row/write]=$(echo "$bytes / 1048576 / $w" | bc -l)
    note "$row: read ${r}s write ${w}s"
done

printf '\n%-16s %12s %12s\n' "server/mode" "read MiB/s" "write MiB/s"
for row in blockd/plain blockd/tls qemu-nbd/plain qemu-nbd/tls; do
    printf '%-16s %12.0f %12.0f\n' "$row" "${mibs[$row/read]}" "${mibs[$row/write]}"
done
printf '\nratios\n'
for op in read write; do
    printf '%-5s blockd TLS/plain %.2f   qemu-nbd TLS/plain %.2f   blockd/qemu-nbd plain %.2fx   TLS %.2fx\n' "$op" \
        "$(echo "${mibs[blockd/tls/$op]} / ${mibs[blockd/plain/$op]}" | bc -l)" \
        "$(echo "${mibs[qemu-nbd/tls/$op]} / ${mibs[qemu-nbd/plain/$op]}" | bc -l)" \
        "$(echo "${mibs[blockd/plain/$op]} / ${mibs[qemu-nbd/plain/$op]}" | bc -l)" \
        "$(echo "${mibs[blockd/tls/$op]} / ${mibs[qemu-nbd/tls/$op]}" | bc -l)"
done
