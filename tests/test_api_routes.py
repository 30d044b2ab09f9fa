"""Execution API: routes, error shape, auth modes, settings, registry, OpenAPI.

Most tests call ``ExecutionApi.handle`` directly (no sockets, no casts); the
few that need the network say so.
"""

from __future__ import annotations

import ast
import io
import json
import os
from pathlib import Path

import pytest

from api_helpers import (  # noqa: F401  (fixtures)
    ROOT,
    Client,
    api_env,
    app_factory,
    button,
    call,
    install,
    installed,
    openapi_validator,
    registry,
    server_factory,
    write_registry,
)
import spell

# Error shape and routing ####################################################


def test_error_body_has_exactly_ok_code_message_in_order():
    err = spell.ApiError(418, "TEAPOT", "short and stout")
    assert list(spell.error_body(err)) == ["ok", "error_code", "message"]
    response = spell.error_response(err)
    assert response.status == 418
    assert (
        response.body
        == b'{"ok":false,"error_code":"TEAPOT","message":"short and stout"}'
    )
    assert ("Content-Type", "application/json; charset=utf-8") in response.headers


def test_route_table_maps_every_handler_to_a_method(app_factory):
    app = app_factory()
    for name in list(spell.API_ROUTES.values()) + list(spell.UI_ROUTES.values()):
        assert name.startswith("api_") and callable(getattr(app, name))


@pytest.mark.parametrize(
    "method,target",
    [
        ("GET", "/api"),
        ("GET", "/api/"),
        ("GET", "/nope"),
        ("GET", "/ui/"),
        ("GET", "/api/ui"),
        ("GET", "/index.html"),
        ("HEAD", "/"),
        ("POST", "/health"),
        ("DELETE", "/api/health"),
        ("PUT", "/api/spell-executions/x"),
        ("GET", "/api/spell-executions/.."),
    ],
)
def test_unknown_routes_are_404_json(app_factory, method, target):
    status, body = call(app_factory(), method, target)
    assert status == 404
    assert body == {
        "ok": False,
        "error_code": "NOT_FOUND",
        "message": "route not found",
    }


@pytest.mark.parametrize("target", ["/health", "/api/health", "/api/health?x=1"])
def test_health_needs_no_auth(app_factory, target):
    app = app_factory(authKeys=["admin=k1"])
    assert call(app, "GET", target) == (200, {"ok": True})


def test_ui_assets_are_served_without_auth(app_factory):
    app = app_factory(authKeys=["admin=k1"])
    for target in ("/", "/ui", "/?x=1"):
        response = app.handle(spell.ApiRequest("GET", target))
        assert response.status == 200
        headers = dict(response.headers)
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        page = response.body.decode()
        for needle in ("Spell Receipts UI", "guardHint", "executionStatus", "apiToken"):
            assert needle in page
    response = app.handle(spell.ApiRequest("GET", "/ui/app.js"))
    assert dict(response.headers)["Content-Type"] == "text/javascript; charset=utf-8"
    script = response.body.decode()
    for needle in (
        "updateGuardHints",
        "actor role not allowed for selected button",
        "makeApiHeaders",
        "sessionStorage",
    ):
        assert needle in script


def test_page_script_never_parses_data_as_html():
    assert "innerHTML" not in spell.RECEIPTS_PAGE_JS
    assert "insertAdjacentHTML" not in spell.RECEIPTS_PAGE_JS
    assert "document.write" not in spell.RECEIPTS_PAGE_JS


def test_un_prefixed_aliases_reach_the_same_routes(app_factory):
    app = app_factory()
    assert call(app, "GET", "/buttons")[0] == 200
    assert call(app, "GET", "/spell-executions")[0] == 200
    assert call(app, "GET", "/api/./buttons")[0] == 200
    assert call(app, "GET", "/api/x/../buttons")[0] == 200


def test_auth_gate_comes_before_method_dispatch(app_factory):
    app = app_factory(authTokens=["tok"])
    assert call(app, "DELETE", "/api/buttons")[1]["error_code"] == "AUTH_REQUIRED"
    status, body = call(app, "DELETE", "/api/buttons", headers={"x-api-key": "tok"})
    assert (status, body["error_code"]) == (404, "NOT_FOUND")


def test_unexpected_exception_is_a_generic_500(app_factory, monkeypatch):
    app = app_factory()

    def boom(req, context):
        raise RuntimeError("secret internal detail /home/x")

    monkeypatch.setattr(app, "api_list_buttons", boom)
    status, body = call(app, "GET", "/api/buttons")
    assert status == 500
    assert body == {
        "ok": False,
        "error_code": "INTERNAL_ERROR",
        "message": "internal error",
    }


def test_loopback_server_refuses_foreign_host_and_cross_origin_posts(app_factory):
    app = app_factory()
    status, body = call(
        app, "GET", "/api/buttons", headers={"Host": "evil.example:8787"}
    )
    assert (status, body["error_code"]) == (403, "HOST_FORBIDDEN")
    for host in ("127.0.0.1:8787", "localhost", "[::1]:9"):
        assert call(app, "GET", "/api/buttons", headers={"Host": host})[0] == 200
    status, body = call(
        app,
        "POST",
        "/api/spell-executions",
        {"button_id": "hello"},
        headers={"Host": "127.0.0.1:8787", "Origin": "http://evil.example"},
    )
    assert (status, body["error_code"]) == (403, "ORIGIN_FORBIDDEN")


def test_no_name_in_spell_py_is_defined_twice():
    """A later definition silently replaces an earlier one in a single module."""
    tree = ast.parse((ROOT / "spell.py").read_text())
    seen, twice = set(), set()
    for node in tree.body:
        names = (
            [node.name]
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))
            else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        )
        for name in names:
            (twice if name in seen else seen).add(name)
    assert not twice


# Buttons #####################################################################


def test_buttons_list_registry_fields_in_order_with_fallbacks(app_factory):
    status, body = call(app_factory(), "GET", "/api/buttons")
    assert status == 200 and list(body) == ["ok", "version", "buttons"]
    hello, slow = body["buttons"][0], body["buttons"][1]
    assert list(hello) == [
        "button_id",
        "label",
        "description",
        "spell_id",
        "version",
        "defaults",
        "required_confirmations",
        "require_signature",
        "allowed_roles",
        "manifest",
    ]
    assert (hello["label"], hello["description"]) == ("Say hello", "Prints a greeting")
    assert (slow["label"], slow["description"]) == ("slow", "")
    assert slow["require_signature"] is False
    assert hello["manifest"] is None  # not installed in this store


def test_buttons_carry_the_installed_manifest_summary(installed, app_factory):
    status, body = call(app_factory(), "GET", "/api/buttons")
    risky = next(b for b in body["buttons"] if b["button_id"] == "risky")
    assert risky["manifest"]["risk"] == "high"
    assert risky["manifest"]["effects"] == [
        {"type": "delete", "target": "demo-resource", "mutates": True}
    ]
    assert risky["manifest"]["billing"]["enabled"] is False
    assert risky["manifest"]["signed"] is False


# Auth ########################################################################


def test_auth_off_accepts_everyone(app_factory):
    assert call(app_factory(), "GET", "/api/buttons")[0] == 200


def test_legacy_tokens(app_factory):
    app = app_factory(authTokens=["top-secret-token"])
    assert call(app, "GET", "/api/buttons")[1]["error_code"] == "AUTH_REQUIRED"
    status, body = call(
        app, "GET", "/api/buttons", headers={"Authorization": "Bearer wrong-token"}
    )
    assert (status, body) == (
        401,
        {
            "ok": False,
            "error_code": "AUTH_INVALID",
            "message": "invalid authorization token",
        },
    )
    good = {"Authorization": "Bearer top-secret-token"}
    assert call(app, "GET", "/api/buttons", headers=good)[0] == 200
    assert call(app, "GET", "/api/spell-executions", headers=good)[0] == 200
    status, body = call(app, "GET", "/api/spell-executions/x", headers={})
    assert (status, body["message"]) == (401, "authorization token is required")


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"Authorization": "Bearer    k1   "}, 200),
        ({"Authorization": "bearer k1"}, 401),
        ({"Authorization": "Basic abc", "x-api-key": "k1"}, 200),
        ({"Authorization": "Bearer wrong", "x-api-key": "k1"}, 401),
        ({"Authorization": "Bearer", "x-api-key": "k1"}, 200),
        ({"x-api-key": "  k1 "}, 200),
        ({"x-api-key": "   "}, 401),
        ({"Authorization": "Bearer k1\u00e9"}, 401),
        ({"Authorization": "Bearer " + "k" * 5000}, 401),
    ],
)
def test_token_extraction_variants(app_factory, headers, expected):
    app = app_factory(authKeys=["admin=k1"])
    assert call(app, "GET", "/api/buttons", headers=headers)[0] == expected


def test_key_mode_binds_role_and_ignores_body_role(app_factory):
    app = app_factory(authKeys=["operator=op-token", "admin=admin-token"])
    status, body = call(
        app,
        "POST",
        "/api/spell-executions",
        {
            "button_id": "risky",
            "actor_role": "admin",
            "dry_run": True,
            "confirmation": {"risk_acknowledged": True},
        },
        headers={"x-api-key": "op-token"},
    )
    assert (status, body) == (
        403,
        {
            "ok": False,
            "error_code": "ROLE_NOT_ALLOWED",
            "message": "actor role not allowed: operator",
        },
    )
    status, body = call(
        app,
        "POST",
        "/api/spell-executions",
        {"button_id": "hello", "actor_role": 5},
        headers={"x-api-key": "op-token"},
    )
    assert body["message"] == "actor_role must be a non-empty string"


@pytest.mark.parametrize(
    "entries,message",
    [
        (["=tok"], "invalid auth key entry: =tok"),
        (["admin="], "invalid auth key entry: admin="),
        (["a:b:c=tok"], "invalid auth key entry: a:b:c=tok"),
        ([":admin"], "invalid auth key entry: :admin"),
        (["team a:admin=tok"], "invalid auth key tenant: team a"),
        ([":admin=tok"], "invalid auth key tenant: (empty)"),
        (["a.b=tok"], "invalid auth key role: a.b"),
        (["t:=tok"], "invalid auth key role: (empty)"),
        (["r" * 65 + "=tok"], "invalid auth key role: " + "r" * 65),
        (
            ["admin=t1", "operator=t1"],
            "duplicate auth key token configured for role: default:operator",
        ),
    ],
)
def test_auth_key_parse_errors(entries, message):
    with pytest.raises(spell.SpellError) as info:
        spell.Authenticator((), entries)
    assert info.value.message == message


def test_auth_key_forms():
    assert spell.parse_auth_key("admin=tok=with=eq") == spell.AuthKey(
        "default", "admin", "tok=with=eq"
    )
    assert spell.parse_auth_key("admin:tok") == spell.AuthKey("default", "admin", "tok")
    assert spell.parse_auth_key("team:admin:tok") == spell.AuthKey(
        "default", "team", "admin:tok"
    )
    assert spell.parse_auth_key("team_a:operator=x") == spell.AuthKey(
        "team_a", "operator", "x"
    )


def test_both_auth_modes_is_a_start_up_error(api_env, registry):
    with pytest.raises(spell.SpellError) as info:
        spell.ExecutionApi(
            spell.api_settings(
                registryPath=str(registry), authTokens=["a"], authKeys=["admin=b"]
            ),
            start_worker=False,
        )
    assert info.value.message == (
        "API auth config error: use either authTokens or authKeys (role-based), not both"
    )
    # A key parse error is reported before the "both" error.
    with pytest.raises(spell.SpellError, match="invalid auth key entry"):
        spell.Authenticator(["a"], ["=b"])


# Settings and start-up #######################################################


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("SPELL_API_PORT", "0", "SPELL_API_PORT must be an integer >= 1"),
        ("SPELL_API_PORT", "abc", "SPELL_API_PORT must be an integer >= 1"),
        ("SPELL_API_PORT", "2.5", "SPELL_API_PORT must be an integer >= 1"),
        (
            "SPELL_API_BODY_LIMIT_BYTES",
            "0",
            "SPELL_API_BODY_LIMIT_BYTES must be an integer >= 1",
        ),
        (
            "SPELL_API_EXECUTION_TIMEOUT_MS",
            "-1",
            "SPELL_API_EXECUTION_TIMEOUT_MS must be an integer >= 1",
        ),
        (
            "SPELL_API_RATE_LIMIT_WINDOW_MS",
            "x",
            "SPELL_API_RATE_LIMIT_WINDOW_MS must be an integer >= 1",
        ),
        (
            "SPELL_API_RATE_LIMIT_MAX_REQUESTS",
            "0",
            "SPELL_API_RATE_LIMIT_MAX_REQUESTS must be an integer >= 1",
        ),
        (
            "SPELL_API_MAX_CONCURRENT_EXECUTIONS",
            "-1",
            "SPELL_API_MAX_CONCURRENT_EXECUTIONS must be an integer >= 0",
        ),
        (
            "SPELL_API_LOG_RETENTION_DAYS",
            "1.5",
            "SPELL_API_LOG_RETENTION_DAYS must be an integer >= 0",
        ),
        (
            "SPELL_API_LOG_MAX_FILES",
            "-3",
            "SPELL_API_LOG_MAX_FILES must be an integer >= 0",
        ),
    ],
)
def test_environment_errors(name, value, message):
    with pytest.raises(spell.SpellError) as info:
        spell.api_settings_from_env({name: value})
    assert info.value.message == message


def test_environment_values_follow_javascript_number_rules(tmp_path):
    env = {
        "SPELL_API_PORT": " 0x10 ",
        "SPELL_API_BODY_LIMIT_BYTES": "1e3",
        "SPELL_API_EXECUTION_TIMEOUT_MS": "10.0",
        "SPELL_API_MAX_CONCURRENT_EXECUTIONS": "0",
        "SPELL_API_LOG_MAX_FILES": "   ",
        "SPELL_API_AUTH_KEYS": " , admin=k ,, ",
        "SPELL_API_AUTH_TOKENS": " , ",
        "SPELL_API_HOST": "::1",
    }
    settings = spell.api_settings_from_env(env)
    assert (
        settings.port,
        settings.body_limit_bytes,
        settings.execution_timeout_ms,
    ) == (16, 1000, 10)
    assert settings.max_concurrent_executions == 0
    assert settings.log_max_files == spell.API_LOG_MAX_FILES
    assert settings.auth_keys == ("admin=k",) and settings.auth_tokens == ()
    assert settings.host == "::1"
    defaults = spell.api_settings_from_env({})
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8787)
    assert defaults.registry_path == os.path.join(
        os.getcwd(), "examples", "button-registry.v1.json"
    )
    assert spell.api_settings_from_env({}, host="0.0.0.0", port="0").port == 0


def test_cli_start_up_errors_are_one_line_and_exit_1(api_env, tmp_path, monkeypatch):
    def run(*argv, **env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        out, err = io.StringIO(), io.StringIO()
        return spell.main(["api", *argv], stdout=out, stderr=err), err.getvalue()

    assert run(SPELL_API_PORT="nope") == (1, "SPELL_API_PORT must be an integer >= 1\n")
    monkeypatch.delenv("SPELL_API_PORT")
    assert run(SPELL_BUTTON_REGISTRY_PATH="") == (
        1,
        "button registry file not found: \n",
    )
    missing = str(tmp_path / "missing.json")
    assert run("--registry", missing) == (
        1,
        f"button registry file not found: {missing}\n",
    )
    reg = write_registry(tmp_path)
    code, err = run(
        "--registry",
        str(reg),
        "--port",
        "0",
        SPELL_API_AUTH_KEYS="admin=a",
        SPELL_API_AUTH_TOKENS="b",
    )
    assert (
        code == 1 and err.startswith("API auth config error:") and err.count("\n") == 1
    )


def test_cli_reports_a_busy_port(api_env, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out, err = io.StringIO(), io.StringIO()
        code = spell.main(
            ["api", "--registry", str(write_registry(tmp_path)), "--port", str(port)],
            stdout=out,
            stderr=err,
        )
    assert code == 1
    assert (
        err.getvalue()
        == f"listen EADDRINUSE: address already in use 127.0.0.1:{port}\n"
    )


# Registry ####################################################################


def _registry_error(tmp_path, doc) -> str:
    path = tmp_path / "reg.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(spell.SpellError) as info:
        spell.load_button_registry(str(path))
    return info.value.message


def test_example_registry_loads():
    reg = spell.load_button_registry(str(ROOT / "examples" / "button-registry.v1.json"))
    demo = reg.by_id["call_webhook_demo"]
    assert demo.spell_id == "samples/call-webhook"
    assert (demo.risk, demo.billing, demo.require_signature) == (False, False, False)


def test_registry_duplicate_and_validation_messages(tmp_path):
    same = button("same", "a/b")
    assert (
        _registry_error(tmp_path, {"version": "v1", "buttons": [same, same]})
        == "duplicate button_id in registry: same"
    )
    message = _registry_error(
        tmp_path, {"version": "v1", "buttons": [{"button_id": "x"}]}
    )
    assert message.startswith("button registry validation failed: ")
    assert "/buttons/0 must have required property 'spell_id'" in message
    assert _registry_error(tmp_path, "{nope").startswith(
        "failed to parse button registry JSON: "
    )
    assert (
        _registry_error(tmp_path, [])
        == "button registry validation failed: / must be object"
    )
    message = _registry_error(tmp_path, {"version": "v2", "buttons": [], "x": 1})
    assert message == (
        "button registry validation failed: / must NOT have additional "
        "properties; /version must be equal to constant; "
        "/buttons must NOT have fewer than 1 items"
    )
    bad = button(
        "",
        "a/b",
        defaults=[],
        allowed_roles=[],
        required_confirmations={"risk": "yes", "billing": False, "x": 1},
        extra=1,
    )
    message = _registry_error(tmp_path, {"version": "v1", "buttons": [bad]})
    for part in (
        "/buttons/0 must NOT have additional properties",
        "/buttons/0/button_id must NOT have fewer than 1 characters",
        "/buttons/0/defaults must be object",
        "/buttons/0/required_confirmations must NOT have additional properties",
        "/buttons/0/required_confirmations/risk must be boolean",
        "/buttons/0/allowed_roles must NOT have fewer than 1 items",
    ):
        assert part in message


def test_registry_accepts_owners_as_the_published_schema_does(tmp_path):
    path = write_registry(tmp_path, [button("a", "x/y", owners=["team-a"])])
    assert spell.load_button_registry(str(path)).by_id["a"].spell_id == "x/y"
    assert "owners must be array" in _registry_error(
        tmp_path, {"version": "v1", "buttons": [button("a", "x/y", owners="t")]}
    )


def test_merge_input_deep_merges_objects_only():
    defaults = {"event": "deploy", "source": "manual", "payload": {"service": "web"}}
    merged = spell.merge_input(
        defaults, {"payload": {"extra": 1}, "event": None, "new": [1]}
    )
    assert json.dumps(merged) == (
        '{"event": null, "source": "manual", '
        '"payload": {"service": "web", "extra": 1}, "new": [1]}'
    )
    assert defaults["payload"] == {"service": "web"}


# OpenAPI #####################################################################


def test_openapi_document_is_valid_3_1_and_served(app_factory):
    import jsonschema

    status, doc = call(app_factory(), "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert call(app_factory(), "GET", "/api/openapi.json")[1] == doc
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    for method, route in spell.API_ROUTES:
        path = "/api" + route if route != "/openapi.json" else "/api/openapi.json"
        assert (method, path) in documented
    for route in spell.UI_ROUTES:
        assert route in ("/", "/ui") or ("GET", route) in documented


def test_error_responses_match_the_openapi_document(app_factory):
    app = app_factory(authKeys=["admin=k", "team_b:operator=o"])
    doc = spell.openapi_document()
    key = {"x-api-key": "k"}
    cases = [
        ("GET", "/api/buttons", None, {}, "/api/buttons"),
        ("POST", "/api/spell-executions", b"{bad", key, "/api/spell-executions"),
        (
            "GET",
            "/api/spell-executions?status=nope",
            None,
            key,
            "/api/spell-executions",
        ),
        (
            "GET",
            "/api/spell-executions?tenant_id=x",
            None,
            {"x-api-key": "o"},
            "/api/spell-executions",
        ),
        (
            "GET",
            "/api/spell-executions/a%20b",
            None,
            key,
            "/api/spell-executions/{execution_id}",
        ),
        (
            "GET",
            "/api/spell-executions/missing",
            None,
            key,
            "/api/spell-executions/{execution_id}",
        ),
    ]
    for method, target, body, headers, path in cases:
        status, value = call(app, method, target, body, headers)
        openapi_validator(doc, method, path, status).validate(value)


def test_port_bounds():
    with pytest.raises(
        spell.SpellError, match="SPELL_API_PORT must be an integer >= 1 and"
    ):
        spell.api_settings_from_env({"SPELL_API_PORT": "70000"})
    with pytest.raises(
        spell.SpellError, match="--port must be an integer from 0 to 65535"
    ):
        spell.api_settings_from_env({}, port="-1")


def test_plain_json_matches_compact_json_for_index_values():
    row = {
        "execution_id": "exec_1_abcdef12",
        "button_id": 'b\u00e9\u2028"x\\',
        "require_signature": True,
        "status": "failed",
        "tenant_id": "t",
        "actor_role": "\x00\x1f\x7f\x9b\ud800",
        "created_at": "2026",
        "error_code": None,
        "seq": 10**15,
    }
    value = {
        "ok": True,
        "executions": [spell.public_execution(row)],
        "limit": 5,
        "none": None,
    }
    assert spell.plain_json(value) == spell.compact_json(value)


def test_ipv6_loopback(api_env, registry):
    import http.client
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = spell.start_execution_api_server(
            registryPath=str(registry), host="::1", quiet=True
        )
    except spell.SpellError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc.message}")
    try:
        assert server.url == f"http://[::1]:{server.port}"
        conn = http.client.HTTPConnection("::1", server.port, timeout=10)
        conn.request("GET", "/api/health")
        assert conn.getresponse().read() == b'{"ok":true}'
        conn.close()
    finally:
        server.close()
