#!/usr/bin/env bash
# The main job, end to end, on a fresh machine: install what spell needs, build
# the zipapps, install and cast a sample spell for real, then serve the
# Execution API with its receipts page, cast through it, and show the receipt.
#
#   bash examples/demo.sh            # run, then stop the API
#   KEEP_API=1 bash examples/demo.sh # leave the API running for a browser
#
# Everything happens in a throwaway store (SPELL_HOME) and on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q -e . 2>/dev/null || python3 -m pip install -q .
python3 build_zipapp.py >/dev/null
spell="python3 dist/spell.pyz"

export SPELL_HOME="${SPELL_HOME:-$(mktemp -d)/store}"
echo "store: $SPELL_HOME"

echo
echo "== install and inspect the hello sample"
$spell install examples/spells/hello
$spell inspect samples/hello

echo
echo "== cast it for real (unsigned samples need --allow-unsigned)"
$spell cast samples/hello --allow-unsigned -p name=world
last_log=$(ls -t "$SPELL_HOME/logs"/*.json | head -n 1)
python3 - "$last_log" <<'EOF'
import json, sys
log = json.load(open(sys.argv[1]))
print("step output:", log["outputs"]["step.hello.stdout"].strip())
EOF

echo
echo "== serve the Execution API and its receipts page on 127.0.0.1"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$spell api --port "$port" --registry examples/button-registry.v1.json &
api_pid=$!
trap 'kill "$api_pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "page: http://127.0.0.1:$port/"
curl -fsS "http://127.0.0.1:$port/" | head -n 5
echo
accepted=$(curl -fsS -X POST "http://127.0.0.1:$port/api/spell-executions" \
  -H 'content-type: application/json' \
  -d '{"button_id":"say_hello","input":{"name":"api"}}')
echo "accepted: $accepted"
exec_id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["execution_id"])' "$accepted")
for _ in $(seq 100); do
  detail=$(curl -fsS "http://127.0.0.1:$port/api/spell-executions/$exec_id")
  status=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["execution"]["status"])' "$detail")
  case "$status" in queued|running) sleep 0.1 ;; *) break ;; esac
done
echo "receipt: $detail"

if [ "${KEEP_API:-0}" = "1" ]; then
  echo "API left running (pid $api_pid); open http://127.0.0.1:$port/"
  trap - EXIT
  wait "$api_pid"
fi
