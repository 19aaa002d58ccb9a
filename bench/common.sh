# Shared helpers of bench/cps.sh and bench/media.sh (sourced, not run).
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIPP=${SIPP:-sipp}
command -v "$SIPP" >/dev/null || { echo "bench: SIPp not found (apt-get install sip-tester)" >&2; exit 1; }

# PIN=1 (the default of media.sh and webrtc.sh): crossbar (and the kernel floor example)
# on CPU 1, the load generators (SIPp, the WebRTC load client) on CPU 0, so that crossbar's
# CPU per call is crossbar's, as on a deployment where the callers are other machines.
# Unpinned, the scheduler mixes them on both cores and crossbar's figure also counts its
# being preempted by the generators and sharing caches with them: with the WebRTC load
# client (300 str0m peers, ~5,000 involuntary context switches a second of crossbar's
# media thread) that inflated the bridge's figure by about 1.8x. What pinning cannot
# remove: on loopback a sendto also runs the receiver's side of the kernel path (and its
# wake-up) in the sender's context, which a real NIC would not charge to crossbar.
if [[ "${PIN:-}" == 1 && $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
    PIN_CB=(taskset -c 1); PIN_GEN=(taskset -c 0)
else
    PIN_CB=(); PIN_GEN=()
fi

# The release binary: $CROSSBAR_BIN, or built once with `cargo build --release`.
crossbar_bin() {
    if [[ -n "${CROSSBAR_BIN:-}" ]]; then echo "$CROSSBAR_BIN"; return; fi
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    if [[ ! -x "$target/release/crossbar" || -n "$(find "$ROOT/src" "$ROOT/Cargo.toml" -newer "$target/release/crossbar" -print -quit 2>/dev/null)" ]]; then
        echo "bench: building the release binary (cargo build --release)..." >&2
        (cd "$ROOT" && cargo build --release --quiet) >&2 || { echo "bench: build failed" >&2; exit 1; }
    fi
    echo "$target/release/crossbar"
}

# A port free for UDP and TCP on $1 (python-free: ask the kernel via bash's /dev/udp is not
# a bind; so pick a random high port and check /proc/net/{udp,tcp} for it).
free_port() {
    local ip=$1 p hex iphex
    iphex=$(printf '%02X%02X%02X%02X' $(echo "$ip" | awk -F. '{print $4, $3, $2, $1}'))
    for _ in $(seq 1 200); do
        p=$(( 20000 + RANDOM % 40000 ))
        hex=$(printf '%04X' "$p")
        if ! grep -qiE "^ *[0-9]+: ($iphex|00000000):$hex " /proc/net/udp /proc/net/tcp 2>/dev/null; then
            echo "$p"; return
        fi
    done
    echo "bench: no free port on $ip" >&2; exit 1
}

# write_config DIR SIP_PORT RTP_MIN RTP_MAX TRUNK_PORT LOG_LEVEL
# env: MEDIA_IO = auto (default) | uring | syscalls: the media threads' I/O (media.io)
write_config() {
    local dir=$1
    mkdir -p "$dir/tenants" "$dir/data"
    cat > "$dir/crossbar.toml" <<TOML
[node]
name = "crossbar-bench"
data_dir = "data"
log_level = "$6"
max_calls = 200000

[sip]
udp = ["127.0.0.1:$2"]
tcp = ["127.0.0.1:$2"]
advertised_ip = "127.0.0.1"
overload_wait_ms = ${OVERLOAD_WAIT_MS:-100}

[media]
bind_ip = "127.0.0.1"
public_ip = "127.0.0.1"
rtp_port_min = $3
rtp_port_max = $4
io = "${MEDIA_IO:-auto}"

[[trunk]]
name = "demo-carrier"
inbound_sources = ["127.0.0.2"]
outbound = "127.0.0.2:$5"
TOML
    cat > "$dir/tenants/acme.toml" <<'TOML'
id = "acme"
name = "Acme Corp"
domain = "acme.localhost"
plan = "enterprise"
[limits]
max_calls = 200000
calls_per_second = 1000000

[[did]]
number = "15550001000"
extension = "1001"

[[user]]
extension = "1001"
password = "acme1001pw"

[[user]]
extension = "1002"
password = "acme1002pw"
TOML
    printf 'SEQUENTIAL\n1001;acme.localhost;acme1001pw\n' > "$dir/creds.csv"
}

# start_crossbar BIN DIR -> sets CB_PID; waits for "crossbar ready" (20 s)
start_crossbar() {
    local bin=$1 dir=$2
    "${PIN_CB[@]}" "$bin" run --config "$dir/crossbar.toml" > "$dir/crossbar.out" 2> "$dir/crossbar.err" &
    CB_PID=$!
    for _ in $(seq 1 200); do
        grep -q '^crossbar ready' "$dir/crossbar.out" 2>/dev/null && return 0
        kill -0 "$CB_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench: crossbar did not become ready; stderr:" >&2; tail -20 "$dir/crossbar.err" >&2; exit 1
}

# register_uas CB_PORT UAS_PORT DIR: REGISTER 1001 from 127.0.0.1:UAS_PORT
register_uas() {
    "${PIN_GEN[@]}" "$SIPP" -sf "$ROOT/tests/sipp/register_once.xml" "127.0.0.1:$1" -i 127.0.0.1 -p "$2" \
        -inf "$3/creds.csv" -au 1001 -ap acme1001pw -m 1 -timeout 10s -timeout_error \
        -trace_err -error_file "$3/register_errors.log" > /dev/null 2>&1 \
        || { echo "bench: REGISTER of the UAS failed:" >&2; cat "$3/register_errors.log" >&2; exit 1; }
}

# cpu_ticks PID: utime+stime (clock ticks)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# rss_kb PID
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# failure_summary ERROR_FILE [N]: what failed calls died of, from a SIPp -trace_err file,
# most frequent first (N kinds, default 5): unexpected responses with crossbar's Warning
# text (e.g. "node overloaded", "no media ports available"), receive timeouts, ...
failure_summary() {
    [[ -s "$1" ]] || return 0
    # ("Dead call X (successful)": a late retransmission for a call that had succeeded)
    { grep -aP "^'?\d{4}-\d\d-\d\d\t" "$1" \
        | sed -E "s/^'?[0-9-]+\t[0-9:.]+\t[0-9.]+: //; s/[0-9]+-[0-9]+@[0-9.]+/X/g; s/ \(index [0-9]+\)//
                  s/Aborting call on unexpected message for Call-Id 'X': while expecting/unexpected message, expecting/
                  s/ without label to jump to.*//; s/(received '[^ ]+ [0-9]+ [A-Za-z ]*).*/\1'/; s/(received '[A-Z]+) .*/\1'/" \
        | cut -c1-100
      grep -a '^Warning: ' "$1" | sed -E 's/^Warning: [0-9]+ [^ ]+ /  (Warning: /; s/$/)/'; } \
        | sort | uniq -c | sort -rn | head -"${2:-5}" || true   # (head closing the pipe is no error)
}

# Last value of column NAME in a SIPp -trace_stat CSV (';'-separated).
stat_col() {
    awk -F';' -v name="$2" 'NR==1 {for (i=1;i<=NF;i++) if ($i==name) c=i; next} c {v=$c} END {print v+0}' "$1"
}

CHILDREN=()
cleanup() {
    set +e   # errexit would stop at the first child that already ended
    for p in "${CHILDREN[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    # The node's store grows ~200 MB in a CPS run: logs and SIPp files stay, the store
    # goes (KEEP=1 keeps it).
    [[ -n ${WORK:-} && -z ${KEEP:-} && -d $WORK ]] && find "$WORK" -name '*.redb' -delete
    return 0
}
trap cleanup EXIT

# Datagrams the kernel dropped machine-wide because a socket's receive buffer
# was full (/proc/net/snmp Udp RcvbufErrors): tells kernel drops from relay loss.
# socket_drops IP PORT: datagrams the kernel dropped at that UDP socket (receive buffer
# full), from the last column of /proc/net/udp.
socket_drops() {
    local iphex porthex
    iphex=$(printf '%02X%02X%02X%02X' $(echo "$1" | awk -F. '{print $4, $3, $2, $1}'))
    porthex=$(printf '%04X' "$2")
    awk -v a="$iphex:$porthex" 'toupper($2) == a { d += $NF } END { print d + 0 }' /proc/net/udp
}

udp_rcvbuf_errors() {
    awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "RcvbufErrors") c = i; h = 1 } else { print $c; exit } }' /proc/net/snmp
}
