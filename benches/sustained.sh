#!/usr/bin/env bash
# Sustained small writes on one growing DC: a fresh local 3-node DC
# (`mailboxd dev`, defaults), then back-to-back runs of 1 KiB uploads from
# 64 clients over 8 connections, leader-routed or spread, each on the state
# the runs before it left (~100k messages per run). A DC whose rate falls
# run after run has a cost that grows with the data held (it found
# whole-file filter blocks that stopped fitting the block cache: ~8,000
# uploads/s down to ~1,100 by the fourth run). Prints one JSON line per run.
#   SUSTAINED_RUNS="leader spread spread leader leader" (default)
#   SUSTAINED_DURATION=15s (each run)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-target}/debug"
WORK="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailbox-sustained.XXXXXX")"
PORT="${SUSTAINED_BASE_PORT:-17400}"
"$BIN/mailboxd" dev --dir "$WORK/mb" --dcs bench --base-port "$PORT" --no-restart \
  --client-config "$WORK/client.toml" >"$WORK/dev.log" 2>&1 &
DEV=$!
trap 'kill $DEV 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
EPS="127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2)),127.0.0.1:$((PORT + 3))"
for _ in $(seq 120); do
  "$BIN/mailbox" --endpoint "127.0.0.1:$((PORT + 1))" cluster status 2>/dev/null | grep -q Leader && break
  sleep 0.5
done
for run in ${SUSTAINED_RUNS:-leader spread spread leader leader}; do
  ARGS=()
  [ "$run" = spread ] && ARGS=(--spread)
  "$BIN/mailbox-bench" small --target mailbox "${ARGS[@]}" --endpoints "$EPS" \
    --duration "${SUSTAINED_DURATION:-15s}"
done
echo "{\"kind\":\"sustained-state\",\"node1_db_bytes\":$(du -sb "$WORK/mb/bench/node1" | cut -f1)}"
