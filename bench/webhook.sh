#!/usr/bin/env bash
# Admission throughput and latency: the real webhook (1,000 BackupBatches cached) against a no-op
# server on the same axum + rustls stack, in the same run, with h2load over HTTP/1.1 keep-alive and
# h2 at concurrency 1, 16 and 64. Prints a Markdown table (see BENCHMARKS.md).
#   bench/webhook.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
duration=${1:-10}

if ! command -v h2load >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
fi
binary=$(cargo bench --bench admission_server --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "admission_server" and m.get("executable"):
        print(m["executable"])')
work=$(mktemp -d)
trap 'exec 3>&- 4>&-; rm -rf "$work"' EXIT

# Each server runs until its stdin, a FIFO this shell holds open on fd 3 or 4, closes.
mkfifo "$work/webhook.in" "$work/noop.in"
"$binary" --mode webhook --body-out "$work/body.json" <"$work/webhook.in" >"$work/webhook.port" &
webhook_pid=$!
exec 3>"$work/webhook.in"
"$binary" --mode noop --body-out "$work/noop-body.json" <"$work/noop.in" >"$work/noop.port" &
exec 4>"$work/noop.in"
until [[ -s "$work/webhook.port" && -s "$work/noop.port" ]]; do sleep 0.1; done
webhook_port=$(cat "$work/webhook.port")
noop_port=$(cat "$work/noop.port")

measure() { # port protocol concurrency -> "req/s p50_ms p99_ms"
  local flags=() log="$work/log.tsv"
  [[ $2 == h1 ]] && flags+=(--h1)
  rm -f "$log"
  local out
  out=$(h2load "${flags[@]}" -c "$3" -m 1 -D "$duration" --warm-up-time 2 -d "$work/body.json" \
    -H 'content-type: application/json' --log-file "$log" "https://127.0.0.1:$1/mutate-pods")
  local rps failed
  rps=$(awk '/^finished in/ {print $4}' <<<"$out")
  failed=$(awk '/^requests:/ {print $10}' <<<"$out")
  [[ $failed == 0 ]] || echo "warning: $failed failed requests on port $1" >&2
  python3 - "$log" "$rps" <<'PY'
import sys
times = sorted(int(line.split("\t")[2]) for line in open(sys.argv[1]) if line.strip())
pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] / 1000
print(f"{float(sys.argv[2]):.0f} {pick(0.50):.3f} {pick(0.99):.3f}")
PY
}

echo "| protocol | concurrency | webhook req/s | no-op req/s | ratio | webhook p50 / p99 (ms) | no-op p50 / p99 (ms) | p99 ratio |"
echo "|---|---|---|---|---|---|---|---|"
for protocol in h1 h2; do
  for concurrency in 1 16 64; do
    read -r w_rps w_p50 w_p99 < <(measure "$webhook_port" "$protocol" "$concurrency")
    read -r n_rps n_p50 n_p99 < <(measure "$noop_port" "$protocol" "$concurrency")
    python3 - "$protocol" "$concurrency" "$w_rps" "$n_rps" "$w_p50" "$w_p99" "$n_p50" "$n_p99" <<'PY'
import sys
p, c, w, n, wp50, wp99, np50, np99 = sys.argv[1:]
name = "HTTP/1.1" if p == "h1" else "h2"
print(f"| {name} | {c} | {float(w):,.0f} | {float(n):,.0f} | {float(w)/float(n):.2f} | {wp50} / {wp99} | {np50} / {np99} | {float(wp99)/float(np99):.2f} |")
PY
  done
done
echo
echo "webhook server peak RSS with 1,000 BackupBatches cached: $(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' "/proc/$webhook_pid/status")"
echo "request body: $(wc -c <"$work/body.json") bytes; $duration s per run after 2 s warm-up; h2load -c N -m 1"
