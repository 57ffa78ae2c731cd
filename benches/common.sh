# Set-up shared by the benchmark scripts (sourced): the run's temp dir and
# its cleanup, one copy of the binaries for the whole run, blockd's start,
# and a single-node Garage (S3) on 127.0.0.1 as tests/common/objstores.rs
# starts one for the tests.
#
# The sourcing script defines `die` and sets `repo`, `blockd_src`,
# `blockctl_src` before calling these.

# find_garage: sets garage_bin from BENCH_GARAGE_BIN, BLOCKD_TEST_GARAGE, PATH
# or ~/.cargo/bin (empty, with a note on stderr, when there is none).
find_garage() {
    garage_bin=
    local g
    for g in "${BENCH_GARAGE_BIN:-}" "${BLOCKD_TEST_GARAGE:-}" "$(command -v garage || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/garage"; do
        [[ -n $g && -x $g ]] && { garage_bin=$g; break; }
    done
    [[ -n $garage_bin ]] || echo "SKIPPED the Garage rows: no garage binary (tests/run --install-only, or BENCH_GARAGE_BIN)" >&2
}

# bench_tmp PARENT NAME: makes $tmp (on a real disk: /var/tmp rather than a
# possible tmpfs /tmp; the path stays short because Unix socket paths are
# limited to 108 bytes) and the traps that clean it up: `bench_unmount`
# (if the script defines it) runs first, then every PID in `pids` gets
# TERM, five seconds, KILL. Copies the binaries to $tmp/bin (a rebuild
# during the run cannot mix builds) and benchlib.py next to bench.py.
bench_tmp() {
    mkdir -p "$1"
    tmp=$(mktemp -d "$1/$2.XXXXXX")
    pids=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    mkdir "$tmp/bin"
    cp "$blockd_src" "$tmp/bin/blockd"
    cp "$blockctl_src" "$tmp/bin/blockctl"
    blockd_bin=$tmp/bin/blockd
    blockctl_bin=$tmp/bin/blockctl
    cp "$repo/benches/benchlib.py" "$tmp/benchlib.py"
}

bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    declare -F bench_unmount >/dev/null && bench_unmount
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
    # A failed run shows what the daemon said before its files go.
    if ((rc != 0)) && [[ -s $tmp/blockd.log ]]; then
        echo "--- last lines of blockd's log:" >&2
        tail -n 40 "$tmp/blockd.log" >&2
    fi
    rm -rf "$tmp"
    exit "$rc"
}

# start_blockd STATE_DIR: starts $blockd_bin there (log in $tmp/blockd.log,
# BLOCKD_LOG or info), waits for its sockets; sets blockd_pid, state and
# defines `ctl` (blockctl against it) and `uri VOLUME`.
start_blockd() {
    state=$1
    # -p: a restart on the same state directory (after a kill) is allowed.
    mkdir -p -m 700 "$state"
    BLOCKD_LOG=${BLOCKD_LOG:-info} "$blockd_bin" --state-dir "$state" </dev/null >"$tmp/blockd.log" 2>&1 &
    blockd_pid=$!
    pids+=("$blockd_pid")
    for _ in $(seq 300); do
        [[ -S $state/api.sock && -S $state/nbd.sock ]] && break
        kill -0 "$blockd_pid" 2>/dev/null || { cat "$tmp/blockd.log" >&2; die "blockd exited during startup"; }
        sleep 0.1
    done
    [[ -S $state/api.sock ]] || { cat "$tmp/blockd.log" >&2; die "blockd: no socket after 30s"; }
    ctl() { "$blockctl_bin" --socket "$state/api.sock" "$@"; }
    uri() { echo "nbd+unix:///$1?socket=$state/nbd.sock"; }
}

# start_garage DIR: needs $garage_bin, `py` (bench.py with benchlib's
# freeports and http_ok) and `pids` (the PID is appended for cleanup).
# Sets gdir, s3_port, key_id, secret, garage_version, garage_pid; defines
# the `garage` command (CLI against this node) for creating buckets:
#   garage bucket create B; garage bucket allow --read --write --owner B --key bench
start_garage() {
    gdir=$1
    mkdir "$gdir"
    read -r rpc_port s3_port admin_port < <(py freeports 3)
    cat >"$gdir/garage.toml" <<EOF
# cloudsnap bench: single node, loopback only (as tests/common/objstores.rs)
metadata_dir = "$gdir/meta"
data_dir = "$gdir/data"
db_engine = "sqlite"
disable_scrub = true
replication_factor = 1

rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
bootstrap_peers = []

[s3_api]
api_bind_addr = "127.0.0.1:$s3_port"
s3_region = "garage"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
admin_token = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
EOF
    # Only the config file counts: no GARAGE_* variable reaches garage.
    garage_env=()
    for v in $(compgen -e); do [[ $v == GARAGE_* ]] && garage_env+=(-u "$v"); done
    garage() { env "${garage_env[@]}" "$garage_bin" -c "$gdir/garage.toml" "$@" </dev/null; }
    garage_version=$(garage --version | sed 's/^garage //')
    # Not through the function: $! must be garage itself (env execs it).
    env "${garage_env[@]}" RUST_LOG=garage=info,warn NO_COLOR=1 \
        "$garage_bin" -c "$gdir/garage.toml" server </dev/null >"$gdir/garage.log" 2>&1 &
    garage_pid=$!
    pids+=("$garage_pid")
    ok=0
    for _ in $(seq 300); do
        kill -0 "$garage_pid" 2>/dev/null || { cat "$gdir/garage.log" >&2; die "garage exited during startup"; }
        garage status >/dev/null 2>&1 && { ok=1; break; }
        sleep 0.1
    done
    ((ok)) || { cat "$gdir/garage.log" >&2; die "garage: no answer after 30s"; }
    node_id=$(garage node id -q | awk '{ split($1, a, "@"); print a[1]; exit }')
    [[ -n $node_id ]] || die "cannot parse 'garage node id'"
    garage layout assign -z dc1 -c 1G "$node_id" >/dev/null
    garage layout apply --version 1 >/dev/null
    ok=0
    for _ in $(seq 300); do
        py http-ok "http://127.0.0.1:$admin_port/health" && { ok=1; break; }
        sleep 0.1
    done
    ((ok)) || { cat "$gdir/garage.log" >&2; die "garage: /health not 200 after 30s"; }
    field() { awk -F': *' -v k="$1" '{ sub(/^[ \t]+/, "") } $1 == k { print $2; exit }'; }
    created=$(garage key create bench)
    key_id=$(field "Key ID" <<<"$created")
    secret=$(field "Secret key" <<<"$created")
    if [[ -z $secret || $secret == \(* ]]; then
        secret=$(garage key info --show-secret "$key_id" | field "Secret key")
    fi
    [[ $key_id == GK* && -n $secret ]] || die "cannot parse 'garage key create' output: $created"
}
