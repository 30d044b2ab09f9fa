"""Helpers for the cast and docker tests: bundles, environments, logs, servers.

The shared fixtures (``store``, ``pyz``, ``run_pyz``) live in conftest.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SPELLS = ROOT / "fixtures" / "spells"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Variables of the developer's shell that would change what a cast does.
_DROPPED_PREFIXES = ("SPELL_RUNTIME_", "SPELL_DOCKER_", "CONNECTOR_", "SPELL_API_")
_DROPPED_NAMES = ("APP_SECRET", "TEST_HEADER", "SPELL_DEBUG")

ALL_PLATFORMS = [
    "linux/amd64",
    "linux/arm64",
    "darwin/arm64",
    "darwin/x64",
    "win32/x64",
]

SUMMARY_HELLO = (
    "=== Execution Summary ===\n"
    "id@version: fixtures/hello-host@1.0.0\n"
    "risk: low\n"
    "effects:\n"
    "  - type=notify, target=stdout, mutates=false\n"
    "permissions:\n"
    "  - none\n"
    "billing: enabled=false, mode=none, max_amount=0, currency=USD\n"
    "runtime: execution=host, docker_image=-\n"
)


# Environments and bundles ###################################################


def clean_env(**extra: str) -> dict:
    """The current environment without variables that steer a cast, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED_NAMES
    }
    env.update(extra)
    return env


def copy_fixture(name: str, dest: Path, **manifest_changes) -> Path:
    """Copy ``fixtures/spells/<name>`` to ``dest`` and change manifest fields.

    A key with a dot (``runtime.docker_image``) reaches into a mapping.
    """
    shutil.copytree(SPELLS / name, dest)
    if manifest_changes:
        edit_manifest(dest, **manifest_changes)
    return dest


def edit_manifest(bundle: Path, **changes) -> None:
    path = bundle / "spell.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    path.write_text(
        yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8"
    )


def make_bundle(
    dest: Path,
    spell_id: str,
    steps: dict,
    *,
    schema: dict | None = None,
    checks: list | None = None,
    **fields,
) -> Path:
    """Write a bundle whose steps are ``{name: (uses, file text)}`` in order.

    Shell step files are made executable. ``fields`` override manifest keys.
    """
    (dest / "steps").mkdir(parents=True)
    manifest = {
        "id": spell_id,
        "version": "1.0.0",
        "name": spell_id,
        "summary": "test bundle",
        "inputs_schema": "./schema.json",
        "risk": "low",
        "permissions": [],
        "effects": [{"type": "notify", "target": "stdout", "mutates": False}],
        "billing": {
            "enabled": False,
            "mode": "none",
            "currency": "USD",
            "max_amount": 0,
        },
        "runtime": {"execution": "host", "platforms": ALL_PLATFORMS},
        "steps": [],
        "checks": checks if checks is not None else [{"type": "exit_code"}],
    }
    manifest.update(fields)
    for name, (uses, text) in steps.items():
        suffix = ".json" if uses == "http" else ".sh"
        path = dest / "steps" / f"{name}{suffix}"
        path.write_text(text, encoding="utf-8")
        if uses == "shell":
            path.chmod(0o755)
        manifest["steps"].append(
            {"uses": uses, "name": name, "run": f"steps/{name}{suffix}"}
        )
    (dest / "spell.yaml").write_text(
        yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8"
    )
    (dest / "schema.json").write_text(
        json.dumps(
            schema
            if schema is not None
            else {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
            }
        )
    )
    return dest


# Logs #######################################################################


def log_files(store: Path) -> list[Path]:
    """The execution logs, oldest first."""
    logs = store / "logs"
    if not logs.is_dir():
        return []
    return sorted(
        (p for p in logs.iterdir() if p.suffix == ".json"),
        key=lambda p: (p.stat().st_mtime_ns, p.name),
    )


def latest_log(store: Path) -> dict:
    files = log_files(store)
    assert files, "no execution log was written"
    return json.loads(files[-1].read_text(encoding="utf-8"))


def stdout_fields(stdout: str) -> dict:
    """``execution_id`` and ``log`` from a cast's stdout (first of each, as the API reads)."""
    found = {}
    for line in stdout.splitlines():
        for key in ("execution_id", "log"):
            if line.startswith(key + ": ") and key not in found:
                found[key] = line[len(key) + 2 :]
    return found


# Processes ##################################################################


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is running and not a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] != b"Z"


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll until ``predicate()`` is truthy; return its value or fail the test."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail("condition not met in time")
        time.sleep(interval)


def all_cmdlines() -> list[bytes]:
    """Every process's command line, as raw bytes."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes())
            except OSError:
                pass
    return found


# HTTP #######################################################################


class Recorder:
    """A real HTTP server on a local address that records requests.

    ``routes`` maps a path to ``(status, body)`` where body is bytes or a
    JSON-able value; unknown paths get 404.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.requests: list[dict] = []
        self.routes: dict[str, tuple[int, object]] = {}
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                status, payload = recorder.routes.get(
                    self.path.split("?")[0], (404, b"")
                )
                data = (
                    payload
                    if isinstance(payload, bytes)
                    else json.dumps(payload).encode()
                )
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "Recorder":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# Keys, signatures and licences ##############################################


def keygen(run_pyz, publisher: str, out_dir: Path, key_id: str = "default") -> dict:
    """``spell sign keygen``; return its printed fields (private_key, public_key_base64url...)."""
    proc = run_pyz(
        "sign", "keygen", publisher, "--key-id", key_id, "--out-dir", out_dir
    )
    assert proc.returncode == 0, proc.stderr
    fields = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def entitlement_token(private_pem: Path, claims: dict) -> str:
    """An ``ent1.`` token: base64url claims signed (as ASCII) with the Ed25519 key."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(Path(private_pem).read_bytes(), password=None)
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    return f"ent1.{payload}.{b64url(key.sign(payload.encode('ascii')))}"


def claims(issuer: str, key_id: str = "default", **overrides) -> dict:
    base = {
        "version": "v1",
        "issuer": issuer,
        "key_id": key_id,
        "mode": "on_success",
        "currency": "usd",
        "max_amount": 15,
        "not_before": "2020-01-01T00:00:00Z",
        "expires_at": "2099-01-01T00:00:00Z",
    }
    base.update(overrides)
    return base
