"""Execution API: real casts, receipts, the SQLite index, limits, retention, restarts.

Every server listens on 127.0.0.1 (port 0) and runs real casts of installed
fixture bundles through its fork server.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api_helpers import (  # noqa: F401  (fixtures)
    Client,
    api_env,
    app_factory,
    button,
    call,
    install,
    installed,
    openapi_validator,
    pid_alive,
    registry,
    server_factory,
    start_server_process,
    write_registry,
)
import spell


def _receipt_has_no_raw_output(detail: dict) -> None:
    text = json.dumps(detail)
    assert "stdout_head" not in text and "stderr_head" not in text
    assert '"input"' not in text and '"outputs"' not in text


def _validate(doc, method, path, status, body):
    openapi_validator(doc, method, path, status).validate(body)


# Lifecycle and receipts #####################################################


def test_success_receipt_and_openapi_shapes(server_factory):
    server = server_factory()
    client = Client(server)
    doc = client.get("/api/openapi.json")[1]
    status, accepted = client.post({"button_id": "hello", "actor_role": "operator"})
    assert status == 202 and list(accepted) == [
        "ok",
        "execution_id",
        "tenant_id",
        "status",
    ]
    assert accepted["status"] == "queued" and accepted["tenant_id"] == "default"
    _validate(doc, "POST", "/api/spell-executions", 202, accepted)
    detail = client.wait(accepted["execution_id"])
    _validate(doc, "GET", "/api/spell-executions/{execution_id}", 200, detail)
    execution, receipt = detail["execution"], detail["receipt"]
    assert execution["status"] == "succeeded" and execution["message"] == "completed"
    assert execution["actor_role"] == "operator"
    assert list(execution) == [
        "execution_id",
        "button_id",
        "spell_id",
        "version",
        "require_signature",
        "status",
        "tenant_id",
        "actor_role",
        "created_at",
        "started_at",
        "finished_at",
        "message",
        "runtime_execution_id",
    ]
    assert receipt["execution_id"] == execution["runtime_execution_id"]
    assert receipt["id"] == "fixtures/hello-host" and receipt["success"] is True
    assert receipt["tenant_id"] == "default"
    assert [s["stepName"] for s in receipt["steps"]] == ["hello"]
    assert receipt["checks"][0]["type"] == "exit_code"
    _receipt_has_no_raw_output(detail)
    status, listing = client.get("/api/spell-executions")
    _validate(doc, "GET", "/api/spell-executions", 200, listing)
    assert listing["executions"][0]["execution_id"] == accepted["execution_id"]
    status, buttons = client.get("/api/buttons")
    _validate(doc, "GET", "/api/buttons", 200, buttons)
    _validate(doc, "GET", "/api/health", 200, client.get("/api/health")[1])


def test_failed_execution_keeps_a_receipt_of_its_steps(server_factory):
    client = Client(server_factory())
    detail = client.wait(client.launch("fail"))
    assert detail["execution"]["status"] == "failed"
    assert detail["execution"]["error_code"] == "EXECUTION_FAILED"
    receipt = detail["receipt"]
    assert receipt["success"] is False and "exit code 3" in receipt["error"]
    assert [(s["stepName"], s["success"]) for s in receipt["steps"]] == [
        ("a", True),
        ("b", False),
    ]
    assert receipt["steps"][1]["exitCode"] == 3
    _receipt_has_no_raw_output(detail)


def test_runtime_errors_map_to_codes(server_factory, tmp_path):
    reg = write_registry(
        tmp_path,
        [
            button("risky_unconfirmed", "fixtures/risk-high"),
            button(
                "signed_only",
                "fixtures/hello-host",
                require_signature=True,
                defaults={"name": "x"},
            ),
            button("bad_input", "fixtures/hello-host", defaults={"name": 5}),
            button(
                "billing",
                "fixtures/billing",
                required_confirmations={"risk": False, "billing": True},
            ),
            button("missing", "fixtures/not-installed"),
        ],
        name="codes.json",
    )
    client = Client(server_factory(registryPath=str(reg), maxConcurrentExecutions=10))
    expected = {
        "risky_unconfirmed": (
            "RISK_CONFIRMATION_REQUIRED",
            "risk confirmation required",
        ),
        "signed_only": ("SIGNATURE_REQUIRED", "signature required"),
        "bad_input": ("INPUT_SCHEMA_INVALID", "input schema invalid"),
        "billing": ("EXECUTION_FAILED", "execution failed"),
        "missing": ("EXECUTION_FAILED", "execution failed"),
    }
    ids = {
        name: client.launch(name, confirmation={"billing_acknowledged": True})
        for name in expected
    }
    for name, execution_id in ids.items():
        execution = client.wait(execution_id)["execution"]
        assert execution["status"] == "failed", name
        assert (execution["error_code"], execution["message"]) == expected[name], name


def test_map_runtime_error_table():
    cases = {
        "cast execution timed out after 50ms while running step 'x'": (
            "EXECUTION_TIMEOUT",
            "cast execution timed out after 50ms while running step 'x'",
        ),
        "oops shell step 'b' timed out after 10ms": (
            "STEP_TIMEOUT",
            "shell step 'b' timed out after 10ms",
        ),
        "merged input is 9 bytes, exceeds SPELL_RUNTIME_INPUT_MAX_BYTES=1": (
            "INPUT_TOO_LARGE",
            "merged input is 9 bytes, exceeds SPELL_RUNTIME_INPUT_MAX_BYTES=1",
        ),
        "signature required: no": ("SIGNATURE_REQUIRED", "signature required"),
        "risk critical requires --yes": (
            "RISK_CONFIRMATION_REQUIRED",
            "risk confirmation required",
        ),
        "billing enabled requires --allow-billing": (
            "BILLING_CONFIRMATION_REQUIRED",
            "billing confirmation required",
        ),
        "missing connector token CONNECTOR_X_TOKEN": (
            "CONNECTOR_TOKEN_MISSING",
            "connector token missing",
        ),
        "platform mismatch: a": ("PLATFORM_UNSUPPORTED", "platform unsupported"),
        "input does not match schema: /": (
            "INPUT_SCHEMA_INVALID",
            "input schema invalid",
        ),
        "policy denied: x": ("EXECUTION_FAILED", "execution failed"),
    }
    for text, expected in cases.items():
        assert spell.map_runtime_error(text) == expected


def test_dry_run_has_a_receipt_without_steps(server_factory):
    client = Client(server_factory())
    detail = client.wait(
        client.launch("risky", dry_run=True, confirmation={"risk_acknowledged": "yes"})
    )
    assert detail["execution"]["status"] == "succeeded"
    assert detail["receipt"]["steps"] == [] and detail["receipt"]["checks"] == []


def test_timeout_stops_the_cast_and_its_steps(server_factory, tmp_path):
    reg = write_registry(
        tmp_path,
        [button("slow", "fixtures/slow", defaults={"ms": 20000})],
        name="slow.json",
    )
    client = Client(
        server_factory(
            registryPath=str(reg), executionTimeoutMs=1200, kill_grace_ms=1000
        )
    )
    execution_id = client.launch("slow")
    detail = client.wait(execution_id)
    execution = detail["execution"]
    assert execution["status"] == "timeout"
    assert (execution["error_code"], execution["message"]) == (
        "EXECUTION_TIMEOUT",
        "execution exceeded timeout 1200ms",
    )
    # The cast stopped itself and logged the step it was running.
    assert detail["receipt"]["steps"][0]["stepName"] == "slow"
    assert spell._marked_pids([execution_id]) == {}


def test_timeout_kills_what_ignores_sigterm(api_env):
    env = dict(os.environ, **{spell.EXECUTION_MARKER_ENV: "exec_stubborn"})
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"],
        env=env,
        start_new_session=True,
    )
    try:
        time.sleep(0.2)
        assert proc.pid in spell._marked_pids(["exec_stubborn"])
        started = time.monotonic()
        spell.stop_execution_processes(["exec_stubborn"], [], 0.5)
        assert proc.wait(5) == -signal.SIGKILL
        assert time.monotonic() - started < 3
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killing_a_docker_client_removes_its_container(api_env, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "docker"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    env = dict(os.environ, **{spell.EXECUTION_MARKER_ENV: "exec_docker"})
    # A process whose command line reads like a docker client running a container.
    launcher = (
        "import os; os.execv('/bin/sh', ['docker', '-c', 'sleep 30; :', 'run', "
        "'--rm', '--name', 'spell-0123abcd', 'img'])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher], env=env, start_new_session=True
    )
    try:
        give_up = time.monotonic() + 20
        while spell._execution_containers(spell._marked_pids(["exec_docker"])) != [
            "spell-0123abcd"
        ]:
            assert time.monotonic() < give_up
            time.sleep(0.05)
        spell.kill_marked(["exec_docker"])
        assert proc.wait(5) == -signal.SIGKILL
        assert calls.read_text() == "rm -f spell-0123abcd\n"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_close_waits_for_running_executions(server_factory):
    server = server_factory()
    client = Client(server)
    execution_id = client.launch("slow")
    server.close()
    row = (
        sqlite3.connect(os.path.join(spell.store_root(), "logs", "index.sqlite3"))
        .execute(
            "SELECT status FROM executions WHERE execution_id = ?", (execution_id,)
        )
        .fetchone()
    )
    assert row == ("succeeded",)


def test_api_secrets_never_reach_a_cast(installed, tmp_path, make_bundle, monkeypatch):
    bundle = make_bundle(
        files={
            "steps/run.sh": (
                '#!/bin/sh\nenv > "$(sed -n \'s/.*"out": *"\\([^"]*\\)".*/\\1/p\' "$INPUT_JSON")"\n'
            )
        }
    )
    install_out = io.StringIO()
    assert (
        spell.main(["install", str(bundle)], stdout=install_out, stderr=io.StringIO())
        == 0
    )
    monkeypatch.setenv("SPELL_API_AUTH_KEYS", "admin=should-not-leak")
    out = tmp_path / "env.txt"
    reg = write_registry(
        tmp_path,
        [button("env", "test/demo", defaults={"out": str(out)})],
        name="env.json",
    )
    server = spell.start_execution_api_server(
        registryPath=str(reg), quiet=True, authKeys=["admin=also-secret"]
    )
    try:
        client = Client(server, token="also-secret")
        assert client.wait(client.launch("env"))["execution"]["status"] == "succeeded"
    finally:
        server.close()
    dumped = out.read_text()
    assert "should-not-leak" not in dumped and "also-secret" not in dumped
    assert "SPELL_API_AUTH_KEYS" not in dumped
    assert f"{spell.EXECUTION_MARKER_ENV}=exec_" in dumped


# Creating executions: checks in order ##########################################


@pytest.mark.parametrize(
    "body,status,code,message",
    [
        (b"", 400, "BAD_REQUEST", "button_id is required"),
        (b"[]", 400, "BAD_REQUEST", "request body must be an object"),
        (b"null", 400, "BAD_REQUEST", "request body must be an object"),
        (b'"x"', 400, "BAD_REQUEST", "request body must be an object"),
        (
            {"button_id": "hello", "spell_id": "x"},
            400,
            "BAD_REQUEST",
            "unsupported field in request body: spell_id",
        ),
        (
            {"request body too large": 1},
            400,
            "BAD_REQUEST",
            "unsupported field in request body: request body too large",
        ),
        ({"button_id": "   "}, 400, "BAD_REQUEST", "button_id is required"),
        ({"button_id": 5}, 400, "BAD_REQUEST", "button_id is required"),
        (
            {"button_id": "hello", "dry_run": None},
            400,
            "BAD_REQUEST",
            "dry_run must be boolean",
        ),
        (
            {"button_id": "hello", "input": []},
            400,
            "BAD_REQUEST",
            "input must be an object",
        ),
        (
            {"button_id": "hello", "input": None},
            400,
            "BAD_REQUEST",
            "input must be an object",
        ),
        (
            {"button_id": "hello", "confirmation": 1},
            400,
            "BAD_REQUEST",
            "confirmation must be an object",
        ),
        (
            {"button_id": "hello", "actor_role": " "},
            400,
            "BAD_REQUEST",
            "actor_role must be a non-empty string",
        ),
        ({"button_id": " hello"}, 404, "BUTTON_NOT_FOUND", "unknown button_id:  hello"),
        (
            {"button_id": "hello", "actor_role": "viewer"},
            403,
            "ROLE_NOT_ALLOWED",
            "actor role not allowed: viewer",
        ),
        (
            {"button_id": "hello"},
            403,
            "ROLE_NOT_ALLOWED",
            "actor role not allowed: anonymous",
        ),
        (
            {"button_id": "risky", "actor_role": "admin"},
            400,
            "RISK_CONFIRMATION_REQUIRED",
            "risk confirmation is required",
        ),
        (
            {
                "button_id": "risky",
                "actor_role": "admin",
                "confirmation": {"risk_acknowledged": 0},
            },
            400,
            "RISK_CONFIRMATION_REQUIRED",
            "risk confirmation is required",
        ),
        (
            {"button_id": "billing", "actor_role": "admin"},
            400,
            "BILLING_CONFIRMATION_REQUIRED",
            "billing confirmation is required",
        ),
    ],
)
def test_create_validation_messages(app_factory, body, status, code, message):
    got = call(app_factory(), "POST", "/api/spell-executions", body)
    assert got == (status, {"ok": False, "error_code": code, "message": message})


def test_merged_input_over_the_limit_is_413(app_factory, tmp_path):
    reg = write_registry(
        tmp_path,
        [button("pad", "fixtures/hello-host", defaults={"pad": "y" * 200})],
        name="pad.json",
    )
    app = app_factory(registryPath=str(reg), requestBodyLimitBytes=150)
    assert call(
        app,
        "POST",
        "/api/spell-executions",
        {"button_id": "pad", "actor_role": "admin"},
    ) == (
        413,
        {
            "ok": False,
            "error_code": "INPUT_TOO_LARGE",
            "message": "input payload too large: max 150 bytes",
        },
    )


def test_body_over_the_limit_is_413(app_factory):
    app = app_factory(requestBodyLimitBytes=100)
    status, body = call(app, "POST", "/api/spell-executions", b"{" + b" " * 99 + b"}")
    assert (status, body["error_code"]) == (413, "INPUT_TOO_LARGE")
    assert body["message"] == "input payload too large: max 100 bytes"
    exact = b'{"button_id":"nope"' + b" " * (100 - 20) + b"}"
    assert len(exact) == 100
    assert (
        call(app, "POST", "/api/spell-executions", exact)[1]["error_code"]
        == "BUTTON_NOT_FOUND"
    )


def test_role_sources(app_factory):
    app = app_factory()
    post = {"button_id": "risky", "confirmation": {"risk_acknowledged": True}}
    assert (
        call(app, "POST", "/api/spell-executions", post, {"x-role": "admin"})[0] == 202
    )
    status, body = call(app, "POST", "/api/spell-executions", post, {"x-role": ""})
    assert body["message"] == "actor role not allowed: "
    status, body = call(
        app,
        "POST",
        "/api/spell-executions",
        dict(post, actor_role="viewer"),
        {"x-role": "admin"},
    )
    assert body["message"] == "actor role not allowed: viewer"


# Limits ######################################################################


def test_rate_limit_with_retry_after(server_factory):
    client = Client(server_factory(rateLimitWindowMs=60000, rateLimitMaxRequests=1))
    assert client.post({"button_id": "hello", "actor_role": "admin"})[0] == 202
    status, headers, payload = client.request(
        "POST", "/api/spell-executions", {"button_id": "hello", "actor_role": "admin"}
    )
    assert status == 429
    assert json.loads(payload) == {
        "ok": False,
        "error_code": "RATE_LIMITED",
        "message": "too many requests",
    }
    assert 1 <= int(headers["Retry-After"]) <= 60
    # GETs are never limited.
    assert client.get("/api/buttons")[0] == 200


def test_rate_limit_counts_invalid_requests_but_not_concurrency_rejections(app_factory):
    app = app_factory(rateLimitMaxRequests=2, maxConcurrentExecutions=0)
    for _ in range(3):
        assert (
            call(app, "POST", "/api/spell-executions", {})[1]["error_code"]
            == "CONCURRENCY_LIMITED"
        )
    app = app_factory(rateLimitMaxRequests=2)
    assert call(app, "POST", "/api/spell-executions", {})[0] == 400
    assert call(app, "POST", "/api/spell-executions", {})[0] == 400
    assert (
        call(app, "POST", "/api/spell-executions", {})[1]["error_code"]
        == "RATE_LIMITED"
    )
    assert call(app, "POST", "/api/spell-executions", {}, client="10.0.0.2")[0] == 400


def test_concurrency_limit(server_factory, tmp_path):
    reg = write_registry(
        tmp_path,
        [
            button("slow", "fixtures/slow", defaults={"ms": 1500}),
            button("hello", "fixtures/hello-host", defaults={"name": "x"}),
        ],
        name="c.json",
    )
    client = Client(server_factory(registryPath=str(reg), maxConcurrentExecutions=1))
    first = client.launch("slow")
    status, body = client.post({"button_id": "hello", "actor_role": "admin"})
    assert (status, body) == (
        429,
        {
            "ok": False,
            "error_code": "CONCURRENCY_LIMITED",
            "message": "too many in-flight executions: max 1",
        },
    )
    client.wait(first)
    assert client.post({"button_id": "hello", "actor_role": "admin"})[0] == 202
    zero = Client(server_factory(registryPath=str(reg), maxConcurrentExecutions=0))
    assert (
        zero.post({"button_id": "hello"})[1]["message"]
        == "too many in-flight executions: max 0"
    )


def test_fifty_concurrent_posts_all_finish(server_factory):
    client = Client(
        server_factory(maxConcurrentExecutions=50, rateLimitMaxRequests=100)
    )

    def post(_):
        return client.post(
            {"button_id": "hello", "actor_role": "admin", "input": {"name": "many"}}
        )

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(post, range(50)))
    assert [status for status, _ in answers] == [202] * 50
    ids = {body["execution_id"] for _, body in answers}
    assert len(ids) == 50
    statuses = [client.wait(i, timeout=120)["execution"]["status"] for i in ids]
    assert statuses == ["succeeded"] * 50
    runtime_ids = {
        client.get(f"/api/spell-executions/{i}")[1]["execution"]["runtime_execution_id"]
        for i in ids
    }
    assert len(runtime_ids) == 50  # every execution linked to its own log


# Listing, filters and tenants ###############################################


def test_list_filters_and_query_errors(server_factory):
    client = Client(server_factory())
    ok_id = client.wait(client.launch("hello"))["execution"]["execution_id"]
    bad_id = client.wait(client.launch("fail"))["execution"]["execution_id"]
    status, body = client.get(
        "/api/spell-executions?status=succeeded&button_id=hello"
        "&tenant_id=default&limit=1"
    )
    assert body["filters"] == {
        "status": ["succeeded"],
        "button_id": "hello",
        "tenant_id": "default",
        "limit": 1,
    }
    assert [e["execution_id"] for e in body["executions"]] == [ok_id]
    body = client.get("/api/spell-executions?status=failed,%20failed,,")[1]
    assert body["filters"]["status"] == ["failed"]
    assert {e["execution_id"] for e in body["executions"]} == {bad_id}
    body = client.get("/api/spell-executions")[1]
    assert [e["execution_id"] for e in body["executions"]] == [bad_id, ok_id]
    assert body["filters"] == {
        "status": [],
        "button_id": None,
        "tenant_id": None,
        "limit": 100,
    }
    assert client.get("/api/spell-executions?tenant_id=team_b")[1]["executions"] == []
    assert client.get("/api/spell-executions?limit=1e2")[1]["filters"]["limit"] == 100
    for query, message in [
        ("status=unknown", "invalid status filter: unknown"),
        ("status=failed,nope", "invalid status filter: nope"),
        ("limit=0", "invalid limit: must be integer in range 1-500"),
        ("limit=501", "invalid limit: must be integer in range 1-500"),
        ("limit=2.5", "invalid limit: must be integer in range 1-500"),
        ("limit=abc", "invalid limit: must be integer in range 1-500"),
        ("tenant_id=a%20b", "invalid tenant_id filter: a b"),
        ("status=nope&limit=0", "invalid status filter: nope"),
    ]:
        assert client.get(f"/api/spell-executions?{query}") == (
            400,
            {"ok": False, "error_code": "INVALID_QUERY", "message": message},
        )


def test_detail_id_errors(app_factory):
    app = app_factory()
    for target in (
        "/api/spell-executions/",
        "/api/spell-executions/a%20b",
        "/api/spell-executions/a/b",
        "/api/spell-executions/%00",
    ):
        assert call(app, "GET", target) == (
            400,
            {
                "ok": False,
                "error_code": "INVALID_EXECUTION_ID",
                "message": "invalid execution id",
            },
        )
    assert call(app, "GET", "/api/spell-executions/exec_1_deadbeef") == (
        404,
        {
            "ok": False,
            "error_code": "EXECUTION_NOT_FOUND",
            "message": "execution not found",
        },
    )


def test_tenant_isolation_on_list_and_detail(server_factory):
    server = server_factory(
        authKeys=[
            "team_a:operator=a-op",
            "team_b:operator=b-op",
            "team_a:admin=a-admin",
        ]
    )
    a, b, admin = (Client(server, t) for t in ("a-op", "b-op", "a-admin"))
    status, accepted = a.post(
        {
            "button_id": "hello",
            "tenant": "team_b",
            "tenant_id": "team_b",
            "actor_role": "admin",
        }
    )
    assert status == 202 and accepted["tenant_id"] == "team_a"
    a_id = accepted["execution_id"]
    b_id = b.launch("hello")
    assert a.wait(a_id)["execution"]["actor_role"] == "operator"
    b.wait(b_id)
    listing = a.get("/api/spell-executions")[1]
    assert listing["filters"]["tenant_id"] == "team_a"
    assert {e["execution_id"] for e in listing["executions"]} == {a_id}
    assert a.get("/api/spell-executions?tenant_id=team_b") == (
        403,
        {
            "ok": False,
            "error_code": "TENANT_FORBIDDEN",
            "message": "tenant query denied: team_b",
        },
    )
    assert a.get("/api/spell-executions?tenant_id=team_a")[0] == 200
    # Detail is scoped too: another tenant's execution does not exist for a.
    assert a.get(f"/api/spell-executions/{b_id}") == (
        404,
        {
            "ok": False,
            "error_code": "EXECUTION_NOT_FOUND",
            "message": "execution not found",
        },
    )
    assert b.get(f"/api/spell-executions/{b_id}")[1]["receipt"]["tenant_id"] == "team_b"
    listing = admin.get("/api/spell-executions?tenant_id=team_b")[1]
    assert listing["filters"]["tenant_id"] == "team_b"
    assert [e["execution_id"] for e in listing["executions"]] == [b_id]
    assert admin.get("/api/spell-executions")[1]["filters"]["tenant_id"] is None
    assert admin.get(f"/api/spell-executions/{b_id}")[0] == 200


# Index, persistence, restarts ##################################################


def test_index_is_sqlite_wal_and_survives_a_new_server(server_factory):
    server = server_factory()
    client = Client(server)
    execution_id = client.wait(client.launch("hello"))["execution"]["execution_id"]
    server.close()
    path = os.path.join(spell.store_root(), "logs", "index.sqlite3")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    db.close()
    again = Client(server_factory())
    body = again.get("/api/spell-executions?status=succeeded")[1]
    assert [e["execution_id"] for e in body["executions"]] == [execution_id]
    assert (
        again.get(f"/api/spell-executions/{execution_id}")[1]["receipt"]["success"]
        is True
    )


def test_legacy_index_json_is_imported_once(api_env, registry):
    logs = api_env / "logs"
    logs.mkdir(parents=True)
    jobs = [
        {
            "execution_id": "exec_1_aaaaaaaa",
            "button_id": "hello",
            "spell_id": "fixtures/hello-host",
            "version": "1.0.0",
            "status": "succeeded",
            "actor_role": "admin",
            "created_at": "2026-01-01T00:00:00.000Z",
            "tenant_id": " team_a ",
            "message": "completed",
            "receipt": {"id": "fixtures/hello-host", "steps": []},
        },
        {
            "execution_id": "exec_2_bbbbbbbb",
            "button_id": "hello",
            "spell_id": "x",
            "version": "1",
            "status": "running",
            "actor_role": "admin",
            "created_at": "2026-01-02T00:00:00.000Z",
        },
        {"execution_id": "broken", "status": "succeeded"},
    ]
    (logs / "index.json").write_text(json.dumps({"version": "v1", "executions": jobs}))
    app = spell.ExecutionApi(
        spell.api_settings(
            registryPath=str(registry), quiet=True, log_retention_days=0
        ),
        start_worker=False,
    )
    try:
        body = call(app, "GET", "/api/spell-executions")[1]
        assert [e["execution_id"] for e in body["executions"]] == [
            "exec_2_bbbbbbbb",
            "exec_1_aaaaaaaa",
        ]
        assert body["executions"][1]["tenant_id"] == "team_a"
        restarted = body["executions"][0]
        assert (restarted["status"], restarted["error_code"], restarted["message"]) == (
            "failed",
            "SERVER_RESTARTED",
            "execution interrupted by server restart",
        )
        detail = call(app, "GET", "/api/spell-executions/exec_1_aaaaaaaa")[1]
        assert detail["receipt"] == {"id": "fixtures/hello-host", "steps": []}
    finally:
        app.close()


def test_restart_after_a_crash_fails_running_executions_and_kills_them(
    installed, tmp_path
):
    reg = write_registry(
        tmp_path,
        [button("slow", "fixtures/slow", defaults={"ms": 60000})],
        name="slow.json",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPELL_API_")}
    env.update(SPELL_BUTTON_REGISTRY_PATH=str(reg), SPELL_API_LOG_RETENTION_DAYS="0")
    proc, port = start_server_process(env)
    try:
        client = Client(port)
        execution_id = client.launch("slow")
        give_up = time.monotonic() + 20
        while not spell._marked_pids([execution_id]):
            assert time.monotonic() < give_up, "the step never started"
            time.sleep(0.05)
        step_pids = set(spell._marked_pids([execution_id]))
        assert (
            client.get(f"/api/spell-executions/{execution_id}")[1]["execution"][
                "status"
            ]
            == "running"
        )
    finally:
        proc.kill()  # SIGKILL: no clean shutdown at all
        proc.wait()
    proc, port = start_server_process(env)
    try:
        client = Client(port)
        execution = client.get(f"/api/spell-executions/{execution_id}")[1]["execution"]
        assert (execution["status"], execution["error_code"], execution["message"]) == (
            "failed",
            "SERVER_RESTARTED",
            "execution interrupted by server restart",
        )
        assert not any(pid_alive(pid) for pid in step_pids)
        assert spell._marked_pids([execution_id]) == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_second_server_on_the_same_store_leaves_live_executions_alone(
    server_factory, tmp_path
):
    reg = write_registry(
        tmp_path,
        [button("slow", "fixtures/slow", defaults={"ms": 1500})],
        name="slow.json",
    )
    first = Client(server_factory(registryPath=str(reg)))
    execution_id = first.launch("slow")
    second = Client(server_factory(registryPath=str(reg)))
    status = second.get(f"/api/spell-executions/{execution_id}")[1]["execution"][
        "status"
    ]
    assert status in ("queued", "running")
    assert first.wait(execution_id)["execution"]["status"] == "succeeded"


# Retention ###################################################################


def _log_files() -> list[str]:
    logs = os.path.join(spell.store_root(), "logs")
    return sorted(
        n for n in os.listdir(logs) if n.endswith(".json") and n != "index.json"
    )


def test_retention_by_count_removes_logs_and_rows_together(server_factory):
    client = Client(server_factory(logRetentionDays=0, logMaxFiles=1))
    first = client.wait(client.launch("hello"))["execution"]
    second = client.wait(client.launch("hello"))["execution"]
    time.sleep(0.2)  # retention runs right after the execution is recorded
    assert _log_files() == [second["runtime_execution_id"]]
    listing = client.get("/api/spell-executions")[1]["executions"]
    assert [e["execution_id"] for e in listing] == [second["execution_id"]]
    assert client.get(f"/api/spell-executions/{first['execution_id']}")[0] == 404


def test_retention_by_age_prunes_old_logs_of_any_origin(installed, server_factory):
    logs = installed / "logs"
    logs.mkdir(exist_ok=True)
    old = logs / "20200101T000000Z_cli_run_1.0.0.json"
    old.write_text("{}")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    keep = logs / "notes.txt"
    keep.write_text("not a log")
    server_factory(logRetentionDays=2, logMaxFiles=0)
    assert not old.exists() and keep.exists()


def test_retention_never_touches_running_executions(server_factory, tmp_path):
    reg = write_registry(
        tmp_path,
        [
            button("slow", "fixtures/slow", defaults={"ms": 2500}),
            button("hello", "fixtures/hello-host", defaults={"name": "x"}),
        ],
        name="r.json",
    )
    client = Client(
        server_factory(registryPath=str(reg), logRetentionDays=0, logMaxFiles=1)
    )
    slow_id = client.launch("slow")
    hello_id = client.launch("hello")
    assert client.wait(hello_id)["execution"]["status"] == "succeeded"
    assert (
        client.get(f"/api/spell-executions/{slow_id}")[1]["execution"]["status"]
        == "running"
    )
    detail = client.wait(slow_id)
    assert (
        detail["execution"]["status"] == "succeeded" and detail["receipt"] is not None
    )
    time.sleep(0.2)
    listing = client.get("/api/spell-executions")[1]["executions"]
    assert [e["execution_id"] for e in listing] == [slow_id]
    assert _log_files() == [detail["execution"]["runtime_execution_id"]]


# Server log ##################################################################


def test_log_lines_are_json_without_secrets(installed, registry):
    stream = io.StringIO()
    server = spell.start_execution_api_server(
        registryPath=str(registry), authTokens=["s3cret"], log_stream=stream
    )
    try:
        client = Client(server, token="s3cret")
        execution_id = client.launch("hello")
        client.wait(execution_id)
        client.request("GET", "/api/%1b[31mred?token=s3cret")
    finally:
        server.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all("s3cret" not in json.dumps(line) for line in lines)
    post = next(l for l in lines if l.get("method") == "POST")
    assert set(post) == {"time", "method", "path", "status", "ms", "execution_id"}
    assert post["status"] == 202 and post["execution_id"] == execution_id
    states = [l["status"] for l in lines if l.get("event") == "execution"]
    assert states == ["queued", "running", "succeeded"]
    assert "\x1b" not in stream.getvalue()


def test_cli_server_prints_its_address_and_stops_on_sigint(api_env, registry):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPELL_API_")}
    env["SPELL_BUTTON_REGISTRY_PATH"] = str(registry)
    proc, port = start_server_process(env)
    try:
        assert Client(port).get("/api/health") == (200, {"ok": True})
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
