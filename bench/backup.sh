#!/usr/bin/env bash
# The data path against the restic CLI in the same run: a tree of mixed file sizes (default 1 GiB)
# backed up by `stash backup-job` (a PVC member of a session on the local control plane) and by
# `restic backup`, into a fresh, already initialised repository on a local directory, a REST server
# (rest-server) or an S3 server (versitygw) on loopback. Each round and tool: a first backup, an
# incremental one after 1 % of the tree's size was added as a new file, then a restore of that last
# snapshot into an empty directory (`stash restore` of a RestoreBatch member naming the snapshot, and
# `restic restore latest`). Three rounds, the order alternating; prints median wall times, their
# ratios, the stash executor's own peak RSS and restic's.
# `finalize` instead times `stash finalize-session` as the repository's history grows to 10, 100 and 1,000
# complete sessions (a member snapshot and a manifest each, written by restic with the tags stash gives
# them), each finalize forgetting the oldest session (keepLast: the history's size, no prune), against
# restic's own forget decision and snapshot listing on the same repository in the same run; a
# wrapper around stash's restic splits each finalize into the time some restic ran and stash's own.
#   [STASH_RESTIC_BINARY=…] bench/backup.sh [size-in-MiB] [local|rest|s3] [data|finalize]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
size_mib=${1:-1024}
backend=${2:-local}
what=${3:-data}
case $backend in local | rest | s3) ;; *) echo "backend: local, rest or s3, not $backend" >&2; exit 2 ;; esac
case $what in data | finalize) ;; *) echo "what: data or finalize, not $what" >&2; exit 2 ;; esac
export STASH_CLUSTER_DIR="${TMPDIR:-/tmp}/stash-bench-backup-$$"
work=$(mktemp -d)
server_pid=
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null
  tests/cluster/cluster.sh down
  rm -rf "$work"
}
trap cleanup EXIT
exports=$(tests/cluster/cluster.sh up) # outside eval, which would hide a failed up
eval "$exports"
bin=$(tests/cluster/build.sh)
tools=$(tests/backends/build.sh)
kubectl() { "$bin/kubectl" "$@"; }
cargo build --release --quiet
stash=$PWD/target/release/stash

echo "generating a ${size_mib} MiB tree" >&2
python3 - "$work/root/stash-data" "$size_mib" <<'PY'
import os, random, sys
root, budget = sys.argv[1], int(sys.argv[2]) * 1024 * 1024
rng = random.Random(7)
sizes = [0, 100, 4_000, 60_000, 700_000, 8_000_000, 64_000_000]
weights = [2, 30, 30, 20, 10, 5, 1]
written, n = 0, 0
while written < budget:
    size = min(rng.choices(sizes, weights)[0], budget - written)
    d = os.path.join(root, f"d{n % 50:02d}", f"s{n % 7}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{n:06d}.bin"), "wb") as f:
        f.write(rng.randbytes(size))
    written, n = written + size, n + 1
print(f"{n} files", file=sys.stderr)
PY

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mkdir -p "$work/secret" "$work/store"
printf 'bench-only-password' >"$work/secret/RESTIC_PASSWORD"
export RESTIC_PASSWORD=bench-only-password
case $backend in
  local)
    stash_repo=$work/store/stash-repo restic_repo=$work/store/restic-repo
    repository_backend="local: {mountPath: \"$stash_repo\", hostPath: {path: \"$stash_repo\"}}"
    ;;
  rest)
    port=$(free_port)
    "$tools/rest-server" --no-auth --path "$work/store" --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
    server_pid=$!
    stash_repo=rest:http://127.0.0.1:$port/stash-repo restic_repo=rest:http://127.0.0.1:$port/restic-repo
    repository_backend="rest: {url: \"http://127.0.0.1:$port/stash-repo\"}"
    ;;
  s3)
    port=$(free_port)
    export AWS_ACCESS_KEY_ID=AKIABENCH AWS_SECRET_ACCESS_KEY=bench-only-s3-secret
    printf %s "$AWS_ACCESS_KEY_ID" >"$work/secret/AWS_ACCESS_KEY_ID"
    printf %s "$AWS_SECRET_ACCESS_KEY" >"$work/secret/AWS_SECRET_ACCESS_KEY"
    ROOT_ACCESS_KEY= "$tools/versitygw" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" \
      --port "127.0.0.1:$port" --quiet posix "$work/store" >"$work/server.log" 2>&1 &
    server_pid=$!
    mkdir -p "$work/store/bench" # the bucket: a directory of the posix backend
    stash_repo=s3:http://127.0.0.1:$port/bench/stash-repo restic_repo=s3:http://127.0.0.1:$port/bench/restic-repo
    repository_backend="s3: {endpoint: \"http://127.0.0.1:$port\", bucket: bench, prefix: stash-repo, region: us-east-1}"
    ;;
esac
[[ $backend == local ]] || until curl -s "http://127.0.0.1:$port/" >/dev/null; do sleep 0.2; done
# A fresh, initialised repository at $1 (both repositories' data lives in $work/store).
fresh_repository() {
  rm -rf "$work/store/${1##*/}" "$work/store/bench/${1##*/}"
  "$tools/restic" -r "$1" init -q
}
# The incremental round's change: 1 % of the tree's size, as one new file (removed after the round).
change_one_percent() {
  python3 -c "import random, sys; open(sys.argv[1], 'wb').write(random.Random(int(sys.argv[2])).randbytes($size_mib * 1024 * 1024 // 100))" \
    "$work/root/stash-data/d00/changed.bin" "$1"
}
# The bytes of the regular files under $1, to prove a restore brought the whole tree back.
file_bytes() { find "$1" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }

"$stash" crds | kubectl apply --server-side -f - >/dev/null
kubectl wait --for condition=Established crd -l app.kubernetes.io/part-of=stash --timeout 60s >/dev/null
kubectl create namespace bench >/dev/null
kubectl apply -n bench -f - >/dev/null <<YAML
apiVersion: v1
kind: Secret
metadata: {name: repo-secret}
stringData: {RESTIC_PASSWORD: bench-only-password}
---
apiVersion: stash.appscode.com/v1alpha1
kind: Repository
metadata: {name: repo}
spec: {backend: {storageSecretName: repo-secret, $repository_backend}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 2Gi}}}
---
apiVersion: stash.appscode.com/v1beta1
kind: BackupBatch
metadata: {name: bench}
spec:
  repository: {name: repo}
  members: [{target: {alias: data, ref: {apiVersion: v1, kind: PersistentVolumeClaim, name: data}}}]
YAML
# STASH_RESTIC_BINARY, when set, is stash's restic (e.g. a wrapper that logs each call's time).
export KUBECONFIG POD_NAMESPACE=bench POD_NAME=bench-job-x7k2p STASH_RESTIC_BINARY="${STASH_RESTIC_BINARY:-$tools/restic}"
: >"$work/results"

# Runs "$@" as stash's step $1 (the rest: the command), recording the wall time (the end taken when
# `wait` returns, not by polling) and the stash process's own peak RSS: VmHWM, a high-water mark,
# read with shell builtins by a poller beside it (restic's memory is its child's, reported separately).
stash_timed() {
  local kind=$1 start end pid poller rss
  shift
  sync
  start=$(date +%s%N)
  "$@" >/dev/null 2>"$work/err" &
  pid=$!
  (
    while kill -0 "$pid" 2>/dev/null; do
      while read -r key value _; do
        [[ $key == VmHWM: ]] && echo "$value" >"$work/hwm"
      done 2>/dev/null <"/proc/$pid/status" || true
      sleep 0.25
    done
  ) &
  poller=$!
  wait "$pid" || { cat "$work/err" >&2; exit 1; }
  end=$(date +%s%N)
  wait "$poller" || true
  rss=$(cat "$work/hwm" 2>/dev/null || echo 0)
  rm -f "$work/hwm"
  echo "stash $kind $(( (end - start) / 1000000 )) $rss" >>"$work/results"
}
# Runs restic with "$@" (from the tree's parent) as restic's step $1.
restic_timed() {
  local kind=$1 wall rss
  shift
  sync
  (cd "$work/root" && /usr/bin/time -f "%e %M" -o "$work/time" "$tools/restic" -r "$restic_repo" \
    --cache-dir "$work/cache-restic" "$@" >/dev/null)
  read -r wall rss <"$work/time"
  echo "restic $kind $(python3 -c "print(int($wall * 1000))") $rss" >>"$work/results"
}

# One `stash backup-job` run of a new session (named in $session), as its kind $1; prints the snapshot.
stash_backup() {
  sleep 1 # session names are per second
  session=$("$stash" trigger bench -n bench | sed 's#backupsession/\([^ ]*\) created#\1#')
  # No operator here: the session is set Running by hand, as the operator would.
  kubectl patch backupsession "$session" -n bench --subresource=status --type=merge -p \
    '{"status":{"phase":"Running","targets":[{"ref":{"apiVersion":"v1","kind":"PersistentVolumeClaim","name":"data"},"totalHosts":1,"phase":"Running"}]}}' >/dev/null
  stash_timed "$1" "$stash" backup-job --invoker-name bench --session "$session" \
    --target-kind PersistentVolumeClaim --target-name data --secret-dir "$work/secret" \
    --path-root "$work/root" --cache-dir "$work/cache-stash"
  local stats phase
  stats=$(kubectl get backupsession "$session" -n bench -o jsonpath='{.status.targets[0].stats[0].phase} {.status.targets[0].stats[0].snapshots[0].name}')
  phase=${stats% *}
  [[ $phase == Succeeded ]] || { echo "the stash backup did not succeed: $stats" >&2; exit 1; }
  echo "${stats#* }"
}

# A restore of snapshot $2 through a RestoreBatch that names it, in round $1.
stash_restore() {
  kubectl apply -n bench -f - >/dev/null <<YAML
apiVersion: stash.appscode.com/v1beta1
kind: RestoreBatch
metadata: {name: restore-$1}
spec:
  repository: {name: repo}
  members: [{target: {alias: data, ref: {apiVersion: v1, kind: PersistentVolumeClaim, name: data}, rules: [{snapshots: ["$2"]}]}}]
YAML
  stash_timed restore "$stash" restore --restore-batch "restore-$1" --target-kind PersistentVolumeClaim \
    --target-name data --secret-dir "$work/secret" --path-root "$work/restored" --cache-dir "$work/cache-stash"
}

run() { # $1: stash | restic; $2: round
  local snapshot
  rm -rf "$work/restored"
  if [[ $1 == stash ]]; then
    fresh_repository "$stash_repo"
    stash_backup first >/dev/null
    change_one_percent "$2"
    snapshot=$(stash_backup incremental)
    stash_restore "$2" "$snapshot"
  else
    fresh_repository "$restic_repo"
    restic_timed first backup --json --host data stash-data
    change_one_percent "$2"
    restic_timed incremental backup --json --host data stash-data
    restic_timed restore restore latest --target "$work/restored"
  fi
  local want got
  want=$(file_bytes "$work/root/stash-data") got=$(file_bytes "$work/restored")
  [[ $want == "$got" ]] || { echo "$1 restored $got bytes of $want" >&2; exit 1; }
  rm -rf "$work/restored" "$work/root/stash-data/d00/changed.bin"
}

# The finalize mode, to its end.
if [[ $what == finalize ]]; then
  restic_repo=$stash_repo
  manifest_tags=stash=manifest,batch=bench,namespace=bench
  # A session backed up and set Succeeded by hand (no operator here), then finalized as step $1.
  finalized_session() {
    stash_backup "backup-$1" >/dev/null
    kubectl patch backupsession "$session" -n bench --subresource=status --type=json -p \
      '[{"op":"replace","path":"/status/phase","value":"Succeeded"},{"op":"replace","path":"/status/targets/0/phase","value":"Succeeded"}]' >/dev/null
    : >"$work/calls"
    STASH_RESTIC_BINARY="$work/restic-logged" stash_timed "$1" "$stash" finalize-session --session "$session" \
      --secret-dir "$work/secret" --cache-dir "$work/cache-stash"
    # The wall time during which at least one restic ran (forget and stats run side by side).
    python3 - "$1" "$work/calls" >>"$work/results" <<'PY'
import sys
kind, lines = sys.argv[1], [line.split() for line in open(sys.argv[2])]
calls = sorted((int(l[0]), int(l[1])) for l in lines)
busy, end = 0, 0
for start, stop in calls:
    busy += max(0, stop - max(start, end))
    end = max(end, stop)
print("restic-busy", kind, busy // 1_000_000, len(calls))
# Each command's own wall time, summed over its calls (the two forgets are one row).
commands = ("snapshots", "backup", "forget", "stats", "check", "prune", "list", "cat", "unlock")
spent = {}
for l in lines:
    command = next((w for w in l[2:] if w in commands), "other")
    command = "forget-dry-run" if command == "forget" and "--dry-run" in l else command
    spent[command] = spent.get(command, 0) + (int(l[1]) - int(l[0])) // 1_000_000
for command, ms in spent.items():
    print("call", kind, ms, command)
PY
    local finalized
    finalized=$(kubectl get backupsession "$session" -n bench -o jsonpath='{.status.conditions[?(@.type=="SessionFinalized")].status} {.status.conditions[?(@.type=="ManifestWritten")].status}')
    [[ $finalized == "True True" ]] || { echo "session $session: finalized, manifest written: $finalized" >&2; exit 1; }
  }
  # stash's restic behind a wrapper that logs when each call starts and ends: what of a finalize
  # is restic's, and what is ours.
  cat >"$work/restic-logged" <<EOF
#!/bin/sh
start=\$(date +%s%N)
"$STASH_RESTIC_BINARY" "\$@"
status=\$?
echo "\$start \$(date +%s%N) \$*" >>"$work/calls"
exit \$status
EOF
  chmod +x "$work/restic-logged"
  fresh_repository "$stash_repo"
  # The first finalize of a repository also runs restic check; the timed ones find it checked.
  finalized_session warm-up
  # History sessions copy the host and tags of that real member snapshot, dated long before it.
  read -r member_host member_tags < <("$tools/restic" -r "$stash_repo" snapshots --json --no-lock --no-cache |
    python3 -c 'import json, sys
member = next(s for s in json.load(sys.stdin) if "stash=manifest" not in s["tags"])
print(member["hostname"], ",".join(t for t in member["tags"] if not t.startswith("session=")))')
  grow_history() { # from to
    python3 - "$tools/restic" "$stash_repo" "$1" "$2" "$member_host" "$member_tags" "$manifest_tags" <<'PY'
import concurrent.futures, datetime, subprocess, sys
restic, repo, low, high, host, tags, manifest_tags = sys.argv[1:]
start = datetime.datetime(2026, 1, 1)
def session(i):
    name, time = f"history-{i:05d}", (start + datetime.timedelta(minutes=i)).strftime("%Y-%m-%d %H:%M:%S")
    backup = [restic, "-r", repo, "--no-cache", "-q", "backup", "--time", time, "--stdin"]
    subprocess.run(backup + ["--host", host, "--tag", f"{tags},session={name}", "--stdin-filename", "data"],
                   input=name.encode(), check=True)
    subprocess.run(backup + ["--host", "stash-manifest", "--tag", f"{manifest_tags},session={name}",
                             "--stdin-filename", "manifest.json"], input=b"{}", check=True)
# Each restic run mostly waits (its lock's settle time): eight at once keep two cores busy.
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(session, range(int(low), int(high) + 1)))
PY
  }
  grown=0
  for sessions in 10 100 1000; do
    echo "growing the history to $sessions sessions" >&2
    grow_history $((grown + 1)) "$sessions"
    grown=$sessions
    kubectl patch backupbatch bench -n bench --type merge \
      -p "{\"spec\":{\"retentionPolicy\":{\"name\":\"keep-$sessions\",\"keepLast\":$sessions}}}" >/dev/null
    for _ in 1 2 3; do
      finalized_session "finalize-$sessions"
      restic_timed "forget-$sessions" forget --dry-run --no-lock --json --group-by host --host stash-manifest \
        --tag "$manifest_tags" --keep-last "$sessions"
      restic_timed "snapshots-$sessions" snapshots --json
    done
  done
  python3 - "$backend" "$work/results" <<'PY'
import statistics, sys
backend, rows = sys.argv[1], [line.split() for line in open(sys.argv[2])]
def median(tool, kind):
    return statistics.median(int(r[2]) for r in rows if r[0] == tool and r[1] == kind) / 1000
print("| complete sessions | backend | stash finalize-session | of it, restic running | of it, stash alone | restic calls | restic forget --dry-run | restic snapshots | finalize / forget |")
print("|---|---|---|---|---|---|---|---|---|")
def timed(tool, kind):
    return [r for r in rows if r[0] == tool and r[1] == kind]
for n in (10, 100, 1000):
    ours, forget, listing = median("stash", f"finalize-{n}"), median("restic", f"forget-{n}"), median("restic", f"snapshots-{n}")
    busy, calls = median("restic-busy", f"finalize-{n}"), statistics.median(int(r[3]) for r in timed("restic-busy", f"finalize-{n}"))
    alone = statistics.median(int(s[2]) - int(b[2]) for s, b in zip(timed("stash", f"finalize-{n}"), timed("restic-busy", f"finalize-{n}"))) / 1000
    print(f"| {n} | {backend} | {ours:.2f} s | {busy:.2f} s | {alone:.2f} s | {calls:.0f} | {forget:.2f} s | {listing:.2f} s | {ours / forget:.2f} |")
print("\nmedians of 3; the warm-up finalize (with restic check):", f"{median('stash', 'warm-up'):.2f} s")
# Each restic command of a finalize, its wall time summed over its calls (stats runs beside the forgets).
order = ("snapshots", "backup", "forget-dry-run", "forget", "stats")
print("\n| complete sessions | " + " | ".join(f"restic {c}" for c in order) + " |")
print("|---|" + "---|" * len(order))
for n in (10, 100, 1000):
    cells = []
    for command in order:
        ms = [int(r[2]) for r in rows if r[0] == "call" and r[1] == f"finalize-{n}" and r[3] == command]
        cells.append(f"{statistics.median(ms) / 1000:.2f} s" if ms else "-")
    print(f"| {n} | " + " | ".join(cells) + " |")
PY
  exit 0
fi

for round in 1 2 3; do
  if ((round % 2)); then run stash "$round"; run restic "$round"; else run restic "$round"; run stash "$round"; fi
done
python3 - "$size_mib" "$backend" "$work/results" <<'PY'
import statistics, sys
size, backend, rows = sys.argv[1], sys.argv[2], [line.split() for line in open(sys.argv[3])]
def median(tool, kind):
    return statistics.median(int(r[2]) for r in rows if r[0] == tool and r[1] == kind) / 1000
rss = {k: max(int(r[3]) for r in rows if r[0] == k) / 1024 for k in ("stash", "restic")}
print("| tree | backend | step | stash wall (median of 3) | restic CLI wall (median of 3) | ratio |")
print("|---|---|---|---|---|---|")
for kind in ("first", "incremental", "restore"):
    ours, theirs = median("stash", kind), median("restic", kind)
    print(f"| {size} MiB | {backend} | {kind} | {ours:.2f} s | {theirs:.2f} s | {ours / theirs:.3f} |")
print(f"\npeak RSS: stash executor {rss['stash']:.1f} MiB, restic {rss['restic']:.1f} MiB")
print("runs in order (s): " + ", ".join(f"{r[0]} {r[1]} {int(r[2]) / 1000:.2f}" for r in rows))
PY
