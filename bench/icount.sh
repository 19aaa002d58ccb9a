#!/usr/bin/env bash
# Instructions per call: crossbar's user-space instructions (valgrind's callgrind)
# for CALLS DID calls, SIPp UAC (127.0.0.2) -> crossbar -> SIPp UAS, hung up at once,
# after start-up, the UAS's REGISTER and 50 warm-up calls (counters zeroed then).
# Unlike CPU time, the count barely depends on what else the machine is doing, so two
# runs of one binary agree within ~0.2 % here, where timed runs vary by ±10 %. It counts no kernel
# work (sendto, fsync) and runs at a low rate (valgrind is ~50x slower), where each
# call's records get a store commit of their own: the store weighs more than at load.
#
# usage: bench/icount.sh [BIN...]     (default: the release build; several binaries are
#                                      measured one after the other, the first is the baseline)
# env:   CALLS (default 300), RATE (calls/s, default 20), KEEP=1 (keep callgrind's files
#        for callgrind_annotate), TOP=N (also list crossbar's N costliest functions,
#        instructions per call including what they call)
# prints: `BIN: N instructions per call` and, for later binaries, the change against the first
set -euo pipefail
source "$(dirname "$0")/common.sh"
command -v valgrind >/dev/null || { echo "bench: valgrind not found (apt-get install valgrind)" >&2; exit 1; }
command -v callgrind_control >/dev/null || { echo "bench: callgrind_control not found (apt-get install valgrind)" >&2; exit 1; }

CALLS=${CALLS:-300}
RATE=${RATE:-20}
BINS=("$@"); [[ ${#BINS[@]} -gt 0 ]] || BINS=("$(crossbar_bin)")
WORK=$(mktemp -d /tmp/crossbar-bench-icount.XXXXXX)
echo "bench: files in $WORK; $CALLS calls at $RATE calls/s per binary"

# count BIN DIR -> sets COUNT (instructions per call); runs in this shell, so the
# exit trap stops its processes whatever happens
count() {
    local bin=$1 dir=$2 sip uas_port rtp vg pid uas ir
    sip=$(free_port 127.0.0.1); rtp=$(( 20000 + (RANDOM % 100) * 200 ))
    write_config "$dir/node" "$sip" "$rtp" $(( rtp + 1999 )) "$(free_port 127.0.0.2)" warn
    vg=(valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out")
    "${vg[@]}" "$bin" run --config "$dir/node/crossbar.toml" > "$dir/node/crossbar.out" 2> "$dir/node/crossbar.err" &
    pid=$!; CHILDREN+=("$pid")
    for _ in $(seq 1 600); do   # start-up under valgrind: up to 2 minutes
        grep -q '^crossbar ready' "$dir/node/crossbar.out" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    grep -q '^crossbar ready' "$dir/node/crossbar.out" 2>/dev/null \
        || { echo "bench: crossbar did not become ready under valgrind:" >&2; tail -20 "$dir/node/crossbar.err" >&2; exit 1; }
    uas_port=$(free_port 127.0.0.1)
    register_uas "$sip" "$uas_port" "$dir/node"
    "$SIPP" -sn uas -i 127.0.0.1 -p "$uas_port" -timeout 900s > "$dir/uas.out" 2>&1 &
    uas=$!; CHILDREN+=("$uas")
    sleep 0.5
    uac() {
        "$SIPP" -sn uac "127.0.0.1:$sip" -i 127.0.0.2 -p "$(free_port 127.0.0.2)" -s 15550001000 -r "$RATE" -m "$1" -d 0 \
            -timeout 600s -timeout_error -trace_stat -fd 1 -stf "$dir/$2.csv" > "$dir/$2.out" 2>&1
    }
    uac 50 warmup || { echo "bench: warm-up calls failed (see $dir/warmup.out)" >&2; exit 1; }
    callgrind_control -z "$pid" > /dev/null 2>&1
    uac "$CALLS" calls || { echo "bench: calls failed (see $dir/calls.out)" >&2; exit 1; }
    local failed; failed=$(stat_col "$dir/calls.csv" 'FailedCall(C)')
    [[ $failed -eq 0 ]] || { echo "bench: $failed calls failed" >&2; exit 1; }
    callgrind_control -d "$pid" > /dev/null 2>&1
    sleep 1
    ir=$(grep -h '^totals:' "$dir"/callgrind.out.* | tail -1 | awk '{print $2}')
    kill "$pid" "$uas" 2>/dev/null || true; wait "$pid" "$uas" 2>/dev/null || true
    COUNT=$(( ir / CALLS ))
    if [[ -n ${TOP:-} ]]; then
        echo "  $bin: crossbar's costliest functions, instructions per call (inclusive):"
        callgrind_annotate --inclusive=yes "$(ls "$dir"/callgrind.out.* | tail -1)" 2>/dev/null \
            | awk -v calls="$CALLS" '/ \*? *[^ ]*:crossbar::/ && !/=>/ {
                  n = $1; gsub(",", "", n); name = $0; sub(/.*:crossbar::/, "crossbar::", name); sub(/ \[.*/, "", name)
                  if (!(name in seen)) { seen[name] = 1; printf "    %9d  %s\n", n / calls, name }
              }' | head -"$TOP" || true
    fi
}

BASE=0
for i in "${!BINS[@]}"; do
    count "${BINS[$i]}" "$WORK/$i"; n=$COUNT
    if [[ $i -eq 0 ]]; then
        BASE=$n
        printf '  %s: %d instructions per call\n' "${BINS[$i]}" "$n"
    else
        awk -v b="$BASE" -v n="$n" -v bin="${BINS[$i]}" 'BEGIN {printf "  %s: %d instructions per call (%+.1f %% against the first)\n", bin, n, (n - b) * 100 / b}'
    fi
done
[[ -n ${KEEP:-} ]] || rm -rf "$WORK"
