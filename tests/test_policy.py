"""The runtime policy: loading, validation, evaluation and `spell policy`."""

from __future__ import annotations

import json
import os

import pytest

import spell
from trust_helpers import home, run

assert home  # a fixture, used by name

FULL = {
    "version": "v1",
    "default": "allow",
    "publishers": {"allow": ["samples"], "deny": ["blocked"]},
    "max_risk": "high",
    "runtime": {"allow_execution": ["host", "docker"]},
}


def write_policy(store, value) -> str:
    """Write ``value`` as JSON to ``<store>/policy.json``; return the path."""
    store.mkdir(parents=True, exist_ok=True)
    path = store / "policy.json"
    path.write_text(json.dumps(value))
    return str(path)


def test_missing_policy_allows_everything(home):
    assert spell.load_policy() is None
    assert spell.evaluate_policy(None, "anyone", "critical", "docker") is None
    assert not home.exists()


def test_full_policy_round_trips(home):
    write_policy(home, FULL)
    assert spell.load_policy() == FULL


def test_lists_are_trimmed(home):
    write_policy(
        home,
        {
            "version": " v1 ",
            "default": "allow",
            "publishers": {"deny": [" x "]},
            "runtime": {},
        },
    )
    assert spell.load_policy() == {
        "version": "v1",
        "default": "allow",
        "publishers": {"deny": ["x"]},
        "runtime": {},
    }


def policy(**changes):
    body = {"version": "v1", "default": "allow"}
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "value,reason",
    [
        (policy(), None),
        (policy(publishers={"deny": ["pub"]}), "publisher 'pub' is denied"),
        (
            policy(publishers={"allow": ["pub"], "deny": ["pub"]}),
            "publisher 'pub' is denied",
        ),
        (policy(publishers={"allow": ["other"]}), "publisher 'pub' is not allowed"),
        (policy(publishers={"allow": []}), "publisher 'pub' is not allowed"),
        (policy(publishers={"allow": ["pub"]}), None),
        (policy(publishers={}), None),
        (policy(max_risk="low"), "risk 'medium' exceeds max_risk 'low'"),
        (policy(max_risk="medium"), None),
        (
            policy(runtime={"allow_execution": ["docker"]}),
            "runtime execution 'host' is not allowed",
        ),
        (
            policy(runtime={"allow_execution": []}),
            "runtime execution 'host' is not allowed",
        ),
        (policy(runtime={"allow_execution": ["host"]}), None),
        (policy(default="deny"), "default policy is deny"),
        (
            policy(default="deny", publishers={"allow": ["x"]}, max_risk="low"),
            "publisher 'pub' is not allowed",
        ),
        (
            policy(max_risk="low", runtime={"allow_execution": []}),
            "risk 'medium' exceeds max_risk 'low'",
        ),
        (
            policy(runtime={"allow_execution": []}, default="deny"),
            "runtime execution 'host' is not allowed",
        ),
    ],
)
def test_evaluation(value, reason):
    assert (
        spell.evaluate_policy(spell.validate_policy(value), "pub", "medium", "host")
        == reason
    )


def test_risk_ranks():
    value = spell.validate_policy(policy(max_risk="high"))
    assert spell.evaluate_policy(value, "p", "high", "host") is None
    assert spell.evaluate_policy(value, "p", "critical", "host") == (
        "risk 'critical' exceeds max_risk 'high'"
    )
    assert spell.evaluate_policy(value, "p", "unheard-of", "host") is not None


@pytest.mark.parametrize(
    "value,message",
    [
        ([], "policy must be a JSON object"),
        ("x", "policy must be a JSON object"),
        (None, "policy must be a JSON object"),
        ({"unexpected": 1}, "policy contains unknown key 'unexpected'"),
        ({"version": 2, "unexpected": 1}, "policy contains unknown key 'unexpected'"),
        ({}, "missing 'version' string"),
        ({"version": " "}, "missing 'version' string"),
        ({"version": "v2"}, "unsupported version: v2"),
        ({"version": "v1"}, "missing 'default' string"),
        ({"version": "v1", "default": True}, "missing 'default' string"),
        (
            {"version": "v1", "default": "maybe"},
            "default must be 'allow' or 'deny', got 'maybe'",
        ),
        (policy(publishers=None), "publishers must be an object"),
        (policy(publishers=[]), "publishers must be an object"),
        (policy(publishers={"other": []}), "publishers contains unknown key 'other'"),
        (
            policy(publishers={"allow": "x"}),
            "publishers.allow must be an array of strings",
        ),
        (
            policy(publishers={"deny": None}),
            "publishers.deny must be an array of strings",
        ),
        (
            policy(publishers={"allow": ["a", " "]}),
            "publishers.allow[1] must be a non-empty string",
        ),
        (
            policy(publishers={"deny": [3]}),
            "publishers.deny[0] must be a non-empty string",
        ),
        (
            policy(max_risk=None),
            "max_risk must be one of low|medium|high|critical, got 'null'",
        ),
        (
            policy(max_risk=5),
            "max_risk must be one of low|medium|high|critical, got '5'",
        ),
        (
            policy(max_risk=5.0),
            "max_risk must be one of low|medium|high|critical, got '5'",
        ),
        (
            policy(max_risk="HIGH"),
            "max_risk must be one of low|medium|high|critical, got 'HIGH'",
        ),
        (
            policy(max_risk=[1, None, "a"]),
            "max_risk must be one of low|medium|high|critical, got '1,,a'",
        ),
        (
            policy(max_risk={}),
            "max_risk must be one of low|medium|high|critical, got '[object Object]'",
        ),
        (
            policy(max_risk=False),
            "max_risk must be one of low|medium|high|critical, got 'false'",
        ),
        (policy(runtime=None), "runtime must be an object"),
        (policy(runtime="host"), "runtime must be an object"),
        (policy(runtime={"allow": []}), "runtime contains unknown key 'allow'"),
        (
            policy(runtime={"allow_execution": "host"}),
            "runtime.allow_execution must be an array of strings",
        ),
        (
            policy(runtime={"allow_execution": ["host", ""]}),
            "runtime.allow_execution[1] must be a non-empty string",
        ),
        (
            policy(runtime={"allow_execution": ["vm", ""]}),
            "runtime.allow_execution[1] must be a non-empty string",
        ),
        (
            policy(runtime={"allow_execution": ["host", "vm"]}),
            "runtime.allow_execution[1] must be 'host' or 'docker'",
        ),
    ],
)
def test_invalid_policies(home, value, message):
    with pytest.raises(spell.PolicyError) as exc:
        spell.validate_policy(value)
    assert exc.value.message == "invalid policy: " + message
    path = write_policy(home, value)
    with pytest.raises(spell.PolicyError) as exc:
        spell.load_policy()
    assert exc.value.message == "invalid policy: " + message
    assert run("policy", "validate", "--file", path) == (
        1,
        "",
        f"invalid policy: {message}\n",
    )
    assert run("policy", "show") == (1, "", f"invalid policy: {message}\n")


@pytest.mark.parametrize(
    "text", ["", "{", '{"version": "v1",}', '{"version": NaN}', "[Infinity]", "\xff"]
)
def test_unparsable_policy(home, text):
    path = home / "policy.json"
    home.mkdir()
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(spell.PolicyError) as exc:
        spell.load_policy()
    assert exc.value.message.startswith("invalid policy: failed to parse JSON: ")


def test_policy_file_must_be_a_small_regular_file(home):
    home.mkdir()
    path = home / "policy.json"
    os.mkfifo(path)
    with pytest.raises(spell.PolicyError) as exc:
        spell.load_policy()
    assert (
        exc.value.message
        == f"invalid policy: failed to read {path}: not a regular file"
    )
    os.unlink(path)
    path.mkdir()
    with pytest.raises(spell.PolicyError, match="not a regular file"):
        spell.load_policy()
    path.rmdir()
    path.write_text(" " * (spell.JSON_FILE_MAX_BYTES + 1))
    with pytest.raises(spell.PolicyError, match="larger than"):
        spell.load_policy()
    os.unlink(path)


def test_policy_symlinks(home):
    home.mkdir()
    path = home / "policy.json"
    path.symlink_to(home / "managed.json")
    with pytest.raises(spell.PolicyError) as exc:
        spell.load_policy()
    assert exc.value.message.startswith(
        f"invalid policy: failed to read {path}: ENOENT"
    )
    (home / "managed.json").write_text(json.dumps({"version": "v1", "default": "deny"}))
    assert spell.load_policy() == {"version": "v1", "default": "deny"}


def test_check_policy_raises_policy_denied(home):
    write_policy(home, {"version": "v1", "default": "deny"})
    manifest = {"id": "pub/x", "risk": "low", "runtime": {"execution": "host"}}
    with pytest.raises(spell.PolicyDenied) as exc:
        spell.check_policy(manifest)
    assert exc.value.message == "policy denied: default policy is deny"
    write_policy(home, {"version": "v1", "default": "allow"})
    spell.check_policy(manifest)


def test_policy_show(home):
    code, out, _ = run("policy", "show")
    assert code == 0 and out.startswith("No policy: ")
    write_policy(home, dict(FULL, publishers={"allow": [" samples "]}))
    code, out, err = run("policy", "show")
    assert code == 0, err
    assert json.loads(out) == dict(FULL, publishers={"allow": ["samples"]})


def test_policy_validate(home, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(FULL))
    assert run("policy", "validate", "--file", str(path)) == (
        0,
        f"policy ok: {path}\n",
        "",
    )
    code, _, err = run("policy", "validate", "--file", "missing.json")
    assert code == 1 and err.startswith(
        "invalid policy: failed to read missing.json: ENOENT"
    )
    assert run("policy", "validate", "--file", "/dev/zero") == (
        1,
        "",
        "invalid policy: failed to read /dev/zero: not a regular file\n",
    )
    assert not (tmp_path / "home" / ".spell").exists()
