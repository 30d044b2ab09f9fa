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
python3 - "$port" <<'EOF'
import json
import sys
import time
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"


def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


for _ in range(100):  # wait for the server to answer
    try:
        call("/health")
        break
    except OSError:
        time.sleep(0.1)
print(f"page: {base}/")
print("\n".join(call("/").splitlines()[:5]))
accepted = json.loads(call("/api/spell-executions",
                           {"button_id": "say_hello", "input": {"name": "api"}}))
print("accepted:", json.dumps(accepted))
for _ in range(200):
    detail = json.loads(call(f"/api/spell-executions/{accepted['execution_id']}"))
    if detail["execution"]["status"] not in ("queued", "running"):
        break
    time.sleep(0.1)
print("execution:", json.dumps(detail["execution"]))
print("receipt:", json.dumps(detail["receipt"], indent=2))
EOF

if [ "${KEEP_API:-0}" = "1" ]; then
  echo "API left running (pid $api_pid); open http://127.0.0.1:$port/"
  trap - EXIT
  wait "$api_pid"
fi
