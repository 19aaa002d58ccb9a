#!/usr/bin/env bash
# WebRTC <-> RTP bridged calls: N str0m "browsers" (examples/webrtc_load.rs; full ICE,
# DTLS-SRTP, 20 ms PCMA both ways) call an external number over SIP/WebSocket; crossbar
# bridges each to plain RTP towards a SIPp carrier that echoes RTP back. While all N
# calls are up it measures crossbar's CPU per call (% of one core) and RSS per call,
# and loss (sent by the clients vs. echoed back through both bridge directions).
# The plain RTP relay figure of the same machine is measured in the same run
# (bench/media.sh with ONLY=crossbar and the same N) as the baseline.
#
# usage: bench/webrtc.sh [N]      (default 300)
# env:   HOLD_S (call length, default 40), WINDOW_S (CPU window, default 15),
#        RATE (calls per second, default 50), SKIP_PLAIN=1 (no baseline),
#        LOAD_WAKE=1 (the load client sleeps on its sockets, so crossbar's sends wake it;
#        by default it polls them every ms, as a remote browser costs crossbar no wake-up),
#        PIN=0 (by default crossbar runs on CPU 1, the load client and SIPp on CPU 0: bench/common.sh),
#        MEDIA_IO=auto|uring|syscalls (media.io of the node: io_uring or system calls)
set -euo pipefail
PIN=${PIN:-1}
source "$(dirname "$0")/common.sh"

N=${1:-300}
HOLD_S=${HOLD_S:-40}
WINDOW_S=${WINDOW_S:-15}
RATE=${RATE:-50}
WORK=$(mktemp -d /tmp/crossbar-bench-webrtc.XXXXXX)
echo "bench: files in $WORK; $N WebRTC<->RTP calls, $HOLD_S s each, window $WINDOW_S s"

BIN=$(crossbar_bin)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
(cd "$ROOT" && cargo build --release --quiet --example webrtc_load) || { echo "bench: building the load client failed" >&2; exit 1; }
LOAD="$TARGET/release/examples/webrtc_load"

SIP=$(free_port 127.0.0.1)
HTTP=$(free_port 127.0.0.1)
TRUNK=$(free_port 127.0.0.2)
RTP=$(( 20000 + (RANDOM % 10) * 2000 ))
write_config "$WORK/node" "$SIP" "$RTP" $(( RTP + 19999 )) "$TRUNK" "warn,crossbar::actors::call=info"
cat >> "$WORK/node/crossbar.toml" <<TOML

[http]
listen = "127.0.0.1:$HTTP"
web_root = "$ROOT/web/dist"
TOML
start_crossbar "$BIN" "$WORK/node"; CHILDREN+=("$CB_PID")

ECHO_PORT=$(free_port 127.0.0.2)
"${PIN_GEN[@]}" "$SIPP" -sf "$ROOT/tests/sipp/uas_echo_bench.xml" -i 127.0.0.2 -p "$TRUNK" \
    -mi 127.0.0.2 -mp "$ECHO_PORT" -rtp_echo -buff_size 4194304 -rtp_buffsize 4194304 \
    -timeout $(( N / RATE + HOLD_S + 60 ))s -trace_err -error_file "$WORK/uas_errors.log" > "$WORK/uas.out" 2>&1 &
UAS=$!; CHILDREN+=("$UAS")
sleep 0.5

echo "== str0m browsers -> SIP/WS -> crossbar (WebRTC<->RTP bridge) -> SIPp carrier (RTP echo)"
"${PIN_GEN[@]}" "$LOAD" "127.0.0.1:$HTTP" "$CB_PID" "$N" "$HOLD_S" "$RATE" "$WINDOW_S" 2> "$WORK/load.err" | tee "$WORK/load.out"
# SIPp's echo socket (one for all calls) overflows when SIPp is descheduled: its loss.
SIPP_DROPS=$(socket_drops 127.0.0.2 "$ECHO_PORT")
kill "$UAS" 2>/dev/null || true
RESULT=$(grep '^RESULT' "$WORK/load.out" || true)
[[ -n $RESULT ]] || { echo "bench: load client failed:" >&2; tail -20 "$WORK/load.err" >&2; exit 1; }
kv() { echo "$RESULT" | tr ' ' '\n' | awk -F= -v k="$1" '$1==k {print $2}'; }
printf '  crossbar CPU:  %s%% of one core = %s%% per bridged call (target <= 0.1%%)\n' "$(kv cpu_pct)" "$(kv cpu_pct_per_call)"
printf '  crossbar RSS:  %s kB idle, %s kB loaded = %s kB per call\n' "$(kv rss_kb_idle)" "$(kv rss_kb_loaded)" "$(kv rss_kb_per_call)"
printf '  loss:          %s%% (%s sent, %s echoed back; target 0)\n' "$(kv loss_pct)" "$(kv sent)" "$(kv received)"
sleep 1
grep 'call ended' "$WORK/node/crossbar.err" | sed 's/\x1b\[[0-9;]*m//g' | awk -v sipp="$SIPP_DROPS" -v sent="$(kv sent)" '
    { for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "a_to_b_packets") a += kv[2]; if (kv[1] == "b_to_a_packets") b += kv[2] } }
    END { printf "  where:         crossbar bridged browser->carrier %d (of %d sent), carrier->browser %d; SIPp'"'"'s echo socket dropped %d\n", a, sent, b, sipp }' 
kill "$CB_PID" 2>/dev/null || true

if [[ -z "${SKIP_PLAIN:-}" ]]; then
    echo "== baseline in the same run: plain RTP relay, $N calls (bench/media.sh)"
    ONLY=crossbar HOLD_S=$WINDOW_S CROSSBAR_BIN="$BIN" "$ROOT/bench/media.sh" "$N" | grep -E 'kernel floor|crossbar (CPU|RSS)|calls ok|loss' || true
fi
