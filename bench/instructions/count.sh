#!/usr/bin/env bash
# Instructions the server executes per seek, per LIMIT-50 replay and per
# pipelined publish, counted by callgrind: the same for the same binary
# and inputs however busy the machine is, where timings on a shared
# machine move by a third.
#
#   bench/instructions/count.sh target/release/ensync-server [TAG]
#
# Needs valgrind and python3. The server runs pinned to CPU 1 (one tokio
# worker, as in the bench), loads a 30,000-event log uncounted, then
# counts 3,000 seeks, 1,000 LIMIT-50 replays and 10,000 publishes (from
# one connection, 1,000 in flight, each committed before its +PASS).
# Profiles are left in $OUT (callgrind_annotate them); compare two
# builds by their counts. CONFIG=FILE starts the server with that config
# file; AFTER=N loads N events of another name after the log (drive.py).
# RESTART=1 loads the log into a server of its own and stops it first, so
# that the counted server holds it only as a restarted one does.
set -euo pipefail
bin=$(realpath "$1")
tag=${2:-run}
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$(mktemp -d)}
port=${PORT:-17170}
events=30000 seeks=3000 replays=1000 publishes=10000

rm -rf "$out/data-$tag"
wait_for_port() {
  for _ in $(seq 100); do
    (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && return
    sleep 0.2
  done
}
if [ -n "${RESTART:-}" ]; then
  # The log is loaded into a server of its own, stopped before the
  # counted one starts on the same data directory.
  export POSITIONS="$out/positions-$tag.json"
  rm -f "$POSITIONS"
  taskset -c 1 "$bin" --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$((port + 1))" \
    --data-dir "$out/data-$tag" ${CONFIG:+--config "$CONFIG"} > "$out/loader-$tag.log" 2>&1 &
  loader=$!
  wait_for_port
  python3 "$here/drive.py" "$port" "$events" "$seeks" "$replays" "$publishes" "$loader" "$tag"
  kill "$loader"
  wait "$loader" 2>/dev/null || true
fi
taskset -c 1 valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$out/callgrind.$tag.%p" \
  "$bin" --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$((port + 1))" \
  --data-dir "$out/data-$tag" ${CONFIG:+--config "$CONFIG"} > "$out/server-$tag.log" 2>&1 &
valgrind_pid=$!
trap 'kill $valgrind_pid 2>/dev/null || true' EXIT
wait_for_port

python3 "$here/drive.py" "$port" "$events" "$seeks" "$replays" "$publishes" "$valgrind_pid" "$tag"
kill "$valgrind_pid"
wait "$valgrind_pid" 2>/dev/null || true

total() { awk '/^totals:/ {print $2}' "$out/callgrind.$tag.$valgrind_pid.$1"; }
echo "$tag: $(( $(total 1) / seeks )) instructions per seek, $(( $(total 2) / replays )) per LIMIT-50 replay, $(( $(total 3) / publishes )) per publish (profiles in $out)"
