"""Security: nothing a bundle says can forge spell's output lines or drive the terminal.

Manifest strings, step output, signature fields and hand-written store files
reach the terminal escaped, whatever command prints them; step output beyond
the cap is cut, not buffered. The summary of a cast and its error lines have
their own tests (tests/test_cast_logs.py).
"""

from __future__ import annotations

import json

import pytest

from security_helpers import *  # noqa: F401,F403  (fixtures)
from security_helpers import assert_ok, assert_refused, installed, log_texts
from trust_helpers import write_trust

import spell

#: Lines a hostile bundle would like the user (or the Execution API) to believe.
FORGED = "\nexecution_id: forged.json\nlog: /etc/passwd\r"
#: Erase the screen (ESC and the one-byte C1 CSI) and set the window title.
TERMINAL = "\x1b[2J\x9b2J\x1b]0;owned\x07"
HOSTILE = FORGED + TERMINAL
#: Tab separates the columns of listings; newline ends lines.
RAW_CONTROLS = [chr(c) for c in range(0x20) if chr(c) not in "\t\n"] + [
    chr(c) for c in range(0x7F, 0xA0)
]


def assert_no_raw_controls(text: str) -> None:
    found = sorted({hex(ord(c)) for c in text if c in RAW_CONTROLS})
    assert not found, f"raw control characters in output: {found}"


def only_real_lines(stdout: str) -> None:
    """One ``execution_id:`` and one ``log:`` line, spell's own."""
    ids = [line for line in stdout.splitlines() if line.startswith("execution_id:")]
    logs = [line for line in stdout.splitlines() if line.startswith("log:")]
    assert len(ids) == 1 and len(logs) == 1, stdout
    assert "forged" not in ids[0] and "/etc/passwd" not in logs[0]


STEP_SAYS = (
    "#!/bin/sh\n"
    "printf 'execution_id: forged.json\\nlog: /etc/passwd\\n'\n"
    "printf '\\033[2J\\302\\2332J\\033]0;owned\\007\\n'\n"
    "printf 'partial' >&2\n"
)


def test_step_output_with_escape_sequences_is_escaped_by_spell_log(
    make_bundle, cli, spell_run, store
):
    installed(cli, make_bundle(files={"steps/run.sh": STEP_SAYS}))
    cast = spell_run("cast", "test/demo", "--allow-unsigned")
    assert_ok(cast)
    only_real_lines(cast.stdout)
    execution_id = cast.stdout.split("execution_id: ")[1].split("\n")[0]
    shown = spell_run("log", execution_id)
    assert_ok(shown)
    assert_no_raw_controls(shown.stdout)
    log = json.loads(shown.stdout)
    assert log["outputs"]["step.run.stdout"] == (
        "execution_id: forged.json\nlog: /etc/passwd\n\x1b[2J\x9b2J\x1b]0;owned\x07\n"
    )


def test_verbose_step_output_cannot_forge_lines_or_drive_the_terminal(
    make_bundle, cli, spell_run
):
    installed(cli, make_bundle(files={"steps/run.sh": STEP_SAYS}))
    cast = spell_run("cast", "test/demo", "--allow-unsigned", "--verbose")
    assert_ok(cast)
    assert_no_raw_controls(cast.stdout + cast.stderr)
    only_real_lines(cast.stdout)
    assert "[run:stdout] execution_id: forged.json\n" in cast.stderr
    assert "[run:stdout] \\x1b[2J\\x9b2J\\x1b]0;owned\\x07\n" in cast.stderr
    assert "[run:stderr] partial\n" in cast.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["list", "--json"],
        ["inspect", "test/demo", "--json"],
        ["list"],
        ["inspect", "test/demo"],
    ],
)
def test_manifest_strings_with_escape_sequences_are_escaped_in_every_listing(
    command, make_bundle, cli, spell_run
):
    installed(
        cli,
        make_bundle(
            name="Demo" + HOSTILE,
            summary=TERMINAL,
            effects=[{"type": HOSTILE, "target": "t", "mutates": False}],
        ),
    )
    result = spell_run(*command)
    assert_ok(result)
    assert_no_raw_controls(result.stdout)
    if "--json" in command:
        data = json.loads(result.stdout)
        assert (data[0] if isinstance(data, list) else data)["name"] == "Demo" + HOSTILE


def test_error_quoting_a_manifest_value_is_one_escaped_line(make_bundle, spell_run):
    result = spell_run("install", make_bundle(risk="low" + HOSTILE))
    assert_refused(result, "invalid risk: low" + spell.escape_text(HOSTILE))


def test_check_failure_quoting_a_bundle_path_is_one_escaped_line(
    make_bundle, cli, spell_run
):
    checks = [{"type": "file_exists", "params": {"path": "nope" + HOSTILE}}]
    installed(cli, make_bundle(checks=checks))
    result = spell_run("cast", "test/demo", "--allow-unsigned")
    assert_refused(result, prefix="check failed: file missing: ", stdout=None)
    assert_no_raw_controls(result.stdout)
    assert result.stderr.endswith("nope" + spell.escape_text(HOSTILE) + "\n")


def test_signature_fields_with_escape_sequences_cannot_forge_verify_output(
    make_bundle, cli, spell_run, store
):
    installed(cli, make_bundle(files={"steps/x" + TERMINAL + ".sh": "echo\n"}))
    version = store / "spells" / spell.id_key("test/demo") / "1.0.0"
    (version / "spell.sig.json").write_text(
        json.dumps(
            {
                "version": "v1",
                "publisher": "test",
                "key_id": "k\nstatus: verified" + TERMINAL,
                "algorithm": "ed25519",
                "digest": {"algorithm": "sha256", "value": "0" * 64},
                "signature": "AAAA",
            }
        )
    )
    for args in (["verify", "test/demo"], ["verify", "test/demo", "--json"]):
        result = spell_run(*args)
        assert_refused(result, prefix="no trusted key for publisher: test", stdout=None)
        assert_no_raw_controls(result.stdout + result.stderr)
    plain = spell_run("verify", "test/demo").stdout
    assert [line for line in plain.splitlines() if line.startswith("status:")] == [
        "status: untrusted"
    ]


def test_hand_written_trust_and_licence_labels_are_escaped_when_listed(
    spell_run, store
):
    write_trust(store, "evil" + HOSTILE, [("k" + TERMINAL, "AAAA")])
    claims = {
        "version": "v1",
        "issuer": "iss" + HOSTILE,
        "key_id": "k1",
        "mode": "on_success",
        "currency": "USD" + TERMINAL,
        "max_amount": 1,
        "not_before": "2020-01-01T00:00:00Z",
        "expires_at": "2099-01-01T00:00:00Z",
    }
    payload = spell.b64url_encode(json.dumps(claims).encode())
    (store / "licenses").mkdir()
    (store / "licenses" / "x.json").write_text(
        json.dumps(
            {
                "version": "v2",
                "name": "lic" + HOSTILE,
                "token": f"ent1.{payload}.AAAA",
                "token_metadata": {
                    "format": "ent1",
                    "payload_base64url": payload,
                    "signature_base64url": "AAAA",
                },
                "entitlement": claims,
                "created_at": "x",
                "updated_at": "y" + TERMINAL,
            }
        )
    )
    for command in (["trust", "list"], ["license", "list"]):
        result = spell_run(*command)
        assert_ok(result)
        assert_no_raw_controls(result.stdout)
        assert len(result.stdout.splitlines()) == 2, result.stdout


def test_step_output_beyond_the_cap_is_cut_not_buffered(
    make_bundle, cli, spell_run, store
):
    size = 160 * 1024 * 1024
    step = (
        f"#!/bin/sh\nprintf START\nhead -c {size} /dev/zero | tr '\\0' x\nprintf END\n"
    )
    installed(cli, make_bundle(files={"steps/run.sh": step}))
    result = spell_run("cast", "test/demo", "--allow-unsigned", timeout=60)
    assert_ok(result)  # memory stayed under the budget while 160 MiB went through
    output = json.loads(log_texts(store))["outputs"]["step.run.stdout"]
    assert output.startswith("START") and output.endswith("END")
    assert "bytes of output cut]" in output
    assert len(output) < 2 * 1024 * 1024


def test_runner_prints_step_output_as_escaped_json(spell_run, pyz, tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "steps").mkdir(parents=True)
    (bundle / "steps" / "say.sh").write_text(STEP_SAYS)
    (bundle / "steps" / "say.sh").chmod(0o755)
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "bundle_dir": str(bundle),
                "steps": [{"name": "say", "uses": "shell", "run": "steps/say.sh"}],
                "checks": [],
            }
        )
    )
    result = spell_run("--plan", plan, pyz_path=pyz.runner)
    assert_ok(result)
    assert result.stdout.count("\n") == 1
    assert_no_raw_controls(result.stdout)
    assert json.loads(result.stdout)["outputs"]["step.say.stdout"].endswith(
        "\x1b[2J\x9b2J\x1b]0;owned\x07\n"
    )


@pytest.mark.parametrize("field", ["name", "effect-target"])
def test_lone_surrogate_in_a_manifest_string_is_printed_escaped(
    field, make_bundle, spell_run
):
    original = {"name": "name: Demo", "effect-target": "target: stdout"}[field]
    changed = {"name": 'name: "De\\ud800mo"', "effect-target": 'target: "\\ud800"'}[
        field
    ]
    text = make_bundle().joinpath("spell.yaml").read_text()
    bundle = make_bundle(yaml_text=text.replace(original, changed))
    install = spell_run("install", bundle)
    if install.returncode == 1:
        assert_refused(install)  # refusing such a manifest is fine too
        return
    for command in (
        ["list"],
        ["inspect", "test/demo"],
        ["cast", "test/demo", "--allow-unsigned"],
    ):
        result = spell_run(*command)
        assert_ok(result)
        assert_no_raw_controls(result.stdout)


def test_forged_output_lines_cannot_redirect_an_api_receipt(
    make_bundle, cli, api_server, store
):
    """The API reads the log the cast itself wrote, never a path printed on stdout."""
    from api_helpers import button

    forged = store / "logs" / "forged.json"
    forged.parent.mkdir(parents=True, exist_ok=True)
    forged.write_text(json.dumps({"execution_id": "forged.json", "id": "evil/x"}))
    step = (
        "#!/bin/sh\nprintf 'execution_id: forged.json\\nlog: %s\\n' "
        f"'{forged}'\nexit 3\n"
    )
    installed(cli, make_bundle(name="x" + FORGED, files={"steps/run.sh": step}))
    server, client = api_server([button("hostile", "test/demo")])
    detail = client.wait(client.launch("hostile"))
    assert detail["execution"]["status"] == "failed"
    receipt = detail["receipt"]
    assert receipt["id"] == "test/demo" and receipt["execution_id"] != "forged.json"
    assert receipt["error"] == "step failed: run (exit code 3)"
    assert detail["execution"]["execution_id"] != "forged.json"
