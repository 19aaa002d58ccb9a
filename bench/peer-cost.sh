#!/usr/bin/env bash
# What crossbar costs its peers: SIPp's own CPU per call behind crossbar and, at the
# same time and rate, when one SIPp calls the other directly (as in bench/cps.sh, the
# SIPps share the machine with crossbar, so their cost is capacity crossbar does not get).
#
# usage: bench/peer-cost.sh [RATE]     (calls/s, default 2000; 16 s, CPU read over the middle half)
# env:   CROSSBAR_BIN (skip the build)
# prints: the UAS's and the UAC's microseconds per call both ways, and crossbar's
set -euo pipefail
source "$(dirname "$0")/common.sh"
RATE=${1:-2000}; SECS=16
BIN=$(crossbar_bin)
WORK=$(mktemp -d /tmp/crossbar-bench-peer.XXXXXX)
echo "bench: files in $WORK; $RATE calls/s each way for $SECS s"
sip=$(free_port 127.0.0.1)
write_config "$WORK/node" "$sip" 20000 39999 "$(free_port 127.0.0.2)" warn
start_crossbar "$BIN" "$WORK/node"; CHILDREN+=("$CB_PID")
via_uas_port=$(free_port 127.0.0.1)
register_uas "$sip" "$via_uas_port" "$WORK/node"
direct_uas_port=$(free_port 127.0.0.1)
"$SIPP" -sn uas -i 127.0.0.1 -p "$via_uas_port" -buff_size 4194304 -timeout $(( SECS + 40 ))s > "$WORK/via_uas.out" 2>&1 &
CHILDREN+=($!); VIA_UAS=$!
"$SIPP" -sn uas -i 127.0.0.1 -p "$direct_uas_port" -buff_size 4194304 -timeout $(( SECS + 40 ))s > "$WORK/direct_uas.out" 2>&1 &
CHILDREN+=($!); DIRECT_UAS=$!
sleep 0.5
uac() {   # uac TARGET NAME (run in the background: exec keeps its PID for the CPU reading)
    exec "$SIPP" -sn uac "$1" -i 127.0.0.2 -p "$(free_port 127.0.0.2)" -s 15550001000 -buff_size 4194304 \
        -r "$RATE" -m $(( RATE * SECS )) -l $(( RATE * 3 )) -d 0 -recv_timeout 5000 -timeout $(( SECS + 30 ))s -timeout_error \
        -trace_stat -fd 1 -stf "$WORK/$2.csv" > "$WORK/$2.out" 2>&1
}
uac "127.0.0.1:$sip" via_uac & CHILDREN+=($!); VIA_UAC=$!
uac "127.0.0.1:$direct_uas_port" direct_uac & CHILDREN+=($!); DIRECT_UAC=$!
sleep $(( SECS / 4 ))
PIDS=("$VIA_UAS" "$VIA_UAC" "$DIRECT_UAS" "$DIRECT_UAC" "$CB_PID")
T0=(); for p in "${PIDS[@]}"; do T0+=("$(cpu_ticks "$p")"); done
sleep $(( SECS / 2 ))
T1=(); for p in "${PIDS[@]}"; do T1+=("$(cpu_ticks "$p")"); done
wait "$VIA_UAC" || true; wait "$DIRECT_UAC" || true
us() { echo $(( (T1[$1] - T0[$1]) * 1000000 / $(getconf CLK_TCK) / (SECS / 2) / RATE )); }
echo "  behind crossbar: SIPp UAS $(us 0) us/call, SIPp UAC $(us 1) us/call (crossbar $(us 4) us/call; failed $(stat_col "$WORK/via_uac.csv" 'FailedCall(C)'))"
echo "  direct:          SIPp UAS $(us 2) us/call, SIPp UAC $(us 3) us/call (failed $(stat_col "$WORK/direct_uac.csv" 'FailedCall(C)'))"
