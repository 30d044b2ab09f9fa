"""What a cast leaves behind and what it shows: logs, redaction, temp files, escaping.

Also the schema hardening: a backtracking ``pattern`` cannot hang a cast and a
``$ref`` to a remote or ``file:`` URL is never fetched.
"""

from __future__ import annotations

import io
import json
import os
import stat
import time

import pytest

from cast_helpers import (
    SPELLS,
    Recorder,
    clean_env,
    copy_fixture,
    latest_log,
    log_files,
    make_bundle,
    stdout_fields,
)

import spell  # noqa: E402  (cast_helpers puts the repository on sys.path)


@pytest.fixture
def spell_cli(run_pyz, store):
    def run(*args, timeout=60, **extra_env):
        return run_pyz(*args, env=clean_env(**extra_env), timeout=timeout)

    return run


@pytest.fixture
def install(spell_cli):
    def run(source) -> None:
        proc = spell_cli("install", source)
        assert proc.returncode == 0, proc.stderr

    return run


# Files and modes ############################################################


def test_logs_are_private(spell_cli, install, store):
    install(SPELLS / "hello-host")
    assert (
        spell_cli(
            "cast", "fixtures/hello-host", "--allow-unsigned", "-p", "name=x"
        ).returncode
        == 0
    )
    assert spell_cli("cast", "fixtures/hello-host", "--allow-unsigned").returncode == 1
    files = log_files(store)
    assert len(files) == 2
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((store / "logs").stat().st_mode) == 0o700
    assert not [
        p for p in (store / "logs").iterdir() if p.suffix != ".json"
    ], "temp files left"


INPUT_PROBE = """#!/bin/sh
echo "path=$INPUT_JSON"
echo "file=$(stat -c %a "$INPUT_JSON")"
echo "dir=$(stat -c %a "$(dirname "$INPUT_JSON")")"
echo "content=$(cat "$INPUT_JSON")"
"""


def test_input_temp_file_is_private_and_removed(spell_cli, install, store, tmp_path):
    install(
        make_bundle(tmp_path / "b", "fixtures/probe", {"probe": ("shell", INPUT_PROBE)})
    )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = spell_cli(
        "cast", "fixtures/probe", "--allow-unsigned", "-p", "word=hi", TMPDIR=str(tmp)
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(
        line.split("=", 1)
        for line in latest_log(store)["outputs"]["step.probe.stdout"].splitlines()
    )
    assert lines["file"] == "600" and lines["dir"] == "700"
    assert lines["content"] == '{"word":"hi"}'
    assert lines["path"].startswith(str(tmp) + "/spell-input-")
    assert not os.path.exists(lines["path"])
    assert list(tmp.iterdir()) == [], "the input folder was left behind"


def test_input_temp_file_is_removed_after_a_failure(spell_cli, install, tmp_path):
    install(
        make_bundle(
            tmp_path / "b",
            "fixtures/probe-fail",
            {"probe": ("shell", INPUT_PROBE + "exit 4\n")},
        )
    )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = spell_cli("cast", "fixtures/probe-fail", "--allow-unsigned", TMPDIR=str(tmp))
    assert proc.stderr == "step failed: probe (exit code 4)\n"
    assert list(tmp.iterdir()) == []


# Redaction ##################################################################


def test_env_and_key_named_secrets_are_redacted(spell_cli, install, store):
    install(SPELLS / "secret-echo")
    proc = spell_cli(
        "cast",
        "fixtures/secret-echo",
        "--allow-unsigned",
        "-p",
        "name=env-secret-value",
        "-p",
        "token=plain-secret",
        "-p",
        "note=keeps env-secret-value out",
        APP_SECRET="env-secret-value",
    )
    assert proc.returncode == 0, proc.stderr
    text = log_files(store)[-1].read_text(encoding="utf-8")
    assert "env-secret-value" not in text and "plain-secret" not in text
    log = json.loads(text)
    assert log["input"] == {
        "name": "[REDACTED]",
        "token": "[REDACTED]",
        "note": "keeps [REDACTED] out",
    }
    assert (
        log["outputs"]["step.echo.stdout"]
        == "APP_SECRET=[REDACTED]\ntoken=[REDACTED]\n"
    )
    assert "env-secret-value" not in proc.stdout + proc.stderr


def test_verbose_output_is_redacted(spell_cli, install):
    install(SPELLS / "secret-echo")
    proc = spell_cli(
        "cast",
        "fixtures/secret-echo",
        "--allow-unsigned",
        "--verbose",
        "-p",
        "token=plain-secret",
        APP_SECRET="env-secret-value",
    )
    assert proc.returncode == 0, proc.stderr
    assert "[echo:stdout] APP_SECRET=[REDACTED]" in proc.stderr
    assert "plain-secret" not in proc.stderr and "env-secret-value" not in proc.stderr


PATTERNS_STEP = """#!/bin/sh
echo "Authorization: Bearer abc.def.ghi"
echo "pat ghp_0123456789abcdef and sk_live_zzz"
echo "session type $XDG_SESSION_TYPE"
"""


def test_bearer_and_token_like_strings_are_redacted(
    spell_cli, install, store, tmp_path
):
    install(
        make_bundle(
            tmp_path / "b", "fixtures/patterns", {"say": ("shell", PATTERNS_STEP)}
        )
    )
    proc = spell_cli(
        "cast", "fixtures/patterns", "--allow-unsigned", XDG_SESSION_TYPE="wayland"
    )
    assert proc.returncode == 0, proc.stderr
    out = latest_log(store)["outputs"]["step.say.stdout"]
    assert out == (
        "Authorization: Bearer [REDACTED]\npat [REDACTED] and [REDACTED]\n"
        "session type wayland\n"
    )


HTTP_SECRET_STEP = json.dumps(
    {
        "method": "GET",
        "url": "{{INPUT.base}}/hook?key={{ENV.HOOK_API_KEY}}",
        "headers": {"authorization": "Bearer {{ENV.HOOK_API_KEY}}"},
    }
)


def test_secrets_in_urls_are_masked_in_the_log(spell_cli, install, store, tmp_path):
    install(
        make_bundle(
            tmp_path / "b", "fixtures/hook", {"call": ("http", HTTP_SECRET_STEP)}
        )
    )
    with Recorder() as server:
        server.routes["/hook"] = (200, {"echo": "s3cr3t-hook-key"})
        proc = spell_cli(
            "cast",
            "fixtures/hook",
            "--allow-unsigned",
            "-p",
            f"base={server.base}",
            HOOK_API_KEY="s3cr3t-hook-key",
        )
        assert proc.returncode == 0, proc.stderr
        [request] = server.requests
    assert request["path"] == "/hook?key=s3cr3t-hook-key"
    assert request["headers"]["authorization"] == "Bearer s3cr3t-hook-key"
    text = log_files(store)[-1].read_text(encoding="utf-8")
    assert "s3cr3t-hook-key" not in text
    log = json.loads(text)
    assert (
        log["steps"][0]["message"]
        == f"http GET {server.base}/hook?key=[REDACTED] -> 200"
    )
    assert log["outputs"]["step.call.json"] == {"echo": "[REDACTED]"}


def test_secrets_in_error_messages_are_masked(spell_cli, install, store, tmp_path):
    step = json.dumps(
        {
            "method": "GET",
            "url": "http://127.0.0.1:9/?k={{ENV.HOOK_API_KEY}}" "&x={{nothing}}",
        }
    )
    install(make_bundle(tmp_path / "b", "fixtures/hook-bad", {"call": ("http", step)}))
    proc = spell_cli(
        "cast", "fixtures/hook-bad", "--allow-unsigned", HOOK_API_KEY="s3cr3t-hook-key"
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        "unresolved template: http://127.0.0.1:9/?k=[REDACTED]" "&x={{nothing}}\n"
    )
    text = log_files(store)[-1].read_text(encoding="utf-8")
    assert "s3cr3t-hook-key" not in text
    assert json.loads(text)["error"].startswith("unresolved template: ")


# Escaping ###################################################################


def test_manifest_strings_cannot_forge_output_lines(
    spell_cli, install, tmp_path, store
):
    bundle = copy_fixture(
        "hello-host",
        tmp_path / "evil",
        **{
            "effects": [
                {
                    "type": "notify\nexecution_id: forged.json",
                    "target": "x\r\nlog: /etc/passwd\x1b[2J",
                    "mutates": False,
                }
            ],
            "billing.currency": "USD\u2028execution_id: also-forged",
        },
    )
    install(bundle)
    proc = spell_cli("cast", "fixtures/hello-host", "--allow-unsigned", "-p", "name=x")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    assert "\u2028" not in proc.stdout
    id_lines = [
        line for line in proc.stdout.splitlines() if line.startswith("execution_id:")
    ]
    log_lines = [line for line in proc.stdout.splitlines() if line.startswith("log:")]
    assert len(id_lines) == 1 and len(log_lines) == 1
    fields = stdout_fields(proc.stdout)
    assert (store / "logs" / fields["execution_id"]).is_file()
    assert (
        "  - type=notify\\nexecution_id: forged.json, target=x\\r\\nlog: /etc/passwd"
        "\\x1b[2J, mutates=false" in proc.stdout
    )


def test_error_lines_are_escaped(spell_cli, install):
    install(SPELLS / "hello-host")
    proc = spell_cli(
        "cast", "fixtures/hello-host", "--allow-unsigned", "-p", "bad\nexecution_id: x"
    )
    assert proc.stdout == ""
    assert proc.stderr == "invalid -p argument: bad\\nexecution_id: x\n"


# Schema hardening ###########################################################

BACKTRACKING = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^(a+)+$"}},
}


def test_backtracking_pattern_cannot_hang_a_cast(monkeypatch, store, tmp_path):
    monkeypatch.setattr(spell, "SCHEMA_VALIDATION_TIMEOUT_S", 1.0)
    for key in list(os.environ):
        if key.startswith(("SPELL_RUNTIME_", "CONNECTOR_")):
            monkeypatch.delenv(key)
    bundle = make_bundle(
        tmp_path / "b",
        "fixtures/redos",
        {"s": ("shell", "#!/bin/sh\necho ran\n")},
        schema=BACKTRACKING,
    )
    assert (
        spell.main(["install", str(bundle)], stdout=io.StringIO(), stderr=io.StringIO())
        == 0
    )
    out, err = io.StringIO(), io.StringIO()
    began = time.monotonic()
    code = spell.main(
        ["cast", "fixtures/redos", "--allow-unsigned", "-p", "name=" + "a" * 40 + "!"],
        stdout=out,
        stderr=err,
    )
    assert time.monotonic() - began < 10
    assert code == 1 and out.getvalue() == ""
    assert err.getvalue().startswith(
        "input does not match schema: validation took longer " "than 1000ms"
    )
    # The same pattern still validates ordinary input, in the bounded child.
    assert (
        spell.main(
            [
                "cast",
                "fixtures/redos",
                "--allow-unsigned",
                "--dry-run",
                "-p",
                "name=aaa",
            ],
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
        == 0
    )
    out, err = io.StringIO(), io.StringIO()
    spell.main(
        ["cast", "fixtures/redos", "--allow-unsigned", "-p", "name=b"],
        stdout=out,
        stderr=err,
    )
    assert (
        err.getvalue()
        == 'input does not match schema: /name must match pattern "^(a+)+$"\n'
    )


def test_remote_and_file_refs_are_never_fetched(spell_cli, install, tmp_path):
    secret = tmp_path / "local-schema.json"
    secret.write_text('{"type": "string"}')
    with Recorder() as server:
        server.routes["/schema.json"] = (200, {"type": "string"})
        for n, ref in enumerate((server.base + "/schema.json", secret.as_uri())):
            schema = {"type": "object", "properties": {"name": {"$ref": ref}}}
            install(
                make_bundle(
                    tmp_path / f"b{n}",
                    f"fixtures/ref{n}",
                    {"s": ("shell", "#!/bin/sh\necho ran\n")},
                    schema=schema,
                )
            )
            proc = spell_cli(
                "cast", f"fixtures/ref{n}", "--allow-unsigned", "-p", "name=x"
            )
            assert proc.returncode == 1 and proc.stdout == ""
            assert proc.stderr.startswith("schema is invalid: "), proc.stderr
            assert ref in proc.stderr
        assert server.requests == []


def test_local_refs_still_work(spell_cli, install, tmp_path):
    schema = {
        "type": "object",
        "$defs": {"n": {"type": "string", "minLength": 2}},
        "properties": {"name": {"$ref": "#/$defs/n"}},
    }
    install(
        make_bundle(
            tmp_path / "b",
            "fixtures/localref",
            {"s": ("shell", "#!/bin/sh\necho ran\n")},
            schema=schema,
        )
    )
    proc = spell_cli("cast", "fixtures/localref", "--allow-unsigned", "-p", "name=x")
    assert (
        proc.stderr == "input does not match schema: /name must NOT have fewer than 2 "
        "characters\n"
    )
    assert (
        spell_cli(
            "cast", "fixtures/localref", "--allow-unsigned", "-p", "name=xy"
        ).returncode
        == 0
    )
