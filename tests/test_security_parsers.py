"""Security: hostile YAML and JSON end in a refusal or a documented value.

YAML alias bombs, deep nesting and huge documents; JSON with NaN, Infinity,
huge numbers or 10,000 levels; schemas that point at remote documents. The
install-time spell.yaml cases live in tests/test_manifest.py and the schema
``pattern`` and ``$ref`` cases of the cast in tests/test_cast_logs.py; these
cover the other places that parse.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from security_helpers import *  # noqa: F401,F403  (fixtures)
from security_helpers import assert_ok, assert_refused, installed, log_texts
from trust_helpers import new_key, public_b64, write_trust

import spell

ALIAS_BOMB = (
    "\n".join(
        ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        + [
            f"{c}: &{c} [{', '.join('*' + p for _ in range(9))}]"
            for p, c in zip("abcdefgh", "bcdefghi")
        ]
    )
    + "\n"
)
DEEP_JSON = "[" * 10_000 + "]" * 10_000


class BodyServer:
    """Serves fixed bodies on 127.0.0.1 and records the paths asked for."""

    def __init__(self, bodies: dict[str, bytes]):
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.paths.append(self.path)
                body = bodies.get(self.path.split("?")[0], b"{}")
                self.send_response(200 if self.path.split("?")[0] in bodies else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def body_server():
    servers = []

    def start(bodies):
        servers.append(BodyServer(bodies))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# YAML #######################################################################


def test_yaml_alias_bomb_given_to_sign_bundle_is_refused(
    make_bundle, spell_run, tmp_path
):
    bundle = make_bundle(yaml_text=ALIAS_BOMB)
    result = spell_run("sign", "bundle", bundle, "--private-key", tmp_path / "none.pem")
    assert_refused(result, prefix="failed to parse spell.yaml: ")
    assert not (bundle / "spell.sig.json").exists()


@pytest.mark.parametrize(
    "text", [ALIAS_BOMB, "[" * 10_000], ids=["alias-bomb", "deep-brackets"]
)
def test_installed_manifest_rewritten_into_a_yaml_bomb_is_skipped_or_refused(
    text, make_bundle, cli, spell_run, store
):
    """A host step runs in its installed bundle and may rewrite spell.yaml for later."""
    installed(cli, make_bundle())
    installed(cli, make_bundle(id="test/other"))
    folder = store / "spells" / spell.id_key("test/demo") / "1.0.0"
    (folder / "spell.yaml").write_text(text)
    listing = spell_run("list")
    assert_ok(listing)
    assert listing.stdout.splitlines()[1:] == [
        "test/other@1.0.0\tDemo\tlow\tfalse\thost"
    ]
    assert listing.stderr.startswith(
        f"warning: skipping {folder}: failed to parse " "spell.yaml: "
    )
    for command in (
        ["inspect", "test/demo"],
        ["verify", "test/demo"],
        ["cast", "test/demo", "--allow-unsigned"],
    ):
        assert_refused(spell_run(*command), prefix="failed to parse spell.yaml: ")


def test_megabyte_of_yaml_nodes_is_refused_within_seconds(make_bundle, spell_run):
    bundle = make_bundle(yaml_text="a: [" + "a," * 500_000 + "a]\n")
    result = spell_run("install", bundle, timeout=4)
    assert_refused(result, prefix="failed to parse spell.yaml: ")


# JSON given to a cast #######################################################


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a": NaN}', "Unexpected token NaN in JSON"),
        ('{"a": -Infinity}', "Unexpected token -Infinity in JSON"),
        (DEEP_JSON, "JSON nested deeper than 200 levels"),
        ('{"a": ' + "9" * 5000 + "}", None),
        (b"\xff\xfe{}", "invalid UTF-8 at byte 0"),
    ],
    ids=["nan", "infinity", "deep", "huge-integer", "binary"],
)
def test_input_file_with_non_json_numbers_or_deep_nesting_is_refused(
    text, message, make_bundle, cli, spell_run, tmp_path
):
    installed(cli, make_bundle())
    path = tmp_path / "in.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = spell_run("cast", "test/demo", "--allow-unsigned", "--input", path)
    assert_refused(result, message)


def test_input_numbers_beyond_a_double_read_as_javascript_does(
    make_bundle, cli, spell_run, store, tmp_path
):
    installed(cli, make_bundle())
    path = tmp_path / "in.json"
    path.write_text('{"big": 1e999, "small": -1e999, "tiny": 1e-999}')
    assert_ok(spell_run("cast", "test/demo", "--allow-unsigned", "--input", path))
    # JSON.parse gives Infinity, JSON.stringify writes null.
    assert json.loads(log_texts(store))["input"] == {
        "big": None,
        "small": None,
        "tiny": 0,
    }


def test_param_nested_ten_thousand_levels_is_kept_as_text(
    make_bundle, cli, spell_run, store
):
    installed(cli, make_bundle())
    result = spell_run(
        "cast", "test/demo", "--allow-unsigned", "-p", "deep=" + DEEP_JSON
    )
    assert_ok(result)
    assert json.loads(log_texts(store))["input"] == {"deep": DEEP_JSON}


@pytest.mark.parametrize(
    "text, detail",
    [
        (DEEP_JSON, "JSON nested deeper than 200 levels"),
        ('{"type": "object", "minProperties": NaN}', "Unexpected token NaN in JSON"),
    ],
    ids=["deep", "nan"],
)
def test_schema_that_is_deep_or_not_json_is_refused_at_cast(
    text, detail, make_bundle, cli, spell_run
):
    installed(cli, make_bundle(files={"schema.json": text}))
    result = spell_run("cast", "test/demo", "--allow-unsigned")
    assert_refused(result, f"failed to parse schema.json: {detail}")


def test_schema_naming_remote_metaschema_and_id_relative_refs_fetches_nothing(
    make_bundle, cli, spell_run, body_server
):
    server = body_server({"/meta": b"{}", "/other.json": b'{"type": "string"}'})
    schema = {
        "$schema": server.base + "/meta",
        "$id": server.base + "/root.json",
        "type": "object",
        "properties": {
            "name": {"$ref": "other.json"},
            "more": {"$dynamicRef": "#meta"},
        },
    }
    installed(cli, make_bundle(files={"schema.json": json.dumps(schema)}))
    result = spell_run("cast", "test/demo", "--allow-unsigned", "-p", "name=x")
    assert_refused(result, prefix="schema is invalid: ")
    assert "other.json" in result.stderr
    assert server.paths == []


# JSON from the network ######################################################


def test_http_response_too_deep_for_the_host_or_not_json_is_kept_as_text(
    make_bundle, cli, spell_run, store, body_server
):
    bodies = {
        "/deep": b"[" * 900 + b"]" * 900,
        "/nan": b'{"a": NaN}',
        "/huge": b"1" * 5000,
        "/ok": b'{"a": [1, {"b": null}]}',
    }
    server = body_server(bodies)
    manifest = make_bundle.manifest()
    manifest["steps"] = [
        {"uses": "http", "name": name, "run": f"steps/{name}.json"}
        for name in ("deep", "nan", "huge", "ok")
    ]
    files = {
        f"steps/{name}.json": json.dumps(
            {"method": "GET", "url": server.base + "/" + name}
        )
        for name in ("deep", "nan", "huge", "ok")
    }
    installed(cli, make_bundle(manifest, files=files))
    assert_ok(spell_run("cast", "test/demo", "--allow-unsigned"))
    outputs = json.loads(log_texts(store))["outputs"]
    assert outputs == {
        f"step.{name}.json": bodies[f"/{name}"].decode()
        for name in ("deep", "nan", "huge")
    } | {"step.ok.json": {"a": [1, {"b": None}]}}


# JSON of the trust, licence and policy stores ###############################


def test_trust_file_nested_ten_thousand_levels_is_an_error_at_verify(
    make_bundle, cli, spell_run, store
):
    installed(cli, make_bundle())
    path = write_trust(store, "test", [("default", public_b64(new_key()))])
    with open(path, "w") as handle:
        handle.write(DEEP_JSON)
    (
        store / "spells" / spell.id_key("test/demo") / "1.0.0" / "spell.sig.json"
    ).write_text(
        json.dumps(
            {
                "version": "v1",
                "publisher": "test",
                "key_id": "default",
                "algorithm": "ed25519",
                "digest": {"algorithm": "sha256", "value": "0" * 64},
                "signature": "AAAA",
            }
        )
    )
    result = spell_run("verify", "test/demo")
    assert_refused(result, f"failed to parse trust file: {path}", stdout=None)


@pytest.mark.parametrize(
    "payload, detail",
    [
        ("[" * 300 + "]" * 300, "JSON nested deeper than 200 levels"),
        (
            '{"version": "v1", "max_amount": Infinity}',
            "Unexpected token Infinity in JSON",
        ),
        (
            '{"version": "v1", "max_amount": 1' + "0" * 4400 + "}",
            "Exceeds the limit (4300 digits) for integer string conversion: "
            "value has 4401 "
            "digits; use sys.set_int_max_str_digits() to increase the limit",
        ),
    ],
    ids=["deep", "infinity", "huge-integer"],
)
def test_entitlement_payload_that_is_deep_or_not_json_is_refused(
    payload, detail, spell_run
):
    token = f"ent1.{spell.b64url_encode(payload.encode())}.AAAA"
    result = spell_run("license", "add", "dev", token)
    assert_refused(result, f"invalid entitlement payload JSON: {detail}")


def test_policy_nested_ten_thousand_levels_is_refused(spell_run, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(
        '{"version": "v1", "default": "allow", "runtime": ' + DEEP_JSON + "}"
    )
    result = spell_run("policy", "validate", "--file", path)
    assert_refused(
        result,
        "invalid policy: failed to parse JSON: JSON nested deeper than " "200 levels",
    )


@pytest.mark.parametrize(
    "text, detail",
    [
        (DEEP_JSON, "plan is not valid JSON: "),
        (
            '{"bundle_dir": "/tmp", "step_timeout_ms": NaN}',
            "plan is not valid JSON: Unexpected token NaN in JSON",
        ),
    ],
    ids=["deep", "nan"],
)
def test_runner_plan_that_is_deep_or_not_json_is_refused(
    text, detail, spell_run, pyz, tmp_path
):
    path = tmp_path / "plan.json"
    path.write_text(text)
    result = spell_run("--plan", path, pyz_path=pyz.runner)
    assert_refused(result, prefix="spell-runner: " + detail)


@pytest.mark.parametrize("levels", [900, 6000])
def test_param_key_with_thousands_of_dots_is_refused_or_cast(
    levels, make_bundle, cli, spell_run, store
):
    installed(cli, make_bundle())
    result = spell_run(
        "cast",
        "test/demo",
        "--allow-unsigned",
        "--dry-run",
        "-p",
        "a." * levels + "b=1",
    )
    if result.returncode == 1:
        assert_refused(result)  # refusing such nesting is fine
    else:
        assert_ok(result)
    assert log_texts(store), "no execution log was written"
