#!/usr/bin/env bash
# Compares builds of ours on small writes, alternating them to spread the
# machine's drift over both: each DIR holds a build's mailboxd, mailbox and
# mailbox-bench (copy them out of target/debug between builds). For each
# round and build: a fresh local 3-node DC, one leader-routed and one spread
# run of 1 KiB uploads (64 clients, 8 connections), and the CPU each node
# and the client spent per upload (from /proc/PID/stat and time(1)).
#   benches/ab.sh /tmp/before /tmp/after      AB_ROUNDS=2 AB_DURATION=15s
set -euo pipefail
ROUNDS="${AB_ROUNDS:-2}"
DURATION="${AB_DURATION:-15s}"
PORT="${AB_BASE_PORT:-17500}"
EPS="127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2)),127.0.0.1:$((PORT + 3))"
TICK=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
  for B in "$@"; do
    W="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailbox-ab.XXXXXX")"
    "$B/mailboxd" dev --dir "$W/mb" --dcs bench --base-port "$PORT" --no-restart \
      --client-config "$W/client.toml" >"$W/dev.log" 2>&1 &
    DEV=$!
    for _ in $(seq 120); do
      "$B/mailbox" --endpoint "127.0.0.1:$((PORT + 1))" cluster status 2>/dev/null | grep -q Leader && break
      sleep 0.5
    done
    PIDS=$(for n in 1 2 3; do pgrep -f "$W/mb/bench/node$n/node.toml"; done)
    for mode in leader spread; do
      ARGS=()
      [ "$mode" = spread ] && ARGS=(--spread)
      BEFORE=$(for p in $PIDS; do awk '{print $14+$15}' "/proc/$p/stat"; done | paste -sd,)
      /usr/bin/time -f "%U %S" -o "$W/client.time" "$B/mailbox-bench" small --target mailbox \
        "${ARGS[@]}" --endpoints "$EPS" --duration "$DURATION" >"$W/run.json"
      AFTER=$(for p in $PIDS; do awk '{print $14+$15}' "/proc/$p/stat"; done | paste -sd,)
      python3 - "$round" "$B" "$W/run.json" "$W/client.time" "$BEFORE" "$AFTER" "$TICK" <<'PY'
import json, sys
rnd, build, run, ctime, before, after, tick = sys.argv[1:]
d = json.loads(open(run).read().strip().splitlines()[-1])
u, s = map(float, open(ctime).read().split()[-2:])
per = [(a - b) * 1e6 / int(tick) / d["ops"] for a, b in
       zip(map(int, after.split(",")), map(int, before.split(",")))]
client = (u + s) * 1e6 / d["ops"]
print(json.dumps({"round": int(rnd), "build": build, "routing": d["routing"],
                  "ops_per_sec": round(d["ops_per_sec"]), "p99_ms": d["p99_ms"], "p999_ms": d["p999_ms"],
                  "cpu_us_per_op_nodes": [round(x) for x in per], "cpu_us_per_op_client": round(client),
                  "cpu_us_per_op_total": round(sum(per) + client)}))
PY
    done
    kill "$DEV" 2>/dev/null || true
    wait "$DEV" 2>/dev/null || true
    rm -rf "$W"
  done
done
