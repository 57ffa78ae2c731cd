# Starts a single-node Garage (S3) on 127.0.0.1 for the benchmarks, as
# tests/common/objstores.rs does for the tests. Sourced by the bench scripts.
#
#   start_garage DIR   needs: $garage_bin, die, py (bench.py's freeports and
#                      http-ok), pids (the PID is appended for cleanup).
#   Sets: gdir, s3_port, key_id, secret, garage_version, garage_pid; defines
#   the `garage` command (CLI against this node) for creating buckets:
#     garage bucket create B; garage bucket allow --read --write --owner B --key bench
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
