#!/usr/bin/env bash
# Two crossbar builds side by side: each gets its own SIPp UAC -> crossbar -> SIPp UAS
# at the same rate, at the same time, and the CPU each uses per call over the same
# window is printed. Machine noise (other VMs, the hour) moves both alike: on this
# shared 2-core VM one binary measured alone varies by ±10-40 % between runs, two
# copies of it side by side agree within ~1 %. Run it twice with the binaries swapped.
#
# usage: bench/cps-pair.sh BIN_A BIN_B
# env:   RATE (calls/s per node, default 2000), SECS (default 16; CPU is read over the
#        middle half)
# prints: `A: N us/call (failed F)   B: N us/call (failed F)` and B against A
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -eq 2 ]] || { echo "usage: bench/cps-pair.sh BIN_A BIN_B" >&2; exit 2; }
RATE=${RATE:-2000}; SECS=${SECS:-16}
WORK=$(mktemp -d /tmp/crossbar-bench-pair.XXXXXX)
echo "bench: files in $WORK; $RATE calls/s per node for $SECS s"
declare -A CB SIPPORT UAC
i=0
for side in A B; do
    bin=$1; [[ $side == B ]] && bin=$2
    sip=$(free_port 127.0.0.1); rtp=$(( 20000 + i * 20000 )); i=$(( i + 1 ))
    write_config "$WORK/$side" "$sip" "$rtp" $(( rtp + 19999 )) "$(free_port 127.0.0.2)" warn
    start_crossbar "$bin" "$WORK/$side"; CHILDREN+=("$CB_PID"); CB[$side]=$CB_PID; SIPPORT[$side]=$sip
    uas_port=$(free_port 127.0.0.1)
    register_uas "$sip" "$uas_port" "$WORK/$side"
    "$SIPP" -sn uas -i 127.0.0.1 -p "$uas_port" -buff_size 4194304 -timeout $(( SECS + 40 ))s > "$WORK/$side/uas.out" 2>&1 &
    CHILDREN+=($!)
done
sleep 0.5
for side in A B; do
    "$SIPP" -sn uac "127.0.0.1:${SIPPORT[$side]}" -i 127.0.0.2 -p "$(free_port 127.0.0.2)" -s 15550001000 -buff_size 4194304 \
        -r "$RATE" -m $(( RATE * SECS )) -l $(( RATE * 3 )) -d 0 -recv_timeout 5000 -timeout $(( SECS + 30 ))s -timeout_error \
        -trace_stat -fd 1 -stf "$WORK/$side/uac_stat.csv" > "$WORK/$side/uac.out" 2>&1 &
    CHILDREN+=($!); UAC[$side]=$!
done
sleep $(( SECS / 4 ))
a0=$(cpu_ticks "${CB[A]}"); b0=$(cpu_ticks "${CB[B]}")
sleep $(( SECS / 2 ))
a1=$(cpu_ticks "${CB[A]}"); b1=$(cpu_ticks "${CB[B]}")
wait "${UAC[A]}" || true; wait "${UAC[B]}" || true
us() { echo $(( ($2 - $1) * 1000000 / $(getconf CLK_TCK) / (SECS / 2) / RATE )); }
ua=$(us "$a0" "$a1"); ub=$(us "$b0" "$b1")
printf '  %s: %d us/call (failed %d)   %s: %d us/call (failed %d)   B against A: %+.1f %%\n' \
    "$1" "$ua" "$(stat_col "$WORK/A/uac_stat.csv" 'FailedCall(C)')" "$2" "$ub" "$(stat_col "$WORK/B/uac_stat.csv" 'FailedCall(C)')" \
    "$(awk -v a="$ua" -v b="$ub" 'BEGIN {print (a > 0 ? (b - a) * 100 / a : 0)}')"
