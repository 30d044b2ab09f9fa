"""Security: secrets are masked wherever spell writes them, and never handed on.

Secret values are those of secret-looking environment variables (connector
tokens included) and of inputs under secret-looking keys. They are masked in
the log, in error lines and in ``--verbose`` output, wherever they appear; the
API's own keys never reach a step; an input value is never expanded as a
template. The basic redaction rules have their tests in tests/test_cast_logs.py.
"""

from __future__ import annotations

import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from security_helpers import *  # noqa: F401,F403  (fixtures)
from security_helpers import assert_ok, assert_refused, installed, log_texts

SECRET = "s3cr3t-v4lue-0123456789"


class Recorder:
    """An HTTP server on 127.0.0.1 that records requests and answers ``answer``."""

    def __init__(self, answer: bytes = b"{}"):
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("content-length") or 0)
                recorder.requests.append(
                    {"path": self.path, "body": self.rfile.read(length).decode()}
                )
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def recorder():
    servers = []

    def start(answer=b"{}"):
        servers.append(Recorder(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def http_bundle(make_bundle, definition: dict, **fields):
    manifest = make_bundle.manifest()
    manifest["steps"] = [{"uses": "http", "name": "call", "run": "steps/call.json"}]
    manifest.update(fields)
    return make_bundle(manifest, files={"steps/call.json": json.dumps(definition)})


def test_input_value_holding_an_env_template_is_sent_verbatim(
    make_bundle, cli, spell_run, store, recorder
):
    server = recorder()
    definition = {
        "method": "POST",
        "url": server.base + "/hook?m={{INPUT.msg}}",
        "body": {"text": "{{INPUT.msg}}", "whole": "say {{INPUT.msg}}"},
    }
    installed(cli, http_bundle(make_bundle, definition))
    template = "{{ENV.APP_SECRET}}"
    result = spell_run(
        "cast",
        "test/demo",
        "--allow-unsigned",
        "-p",
        f"msg={template}",
        env={"APP_SECRET": SECRET},
    )
    assert_ok(result)
    [request] = server.requests
    assert SECRET not in json.dumps(request)
    assert json.loads(request["body"]) == {"text": template, "whole": f"say {template}"}
    assert SECRET not in log_texts(store)


def test_api_auth_keys_never_reach_a_step(make_bundle, cli, spell_run, store, recorder):
    keys = {
        "SPELL_API_AUTH_KEYS": "admin=" + SECRET,
        "SPELL_API_AUTH_TOKENS": SECRET + "x",
    }
    step = "#!/bin/sh\nenv | grep SPELL_API_ || echo none\n"
    installed(cli, make_bundle(files={"steps/run.sh": step}))
    assert_ok(spell_run("cast", "test/demo", "--allow-unsigned", env=keys))
    assert json.loads(log_texts(store))["outputs"]["step.run.stdout"] == "none\n"
    server = recorder()
    definition = {
        "method": "GET",
        "url": server.base + "/?k={{ENV.SPELL_API_AUTH_KEYS}}",
    }
    installed(cli, http_bundle(make_bundle, definition, id="test/http"))
    result = spell_run("cast", "test/http", "--allow-unsigned", env=keys)
    assert_refused(
        result, prefix="unresolved template: {{ENV.SPELL_API_AUTH_KEYS}}", stdout=None
    )
    assert server.requests == []


def test_connector_token_echoed_by_a_server_is_masked_in_a_check_failure(
    make_bundle, cli, spell_run, store, recorder
):
    server = recorder(json.dumps({"who": SECRET}).encode())
    checks = [
        {
            "type": "jsonpath_equals",
            "params": {
                "from_output": "step.call.json",
                "path": "who",
                "expected": "someone",
            },
        }
    ]
    installed(
        cli,
        http_bundle(
            make_bundle,
            {
                "method": "GET",
                "url": server.base + "/me",
                "headers": {"x-token": "{{ENV.CONNECTOR_GITHUB_TOKEN}}"},
            },
            checks=checks,
            permissions=[{"connector": "github", "scopes": ["read"]}],
        ),
    )
    result = spell_run(
        "cast", "test/demo", "--allow-unsigned", env={"CONNECTOR_GITHUB_TOKEN": SECRET}
    )
    assert_refused(
        result,
        "check failed: jsonpath mismatch at who: expected someone, " "got [REDACTED]",
        stdout=None,
    )
    assert SECRET not in result.stdout + log_texts(store)


def test_secret_written_in_two_pieces_is_masked_in_verbose_output(
    make_bundle, cli, spell_run, store
):
    half = len(SECRET) // 2
    step = (
        f"#!/bin/sh\nprintf 'key={SECRET[:half]}'\nsleep 0.3\n"
        f"printf '{SECRET[half:]} done\\n'\n"
    )
    installed(cli, make_bundle(files={"steps/run.sh": step}))
    result = spell_run(
        "cast", "test/demo", "--allow-unsigned", "--verbose", env={"APP_SECRET": SECRET}
    )
    assert_ok(result)
    assert "[run:stdout] key=[REDACTED] done\n" in result.stderr
    assert SECRET[:half] not in result.stderr and SECRET[half:] not in result.stderr


def test_interrupted_cast_leaves_no_input_file_behind(
    make_bundle, cli, spell_run, tmp_path
):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    step = '#!/bin/sh\ntouch "$READY"\nsleep 30\n'
    installed(cli, make_bundle(files={"steps/run.sh": step}))
    ready = tmp_path / "ready"
    result = spell_run(
        "cast",
        "test/demo",
        "--allow-unsigned",
        "-p",
        f"password={SECRET}",
        env={"TMPDIR": str(tmp), "READY": str(ready)},
        signals=[(ready.exists, signal.SIGTERM)],
    )
    assert_refused(result, "cast interrupted", stdout=None)
    assert list(tmp.iterdir()) == []


def test_numeric_value_under_a_secret_key_is_masked_in_step_output(
    make_bundle, cli, spell_run, store
):
    installed(
        cli, make_bundle(files={"steps/run.sh": '#!/bin/sh\ncat "$INPUT_JSON"\n'})
    )
    assert_ok(
        spell_run("cast", "test/demo", "--allow-unsigned", "-p", "api_token=987654321")
    )
    assert "987654321" not in log_texts(store)


def test_secret_cut_by_the_result_head_leaves_no_prefix_in_the_log(
    make_bundle, cli, spell_run, store
):
    step = f"#!/bin/sh\nprintf '%0190d' 0\necho \" token {SECRET}\"\n"
    installed(cli, make_bundle(files={"steps/run.sh": step}))
    assert_ok(
        spell_run("cast", "test/demo", "--allow-unsigned", env={"APP_SECRET": SECRET})
    )
    assert SECRET[:3] not in log_texts(store)


def runner_plan(tmp_path, script: str, redact: list[str]):
    bundle = tmp_path / "bundle"
    (bundle / "steps").mkdir(parents=True)
    (bundle / "steps" / "run.sh").write_text(script)
    (bundle / "steps" / "run.sh").chmod(0o755)
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "bundle_dir": str(bundle),
                "redact": redact,
                "steps": [{"name": "run", "uses": "shell", "run": "steps/run.sh"}],
                "checks": [],
            }
        )
    )
    return plan


def test_runner_masks_secrets_before_cutting_heads_and_output(spell_run, pyz, tmp_path):
    head_cut = f"printf '%0195d' 0\nprintf '{SECRET}\\n'\nprintf '{SECRET}' >&2\n"
    written = 195 + len(SECRET) + 1
    # The output cap keeps the first and last 512 KiB: one secret straddles each edge.
    size = 512 * 1024
    output_cut = (
        f"head -c {size - 5 - written} /dev/zero | tr '\\0' x\n"
        f"printf '{SECRET}'\nhead -c {2 * size} /dev/zero | tr '\\0' y\n"
        f"printf '{SECRET}'\nhead -c {size - 5} /dev/zero | tr '\\0' z\n"
    )
    plan = runner_plan(tmp_path, "#!/bin/sh\n" + head_cut + output_cut, [SECRET])
    result = spell_run("--plan", plan, pyz_path=pyz.runner)
    assert_ok(result)
    data = json.loads(result.stdout)
    record = data["stepResults"][0]
    assert record["stdout_head"] == "0" * 195 + "[REDACTED]"[:5]
    assert record["stderr_head"] == "[REDACTED]"
    head, marker, tail = data["outputs"]["step.run.stdout"].partition("\n[spell: ")
    assert marker and head.endswith("x[REDACTED]")
    assert tail.split(" bytes of output cut]\n", 1)[1].startswith("[REDACTED]z")
    # The whole output keeps the secret itself for the checks; the host masks it.
    assert head.startswith("0" * 195 + SECRET)


def test_api_receipt_masks_a_secret_quoted_by_a_failing_check(
    make_bundle, cli, api_server, recorder
):
    from api_helpers import button

    server_http = recorder(json.dumps({"who": SECRET}).encode())
    checks = [
        {
            "type": "jsonpath_equals",
            "params": {
                "from_output": "step.call.json",
                "path": "who",
                "expected": "someone",
            },
        }
    ]
    installed(
        cli,
        http_bundle(
            make_bundle, {"method": "GET", "url": "{{INPUT.url}}"}, checks=checks
        ),
    )
    _, client = api_server(
        [button("leak", "test/demo", defaults={"url": server_http.base + "/me"})],
        authKeys=["admin=" + SECRET[::-1]],
    )
    detail = client.wait(client.launch("leak", input={"password": SECRET}))
    assert detail["execution"]["status"] == "failed"
    text = json.dumps(detail)
    assert SECRET not in text and SECRET[::-1] not in text
    assert detail["receipt"]["error"] == (
        "check failed: jsonpath mismatch at who: " "expected someone, got [REDACTED]"
    )
