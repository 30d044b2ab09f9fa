#!/usr/bin/env python3
"""A webhook receiver to try samples/call-webhook against, on 127.0.0.1.

It answers ``POST <any path>`` with a JSON body in the shape the sample's
checks expect, ``{"data": {"accepted": ..., ...}, "health_url": ...}``, and
``GET /health`` with 200. A body that is not a JSON object with a string
``event`` is answered 400 with ``accepted: false``, so the jsonpath check of
the cast fails and shows what a refused event looks like.

    python3 examples/spells/call-webhook/receiver.py [--port 8788]

Each request is printed on stdout as one JSON line. Not part of the bundle:
``spell install`` copies only ``spell.yaml``, ``schema.json`` and ``steps/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Events are small; refuse anything bigger instead of buffering it.
MAX_BODY_BYTES = 1024 * 1024


class Receiver(ThreadingHTTPServer):
    """The server; ``received`` keeps every POST as a dict, for tests and logs."""

    daemon_threads = True

    def __init__(self, address, echo=None):
        super().__init__(address, ReceiverHandler)
        self.received: list[dict] = []
        self.lock = threading.Lock()
        self.echo = echo

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/health":
            self._reply(200, {"ok": True})
        else:
            self._reply(404, {"ok": False, "message": "not found"})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(413, {"data": {"accepted": False, "reason": "body too large"}})
            return
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            body = None
        record = {
            "path": self.path,
            "headers": {name.lower(): value for name, value in self.headers.items()},
            "body": body,
        }
        with self.server.lock:
            self.server.received.append(record)
        if self.server.echo is not None:
            print(json.dumps(record, sort_keys=True), file=self.server.echo, flush=True)
        if not isinstance(body, dict) or not isinstance(body.get("event"), str):
            reason = "expected a JSON object with a string 'event'"
            self._reply(400, {"data": {"accepted": False, "reason": reason}})
            return
        data = {
            "accepted": True,
            "event": body["event"],
            "received_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._reply(200, {"data": data, "health_url": self.server.base_url + "/health"})

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # the JSON line on stdout says enough


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Receive the sample's webhook events.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8788)
    args = parser.parse_args(argv)
    server = Receiver((args.host, args.port), echo=sys.stdout)
    print(f"receiving on {server.base_url}/webhook", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
