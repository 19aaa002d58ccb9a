#!/usr/bin/env bash
# Calls per second: the highest rate with 0 failed calls for
#   SIPp UAC (carrier, 127.0.0.2) -> crossbar (DID 15550001000 -> ext 1001) -> SIPp UAS
# beside SIPp UAC -> SIPp UAS directly, in the same run, and their ratio.
# Calls carry SDP but no RTP; they are hung up at once (-d 0). Each step also prints the
# CPU per completed call of the two SIPp together and of what sits between them.
#
# Pinned by default (PIN=1), as media.sh and webrtc.sh: the load generators (both SIPp,
# in every row, the direct one too) on CPU 0, what sits between them (crossbar,
# Kamailio) on CPU 1, as on a deployment where the carriers are other machines. That is
# also the set-up the issue's calibration describes: pinned, SIPp direct reached
# 9,000-11,000 calls/s here and Kamailio's stateful proxy 0.57-1.00 of that, median 0.82 (the issue:
# "about 9,800" and "about 0.7"); unpinned, SIPp direct takes both cores (18,000-22,000)
# and any middle box is charged for the CPU it takes from the generators (Kamailio
# 0.45-0.56). PIN=0 runs that variant.
#
# usage: bench/cps.sh [RATES...]
#        (default: 2000 4000 5000 5500 6000 6500 7000 7500 8000 9000 10000 10500 11000
#         11500 12000 13000 14000; the ramp of each path stops at its first failed step)
# env:   STEP_S (seconds per rate, default 10), CROSSBAR_BIN (skip the build),
#        ONLY=direct|crossbar (run one side only), PIN=0 (unpinned: everything on both
#        cores), OVERLOAD_WAIT_MS (crossbar's sip.overload_wait_ms, default 100)
#        KAMAILIO=1 (also ramp through Kamailio as a stateful proxy with record-routing,
#        the issue's yardstick: half a B2BUA's work, no media, no records; needs the
#        Debian package kamailio)
set -euo pipefail
PIN=${PIN:-1}
source "$(dirname "$0")/common.sh"

RATES=("$@"); [[ ${#RATES[@]} -gt 0 ]] || RATES=(2000 4000 5000 5500 6000 6500 7000 7500 8000 9000 10000 10500 11000 11500 12000 13000 14000)
STEP_S=${STEP_S:-10}
WORK=$(mktemp -d /tmp/crossbar-bench-cps.XXXXXX)
echo "bench: files in $WORK"
if [[ ${#PIN_CB[@]} -gt 0 ]]; then echo "bench: pinned: both SIPp on CPU 0, crossbar / Kamailio on CPU 1 (PIN=0: unpinned)"
else echo "bench: unpinned: every process on every core"; fi
BUF=(-buff_size 4194304)

# run_step NAME TARGET UAS_PORT RATE -> prints "ok|fail achieved_cps successful failed retrans"
run_step() {
    local name=$1 target=$2 uas_port=$3 rate=$4
    local calls=$(( rate * STEP_S )) dir="$WORK/$name-$rate"
    mkdir -p "$dir"
    "${PIN_GEN[@]}" "$SIPP" -sn uas -i 127.0.0.1 -p "$uas_port" "${BUF[@]}" -timeout $(( STEP_S + 40 ))s \
        -trace_err -error_file "$dir/uas_errors.log" > "$dir/uas.out" 2>&1 &
    local uas=$!; CHILDREN+=("$uas")
    sleep 0.5
    local rc=0
    "${PIN_GEN[@]}" "$SIPP" -sn uac "$target" -i 127.0.0.2 -p "$(free_port 127.0.0.2)" -s 15550001000 "${BUF[@]}" \
        -r "$rate" -m "$calls" -l $(( rate * 3 )) -d 0 -recv_timeout 5000 \
        -timeout $(( STEP_S + 30 ))s -timeout_error -trace_stat -fd 1 -stf "$dir/uac_stat.csv" \
        -trace_err -error_file "$dir/uac_errors.log" > "$dir/uac.out" 2>&1 || rc=$?
    kill "$uas" 2>/dev/null || true; wait "$uas" 2>/dev/null || true
    local ok failed retrans elapsed achieved
    ok=$(stat_col "$dir/uac_stat.csv" 'SuccessfulCall(C)')
    failed=$(stat_col "$dir/uac_stat.csv" 'FailedCall(C)')
    retrans=$(stat_col "$dir/uac_stat.csv" 'Retransmissions(C)')
    elapsed=$(awk -F';' 'NR>1 {split($5, t, ":"); s = t[1]*3600 + t[2]*60 + t[3]} END {print s+0}' "$dir/uac_stat.csv")
    achieved=$(awk -v n="$ok" -v s="$elapsed" 'BEGIN {printf "%d", (s > 0 ? n / s : 0)}')
    # The two SIPp's CPU over the step (this subshell's waited children: the UAC and the UAS).
    local sipp_ms
    times > "$dir/times.txt"   # not in a pipe: a forked builtin has no children
    sipp_ms=$(awk 'NR == 2 {split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) * 1000}' "$dir/times.txt")
    if [[ $rc -eq 0 && "$failed" -eq 0 && "$ok" -eq "$calls" ]]; then echo "ok $achieved $ok $failed $retrans $sipp_ms"
    else echo "fail $achieved $ok $failed $retrans $sipp_ms"; fi
}

# CPU ticks of what sits between the two SIPp (crossbar, Kamailio); none for direct.
mid_ticks() { echo 0; }

# ramp NAME TARGET UAS_PORT -> prints the table, sets BEST
ramp() {
    local name=$1 target=$2 uas_port=$3 r res
    BEST=0
    for r in "${RATES[@]}"; do
        local m0 m1
        m0=$(mid_ticks)
        res=$(run_step "$name" "$target" "$uas_port" "$r")
        m1=$(mid_ticks)
        read -r verdict achieved ok failed retrans sipp_ms <<<"$res"
        printf '  %-8s target %6d cps: %-4s achieved %6d cps, %d calls ok, %d failed, %d retransmissions\n' \
            "$name" "$r" "$verdict" "$achieved" "$ok" "$failed" "$retrans"
        # CPU per completed call: where the two cores went (SIPp's includes its start and stop).
        if (( ok > 0 )); then
            awk -v s="$sipp_ms" -v m="$(( (m1 - m0) * 10 ))" -v n="$ok" -v name="$name" 'BEGIN {
                printf "           CPU per call: the two SIPp %d us", s * 1000 / n
                if (name != "direct") printf ", %s %d us", name, m * 1000 / n
                printf "\n" }'
        fi
        if [[ $verdict != ok ]]; then
            echo "    what SIPp's error file reports, most frequent first (a timed-out run also fails calls it never logs):"
            failure_summary "$WORK/$name-$r/uac_errors.log" | sed 's/^/    /'
            break
        fi
        # A step that ran clean but slower than offered (SIPp could not generate the
        # rate: fewer than 90 % of it achieved) did not carry that rate: it does not
        # count, and higher rates are not tried.
        if (( achieved * 10 < r * 9 )); then
            echo "    (not counted: $achieved calls/s achieved of $r offered)"
            break
        fi
        BEST=$r
    done
}

DIRECT=0 VIA=0
if [[ "${ONLY:-}" != crossbar ]]; then
    echo "== SIPp UAC -> SIPp UAS (direct)"
    p=$(free_port 127.0.0.1)
    ramp direct "127.0.0.1:$p" "$p"
    DIRECT=$BEST
fi
if [[ "${ONLY:-}" != direct ]]; then
    BIN=$(crossbar_bin)
    SIP=$(free_port 127.0.0.1)
    RTP=$(( 20000 + (RANDOM % 100) * 200 ))
    write_config "$WORK/node" "$SIP" "$RTP" $(( RTP + 19999 )) "$(free_port 127.0.0.2)" warn
    start_crossbar "$BIN" "$WORK/node"; CHILDREN+=("$CB_PID")
    UAS_PORT=$(free_port 127.0.0.1)
    register_uas "$SIP" "$UAS_PORT" "$WORK/node"
    echo "== SIPp UAC -> crossbar -> SIPp UAS ($BIN, pid $CB_PID)"
    T0=$(cpu_ticks "$CB_PID")
    mid_ticks() { cpu_ticks "$CB_PID"; }
    ramp crossbar "127.0.0.1:$SIP" "$UAS_PORT"
    VIA=$BEST
    echo "  crossbar CPU over the ramp: $(( ($(cpu_ticks "$CB_PID") - T0) ))0 ms, RSS $(rss_kb "$CB_PID") kB"
    kill -0 "$CB_PID" 2>/dev/null || { echo "bench: crossbar died; stderr tail:"; tail -20 "$WORK/node/crossbar.err"; }
fi

KAM=0
if [[ -n "${KAMAILIO:-}" ]]; then
    command -v kamailio >/dev/null || { echo "bench: KAMAILIO=1 needs kamailio (apt-get install kamailio)"; exit 1; }
    KPORT=$(free_port 127.0.0.1); KUAS=$(free_port 127.0.0.1)
    mkdir -p "$WORK/kamailio"
    # tm relays statefully; record_route keeps ACK and BYE on the proxy, as on crossbar
    # (SIPp's UAC sends them to the proxy anyway).
    # One UDP worker (KAM_CHILDREN): with two, a call's 180 and 200 are relayed by different
    # processes and overtake each other, which SIPp's UAC fails (51 of 10,000 calls at
    # 1,000 calls/s). TLSF memory managers: the default q_malloc spent 67 % in malloc.
    # wt_timer 500 ms (default 5 s): with the default, Kamailio stalled once its timer
    # began freeing ended transactions and passed 3,000 calls/s; with 500 ms, 10,000.
    cat > "$WORK/kamailio/kamailio.cfg" <<KCFG
#!KAMAILIO
debug=0
log_stderror=yes
children=${KAM_CHILDREN:-1}
auto_aliases=no
maxbuffer=4194304
listen=udp:127.0.0.1:$KPORT
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "siputils.so"
loadmodule "textops.so"
modparam("tm", "wt_timer", 500)
request_route {
    if (!mf_process_maxfwd_header("10")) { sl_send_reply("483", "Too Many Hops"); exit; }
    if (has_totag()) {
        # SIPp's built-in UAC keeps no route set: its ACK and BYE come without Route.
        if (!loose_route()) { \$du = "sip:127.0.0.1:$KUAS"; }
        t_relay(); exit;
    }
    if (is_method("CANCEL")) { if (t_check_trans()) { t_relay(); } exit; }
    t_check_trans();
    record_route();
    \$du = "sip:127.0.0.1:$KUAS";
    t_relay();
}
KCFG
    "${PIN_CB[@]}" kamailio -f "$WORK/kamailio/kamailio.cfg" -DD -E -x tlsf -X tlsf -m ${KAM_SHM_MB:-512} -M 16 -P "$WORK/kamailio/pid" \
        > "$WORK/kamailio/out.log" 2>&1 &
    KPID=$!; CHILDREN+=("$KPID")
    sleep 2
    kill -0 "$KPID" 2>/dev/null || { echo "bench: kamailio did not start:"; tail -5 "$WORK/kamailio/out.log"; exit 1; }
    kam_ticks() { local t=0 p; for p in $KPID $(pgrep -P "$KPID"); do t=$(( t + $(cpu_ticks "$p") )); done; echo $t; }
    echo "== SIPp UAC -> Kamailio (stateful proxy) -> SIPp UAS (pid $KPID)"
    K0=$(kam_ticks)
    mid_ticks() { kam_ticks; }
    ramp kamailio "127.0.0.1:$KPORT" "$KUAS"
    KAM=$BEST
    echo "  Kamailio CPU over the ramp (all its processes): $(( $(kam_ticks) - K0 ))0 ms"
fi

echo
echo "highest rate with 0 failed calls (${STEP_S} s per step):"
[[ "${ONLY:-}" == crossbar ]] || echo "  SIPp -> SIPp direct:            $DIRECT cps"
[[ "${ONLY:-}" == direct ]] || echo "  SIPp -> crossbar -> SIPp:       $VIA cps"
if [[ -z "${ONLY:-}" && $DIRECT -gt 0 ]]; then
    awk -v a="$VIA" -v b="$DIRECT" 'BEGIN {printf "  ratio crossbar / direct:        %.2f\n", a / b}'
fi
if [[ -n "${KAMAILIO:-}" ]]; then
    echo "  SIPp -> Kamailio -> SIPp:       $KAM cps"
    [[ $DIRECT -gt 0 ]] && awk -v a="$KAM" -v b="$DIRECT" 'BEGIN {printf "  ratio Kamailio / direct:        %.2f\n", a / b}'
fi
