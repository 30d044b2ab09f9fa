"""Helpers for the Execution API tests: registries, servers, clients, waiting.

The shared fixtures (``store``, ``fixtures_dir``) live in conftest.py; the
fixtures here build on them.  Servers always listen on 127.0.0.1, port 0.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SPELLS = ROOT / "fixtures" / "spells"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import spell  # noqa: E402  (needs the path above)

#: Variables of the developer's shell that would change what the API or a cast does.
_DROPPED_PREFIXES = (
    "SPELL_API_",
    "SPELL_RUNTIME_",
    "SPELL_DOCKER_",
    "CONNECTOR_",
    "SPELL_BUTTON_",
)
#: How long a test waits for an execution to end (casts take ~0.2 s here).
WAIT_S = 30.0


def button(button_id: str, spell_id: str, **extra) -> dict:
    """A registry entry with permissive defaults (admin and operator may run it)."""
    entry = {
        "button_id": button_id,
        "spell_id": spell_id,
        "version": "1.0.0",
        "defaults": {},
        "required_confirmations": {"risk": False, "billing": False},
        "allowed_roles": ["admin", "operator"],
    }
    entry.update(extra)
    return entry


#: The registry most tests use, over the shared fixture bundles.
DEFAULT_BUTTONS = [
    button(
        "hello",
        "fixtures/hello-host",
        label="Say hello",
        description="Prints a greeting",
        defaults={"name": "api"},
    ),
    button("slow", "fixtures/slow", defaults={"ms": 300}),
    button(
        "risky",
        "fixtures/risk-high",
        allowed_roles=["admin"],
        required_confirmations={"risk": True, "billing": False},
    ),
    button("fail", "fixtures/fail"),
    button(
        "billing",
        "fixtures/billing",
        required_confirmations={"risk": False, "billing": True},
    ),
    button(
        "signed_only",
        "fixtures/hello-host",
        require_signature=True,
        defaults={"name": "sig"},
    ),
    button("secret", "fixtures/secret-echo"),
]
INSTALLED = ("hello-host", "slow", "risk-high", "fail", "billing", "secret-echo")


def write_registry(folder: Path, buttons=None, name="registry.json") -> Path:
    path = Path(folder) / name
    path.write_text(
        json.dumps({"version": "v1", "buttons": buttons or DEFAULT_BUTTONS})
    )
    return path


def install(*names: str) -> None:
    """Install fixture bundles into the current store (in-process CLI)."""
    import io

    for name in names:
        err = io.StringIO()
        code = spell.main(
            ["install", str(SPELLS / name)], stdout=io.StringIO(), stderr=err
        )
        assert code == 0, err.getvalue()


@pytest.fixture
def api_env(store, monkeypatch):
    """A private store and an environment without API or runtime settings."""
    for name in list(os.environ):
        if name.startswith(_DROPPED_PREFIXES):
            monkeypatch.delenv(name)
    return store


@pytest.fixture
def registry(tmp_path) -> Path:
    return write_registry(tmp_path)


@pytest.fixture
def installed(api_env):
    install(*INSTALLED)
    return api_env


@pytest.fixture
def server_factory(installed, registry):
    """``start(**options) -> ApiServer``; every server is closed after the test."""
    servers = []

    def start(**options):
        options.setdefault("registryPath", str(registry))
        options.setdefault("quiet", True)
        server = spell.start_execution_api_server(**options)
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        server.close(cancel=True)


@pytest.fixture
def app_factory(api_env, registry):
    """Socketless apps (``ExecutionApi``) without a fork server, closed after the test."""
    apps = []

    def make(**options):
        options.setdefault("registryPath", str(registry))
        options.setdefault("quiet", True)
        app = spell.ExecutionApi(spell.api_settings(**options), start_worker=False)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def call(app, method: str, target: str, body=None, headers=None, client="127.0.0.1"):
    """Run one request through an app without sockets; returns (status, json)."""
    raw = (
        body
        if isinstance(body, bytes)
        else (b"" if body is None else json.dumps(body).encode())
    )
    response = app.handle(spell.ApiRequest(method, target, headers or {}, raw, client))
    return response.status, response.json()


class Client:
    """A small HTTP client for one server (keep-alive off, JSON in and out)."""

    def __init__(self, server, token: str | None = None):
        self.host = "127.0.0.1"
        self.port = server.port if hasattr(server, "port") else server
        self.token = token

    def request(
        self, method: str, path: str, body=None, headers=None, raw: bytes = None
    ):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        all_headers = {"Connection": "close"}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        all_headers.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        try:
            conn.request(method, path, body=data, headers=all_headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        return response.status, dict(response.getheaders()), payload

    def json(self, method: str, path: str, body=None, headers=None):
        status, _, payload = self.request(method, path, body, headers)
        return status, json.loads(payload)

    def post(self, body, headers=None):
        return self.json("POST", "/api/spell-executions", body, headers)

    def get(self, path: str, headers=None):
        return self.json("GET", path, None, headers)

    def launch(self, button_id: str, **fields) -> str:
        fields.setdefault("actor_role", "admin")
        status, body = self.post(dict(button_id=button_id, **fields))
        assert status == 202, body
        return body["execution_id"]

    def wait(self, execution_id: str, timeout: float = WAIT_S) -> dict:
        """Poll the detail until the execution ends; returns the detail body."""
        give_up = time.monotonic() + timeout
        while True:
            status, body = self.get(f"/api/spell-executions/{execution_id}")
            assert status == 200, body
            if body["execution"]["status"] not in spell.IN_FLIGHT_STATES:
                return body
            assert time.monotonic() < give_up, f"still {body['execution']['status']}"
            time.sleep(0.05)


def raw_exchange(
    port: int, data: bytes, *, read_timeout: float = 10.0, shutdown_write: bool = False
) -> bytes:
    """Send raw bytes and read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split raw HTTP/1.1 responses (Content-Length framed) into (status, headers, body)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def openapi_validator(document: dict, method: str, path: str, status: int):
    """A jsonschema validator for one documented JSON response."""
    import jsonschema

    operation = document["paths"][path][method.lower()]
    response = operation["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    root = dict(document)
    root.update(schema)
    root["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return jsonschema.Draft202012Validator(root)


def start_server_process(env: dict, *args: str) -> tuple[subprocess.Popen, int]:
    """Run ``spell api --port 0`` as a child; returns it and the port it printed."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "spell.py"), "api", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("spell execution api listening on 127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    return spell._proc_start_time(pid) is not None
