#!/usr/bin/env bash
# Relayed media: N concurrent calls, each with 20 ms G.711 RTP both ways
#   SIPp UAC (127.0.0.2, rtp_stream of an A-law file) -> crossbar -> SIPp UAS (-rtp_echo)
# held ~42 s; over a HOLD_S window with all N calls up it measures crossbar's
# CPU (utime+stime from /proc/PID/stat) per call as % of one core, its RSS
# growth per call (VmRSS idle vs. loaded), and packet loss from crossbar's
# `call ended` counters. The same SIPp setup UAC -> UAS directly runs first:
# the CPU SIPp itself needs, as a baseline measured in the same run.
#
# usage: bench/media.sh [N]     (default 500)
# env:   RATE (call arrival cps, default 100), HOLD_S (window, default 25),
#        CROSSBAR_BIN (skip the build), ONLY=direct|crossbar, SKIP_FLOOR=1 (no kernel floor),
#        PIN=0 (by default crossbar and the floor run on CPU 1, SIPp on CPU 0: bench/common.sh),
#        MEDIA_IO=auto|uring|syscalls (media.io of the node: io_uring or system calls)
set -euo pipefail
PIN=${PIN:-1}
source "$(dirname "$0")/common.sh"

N=${1:-500}
RATE=${RATE:-100}
HOLD_S=${HOLD_S:-25}
LOOPS=6                       # uac_media_stream.xml plays the 7.08 s file 6 times
PKTS_PER_PLAY=354             # 56,640 bytes of A-law in 160-byte (20 ms) packets
CLK_TCK=$(getconf CLK_TCK)
WORK=$(mktemp -d /tmp/crossbar-bench-media.XXXXXX)
# SIPp reads the rtp_stream file when it loads the scenario: give it the absolute path.
sed "s#@AUDIO@#$ROOT/tests/data/g711a.al#" "$ROOT/tests/sipp/uac_media_stream.xml" > "$WORK/uac_media_stream.xml"
echo "bench: files in $WORK; $N calls, arrival $RATE cps, window $HOLD_S s"
BUF=(-buff_size 4194304)
RTPBUF=(-rtp_buffsize 4194304)   # the echo socket takes every call's RTP: 25,000 packets/s at 500 calls
RAMP_S=$(( (N + RATE - 1) / RATE + 2 ))

# measure NAME TARGET UAS_PORT [CROSSBAR_PID]
measure() {
    local name=$1 target=$2 uas_port=$3 cb=${4:-} dir="$WORK/$1"
    local echo_port; echo_port=$(free_port 127.0.0.1)
    mkdir -p "$dir"
    "${PIN_GEN[@]}" "$SIPP" -sf "$ROOT/tests/sipp/uas_echo_bench.xml" -i 127.0.0.1 -p "$uas_port" \
        -mi 127.0.0.1 -mp "$echo_port" -rtp_echo "${BUF[@]}" "${RTPBUF[@]}" \
        -timeout $(( RAMP_S + LOOPS * 8 + 60 ))s -trace_err -error_file "$dir/uas_errors.log" > "$dir/uas.out" 2>&1 &
    local uas=$!; CHILDREN+=("$uas")
    sleep 0.5
    local rss0=0; [[ -n $cb ]] && rss0=$(rss_kb "$cb")
    local drops0; drops0=$(udp_rcvbuf_errors)
    "${PIN_GEN[@]}" "$SIPP" -sf "$WORK/uac_media_stream.xml" "$target" -i 127.0.0.2 -p "$(free_port 127.0.0.2)" \
        -mi 127.0.0.2 -mp "$(free_port 127.0.0.2)" -s 15550001000 \
        -key from_user 15551230000 -key from_domain 127.0.0.2 -key ruri_host 127.0.0.1 \
        "${BUF[@]}" "${RTPBUF[@]}" -r "$RATE" -m "$N" -l "$N" -recv_timeout 10000 \
        -timeout $(( RAMP_S + LOOPS * 8 + 50 ))s -timeout_error -trace_stat -fd 1 -stf "$dir/uac_stat.csv" \
        -trace_err -error_file "$dir/uac_errors.log" > "$dir/uac.out" 2>&1 &
    local uac=$!; CHILDREN+=("$uac")
    sleep "$RAMP_S"
    local c0 u0 s0 c1 u1 s1 rss1=0
    c0=$([[ -n $cb ]] && cpu_ticks "$cb" || echo 0); u0=$(cpu_ticks "$uac"); s0=$(cpu_ticks "$uas")
    sleep $(( HOLD_S / 2 ))
    [[ -n $cb ]] && rss1=$(rss_kb "$cb")
    sleep $(( HOLD_S - HOLD_S / 2 ))
    c1=$([[ -n $cb ]] && cpu_ticks "$cb" || echo 0); u1=$(cpu_ticks "$uac"); s1=$(cpu_ticks "$uas")
    local rc=0; wait "$uac" || rc=$?
    # SIPp's echo socket (one for all calls) can overflow when SIPp is descheduled:
    # that loss is SIPp's, counted here to tell it apart from crossbar's.
    UAS_ECHO_DROPS=$(socket_drops 127.0.0.1 "$echo_port")
    echo "  $name: SIPp UAS echo socket dropped $UAS_ECHO_DROPS datagrams (its receive buffer was full)"
    kill "$uas" 2>/dev/null || true; wait "$uas" 2>/dev/null || true
    local ok failed
    ok=$(stat_col "$dir/uac_stat.csv" 'SuccessfulCall(C)'); failed=$(stat_col "$dir/uac_stat.csv" 'FailedCall(C)')
    echo "  $name: $ok calls ok, $failed failed (SIPp exit $rc); kernel UDP receive-buffer drops, whole machine (SIPp UAC never reads the echo: ~all of them are its): $(( $(udp_rcvbuf_errors) - drops0 ))"
    awk -v t="$(( u1 - u0 + s1 - s0 ))" -v hz="$CLK_TCK" -v w="$HOLD_S" -v n="$N" \
        'BEGIN {printf "  %-9s SIPp UAC+UAS CPU: %.1f%% of one core (%.4f%% per call)\n", "", t/hz/w*100, t/hz/w*100/n}'
    if [[ -n $cb ]]; then
        awk -v t="$(( c1 - c0 ))" -v hz="$CLK_TCK" -v w="$HOLD_S" -v n="$N" -v r0="$rss0" -v r1="$rss1" \
            'BEGIN {printf "  %-9s crossbar CPU:      %.1f%% of one core = %.4f%% per relayed call\n  %-9s crossbar RSS:      %d kB idle, %d kB with %d calls = %.1f kB per call\n", "", t/hz/w*100, t/hz/w*100/n, "", r0, r1, n, (r1-r0)/n}'
    fi
}

# The kernel's floor on this machine, same run: recvfrom + sendto alone for N calls'
# sockets, no relay logic (examples/udp_floor.rs). No user-space relay with one socket
# per port can go below it.
if [[ -z "${SKIP_FLOOR:-}" ]]; then
    TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
    (cd "$ROOT" && cargo build --release --quiet --example udp_floor) || { echo "bench: building udp_floor failed" >&2; exit 1; }
    FLOOR=$("${PIN_CB[@]}" "$TARGET/release/examples/udp_floor" "$N" | grep '^RESULT')
    echo "$FLOOR" | tr ' ' '\n' | awk -F= '{v[$1]=$2} END {printf "== kernel floor (examples/udp_floor, %s): recvfrom %.2f us + sendto %.2f us per packet = %.4f%% of one core per call at 100 packets/s\n", "'"$N"' calls", v["recv_us"], v["send_us"], v["pct_per_call"]}'
fi

if [[ "${ONLY:-}" != crossbar ]]; then
    echo "== SIPp UAC -> SIPp UAS (direct baseline)"
    p=$(free_port 127.0.0.1)
    measure direct "127.0.0.1:$p" "$p"
fi
if [[ "${ONLY:-}" != direct ]]; then
    BIN=$(crossbar_bin)
    SIP=$(free_port 127.0.0.1)
    RTP=$(( 20000 + (RANDOM % 10) * 2000 ))
    write_config "$WORK/node" "$SIP" "$RTP" $(( RTP + 19999 )) "$(free_port 127.0.0.2)" "warn,crossbar::actors::call=info"
    start_crossbar "$BIN" "$WORK/node"; CHILDREN+=("$CB_PID")
    UAS_PORT=$(free_port 127.0.0.1)
    register_uas "$SIP" "$UAS_PORT" "$WORK/node"
    echo "== SIPp UAC -> crossbar -> SIPp UAS ($BIN, pid $CB_PID)"
    measure crossbar "127.0.0.1:$SIP" "$UAS_PORT" "$CB_PID"
    sleep 1
    grep 'call ended' "$WORK/node/crossbar.err" | sed 's/\x1b\[[0-9;]*m//g' | awk -v n="$N" -v sent=$(( PKTS_PER_PLAY * LOOPS )) -v sipp_drops="$UAS_ECHO_DROPS" '
        { for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "a_to_b_packets") a += kv[2];
          if (kv[1] == "b_to_a_packets") b += kv[2]; if (kv[1] == "dropped_packets") d += kv[2] } c++ }
        END {
          printf "  crossbar  %d calls ended; RTP a->b %d (SIPp sent %d), b->a (echo) %d, dropped by crossbar %d\n", c, a, sent * n, b, d
          if (a > 0) printf "  crossbar  loss: caller->crossbar %.3f%%, crossbar->callee->crossbar (echo) %.3f%%, of which SIPp'"'"'s echo socket dropped %d: echo loss not SIPp'"'"'s %.3f%%\n", (sent*n - a) / (sent*n) * 100, (a - b) / a * 100, sipp_drops, (a - b - sipp_drops) / a * 100
        }'
fi
