"""The preflight guards of ``spell cast``: each failure message and its way through.

Order (spec-cast §3): runtime limits, bundle, policy, input and schema,
signature, platform, risk, billing, entitlement, connector tokens. Every guard
fails before the summary, so stdout stays empty. Signatures and licences are
real: keys come from ``spell sign keygen``, bundles from ``spell sign bundle``
and licences from tokens signed with those keys.
"""

from __future__ import annotations

import json
import re

import pytest

from cast_helpers import (
    ALL_PLATFORMS,
    SPELLS,
    claims,
    clean_env,
    copy_fixture,
    entitlement_token,
    keygen,
    latest_log,
    make_bundle,
)


@pytest.fixture
def spell_cli(run_pyz, store):
    """``spell_cli(*args, **extra_env)``: run any spell command with a clean environment."""

    def run(*args, timeout=60, **extra_env):
        return run_pyz(*args, env=clean_env(**extra_env), timeout=timeout)

    return run


@pytest.fixture
def install(spell_cli):
    def run(source) -> None:
        proc = spell_cli("install", source)
        assert proc.returncode == 0, proc.stderr

    return run


def fails(proc, message: str) -> None:
    """The cast failed with exactly ``message``, before printing anything."""
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", message + "\n")


def succeeds(proc) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "execution_id: " in proc.stdout


# Runtime limits #############################################################

LIMITS = {
    "SPELL_RUNTIME_INPUT_MAX_BYTES": "SPELL_RUNTIME_INPUT_MAX_BYTES must be an integer >= 1",
    "SPELL_RUNTIME_STEP_TIMEOUT_MS": "SPELL_RUNTIME_STEP_TIMEOUT_MS must be an integer >= 1",
    "SPELL_RUNTIME_EXECUTION_TIMEOUT_MS": "SPELL_RUNTIME_EXECUTION_TIMEOUT_MS must be an integer >= 0",
}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_invalid_limits_fail_before_anything(spell_cli, name):
    # The spell is not even installed: limits are checked first.
    fails(spell_cli("cast", "nope/x", **{name: "12abc"}), LIMITS[name])


@pytest.mark.parametrize("name", sorted(LIMITS))
@pytest.mark.parametrize(
    "value", ["1.5", "abc", "12abc", "Infinity", "-1", "0x", "1_0", "\u0661\u0662"]
)
def test_limits_refuse_what_javascript_refuses(name, value):
    import spell

    with pytest.raises(spell.SpellError) as caught:
        spell.runtime_limits({name: value})
    assert caught.value.message == LIMITS[name]


@pytest.mark.parametrize(
    "value, number",
    [
        (" 12 ", 12),
        ("+5", 5),
        ("12.0", 12),
        ("1e3", 1000),
        ("0x10", 16),
        ("0b11", 3),
        ("0o7", 7),
        ("\u00a012\n", 12),
    ],
)
def test_limits_read_as_javascript_numbers(value, number):
    import spell

    limits = spell.runtime_limits({name: value for name in LIMITS})
    assert limits == {
        "input_max_bytes": number,
        "step_timeout_ms": number,
        "execution_timeout_ms": number,
    }


def test_limit_defaults_and_zero():
    import spell

    defaults = {
        "input_max_bytes": 65536,
        "step_timeout_ms": 60000,
        "execution_timeout_ms": None,
    }
    assert spell.runtime_limits({}) == defaults
    assert spell.runtime_limits({name: "  " for name in LIMITS}) == defaults
    # 0 disables the execution timeout; it is below the minimum of the others.
    assert spell.runtime_limits({"SPELL_RUNTIME_EXECUTION_TIMEOUT_MS": "0"}) == defaults
    for name in ("SPELL_RUNTIME_INPUT_MAX_BYTES", "SPELL_RUNTIME_STEP_TIMEOUT_MS"):
        with pytest.raises(spell.SpellError):
            spell.runtime_limits({name: "0"})


def test_limits_in_javascript_forms_through_the_cli(spell_cli, install):
    install(SPELLS / "fail")
    env = {name: " 0x10 " for name in LIMITS}
    # Dry run of a spell without input: {} is 2 bytes, under 16.
    succeeds(spell_cli("cast", "fixtures/fail", "--allow-unsigned", "--dry-run", **env))


def test_step_timeout_is_checked_before_the_summary(spell_cli, install):
    install(SPELLS / "hello-host")
    fails(
        spell_cli(
            "cast",
            "fixtures/hello-host",
            "--allow-unsigned",
            "--dry-run",
            "-p",
            "name=x",
            SPELL_RUNTIME_STEP_TIMEOUT_MS="soon",
        ),
        LIMITS["SPELL_RUNTIME_STEP_TIMEOUT_MS"],
    )


# Policy #####################################################################


def write_policy(store, policy) -> None:
    store.mkdir(parents=True, exist_ok=True)
    (store / "policy.json").write_text(
        json.dumps(policy) if not isinstance(policy, str) else policy
    )


@pytest.mark.parametrize(
    "policy, reason",
    [
        ({"version": "v1", "default": "deny"}, "default policy is deny"),
        (
            {"version": "v1", "default": "allow", "publishers": {"deny": ["fixtures"]}},
            "publisher 'fixtures' is denied",
        ),
        (
            {"version": "v1", "default": "allow", "publishers": {"allow": ["other"]}},
            "publisher 'fixtures' is not allowed",
        ),
        (
            {"version": "v1", "default": "allow", "max_risk": "medium"},
            "risk 'high' exceeds max_risk 'medium'",
        ),
        (
            {
                "version": "v1",
                "default": "allow",
                "runtime": {"allow_execution": ["docker"]},
            },
            "runtime execution 'host' is not allowed",
        ),
    ],
)
def test_policy_denies_before_the_signature_check(
    spell_cli, install, store, policy, reason
):
    install(SPELLS / "risk-high")
    write_policy(store, policy)
    # No --allow-unsigned: the policy answers before the signature would.
    fails(spell_cli("cast", "fixtures/risk-high"), f"policy denied: {reason}")
    log = latest_log(store)
    assert log["input"] == {} and "signature" not in log
    assert log["id"] == "fixtures/risk-high" and log["summary"]["risk"] == "high"


def test_policy_that_allows(spell_cli, install, store):
    install(SPELLS / "risk-high")
    write_policy(
        store,
        {"version": "v1", "default": "deny", "publishers": {"allow": ["fixtures"]}},
    )
    fails(
        spell_cli("cast", "fixtures/risk-high", "--allow-unsigned"),
        "policy denied: default policy is deny",
    )
    write_policy(
        store,
        {
            "version": "v1",
            "default": "allow",
            "publishers": {"allow": ["fixtures"]},
            "max_risk": "high",
            "runtime": {"allow_execution": ["host"]},
        },
    )
    succeeds(spell_cli("cast", "fixtures/risk-high", "--allow-unsigned", "--yes"))


def test_invalid_policy(spell_cli, install, store):
    install(SPELLS / "hello-host")
    write_policy(store, "{not json")
    proc = spell_cli("cast", "fixtures/hello-host", "--allow-unsigned", "-p", "name=x")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("invalid policy: ")


# Signature ##################################################################


def test_unsigned_bundle_needs_allow_unsigned(spell_cli, install, store):
    install(SPELLS / "hello-host")
    for flags in ([], ["--require-signature"]):
        fails(
            spell_cli("cast", "fixtures/hello-host", *flags, "-p", "name=x"),
            "signature required: spell.sig.json not found",
        )
        log = latest_log(store)
        assert log["signature"] == {
            "required": True,
            "status": "unsigned",
            "publisher": "fixtures",
        }
        assert log["input"] == {"name": "x"}
    # --allow-unsigned wins over --require-signature.
    succeeds(
        spell_cli(
            "cast",
            "fixtures/hello-host",
            "--require-signature",
            "--allow-unsigned",
            "-p",
            "name=x",
        )
    )
    assert latest_log(store)["signature"]["status"] == "unsigned"


@pytest.fixture
def signed_bundle(spell_cli, run_pyz, tmp_path):
    """The ``signed`` fixture signed with a fresh key of publisher ``signed``."""
    keys = keygen(run_pyz, "signed", tmp_path / "keys")
    bundle = copy_fixture("signed", tmp_path / "signed")
    proc = spell_cli("sign", "bundle", bundle, "--private-key", keys["private_key"])
    assert proc.returncode == 0, proc.stderr
    return bundle, keys


def test_signed_bundle_verifies_after_trust_add(
    spell_cli, install, store, signed_bundle
):
    bundle, keys = signed_bundle
    install(bundle)
    fails(
        spell_cli("cast", "signed/hello"),
        "signature required: no trusted key for publisher: signed",
    )
    proc = spell_cli("trust", "add", "signed", keys["public_key_base64url"])
    assert proc.returncode == 0, proc.stderr
    succeeds(spell_cli("cast", "signed/hello", "--require-signature"))
    signature = latest_log(store)["signature"]
    assert (
        signature["required"],
        signature["status"],
        signature["publisher"],
        signature["key_id"],
    ) == (True, "verified", "signed", "default")
    assert re.fullmatch(r"[0-9a-f]{64}", signature["digest"])


def test_tampered_or_wrongly_trusted_bundle_is_refused(
    spell_cli, install, store, run_pyz, tmp_path, signed_bundle
):
    bundle, keys = signed_bundle
    install(bundle)
    other = keygen(run_pyz, "signed", tmp_path / "other")
    assert (
        spell_cli("trust", "add", "signed", other["public_key_base64url"]).returncode
        == 0
    )
    fails(
        spell_cli("cast", "signed/hello"),
        "signature required: signature verification failed",
    )
    assert latest_log(store)["signature"]["status"] == "invalid"

    assert (
        spell_cli("trust", "add", "signed", keys["public_key_base64url"]).returncode
        == 0
    )
    [installed] = (store / "spells").glob("*/1.0.0")
    step = installed / "steps" / "hello.sh"
    step.chmod(0o755)
    step.write_text("#!/bin/sh\necho tampered\n")
    fails(spell_cli("cast", "signed/hello"), "signature required: digest mismatch")
    # Not required: recorded, not enforced.
    succeeds(spell_cli("cast", "signed/hello", "--allow-unsigned"))
    signature = latest_log(store)["signature"]
    assert (signature["required"], signature["status"]) == (False, "invalid")


# Platform, risk #############################################################


def test_platform_mismatch(spell_cli, install):
    import spell

    install(SPELLS / "platform")
    host = spell.host_platform()
    fails(
        spell_cli("cast", "fixtures/platform", "--allow-unsigned"),
        f"platform mismatch: host={host}, runtime=host, target={host}, "
        f"spell supports=never/platform",
    )


def test_platform_match_by_alias(spell_cli, install, tmp_path):
    import spell

    system, arch = spell.host_platform().split("/")
    alias = {"x64": "amd64", "amd64": "x64"}.get(arch, arch)
    bundle = copy_fixture(
        "platform",
        tmp_path / "p",
        **{"runtime.platforms": ["never/platform", f"{system}/{alias}"]},
    )
    install(bundle)
    succeeds(spell_cli("cast", "fixtures/platform", "--allow-unsigned"))


@pytest.mark.parametrize("risk", ["high", "critical"])
def test_risk_needs_yes(spell_cli, install, tmp_path, store, risk):
    install(copy_fixture("risk-high", tmp_path / "r", risk=risk))
    fails(
        spell_cli("cast", "fixtures/risk-high", "--allow-unsigned"),
        f"risk {risk} requires --yes",
    )
    succeeds(spell_cli("cast", "fixtures/risk-high", "--allow-unsigned", "--yes"))
    assert latest_log(store)["outputs"]["step.confirm.stdout"] == "risk-high ran\n"


def test_medium_risk_needs_no_yes(spell_cli, install, tmp_path):
    install(copy_fixture("risk-high", tmp_path / "r", risk="medium"))
    succeeds(spell_cli("cast", "fixtures/risk-high", "--allow-unsigned"))


# Billing and entitlements ###################################################


@pytest.fixture
def issuer(spell_cli, run_pyz, tmp_path):
    """A trusted licence issuer ``iss1``; returns its keygen fields."""
    keys = keygen(run_pyz, "iss1", tmp_path / "iss-keys", key_id="k1")
    proc = spell_cli(
        "trust", "add", "iss1", keys["public_key_base64url"], "--key-id", "k1"
    )
    assert proc.returncode == 0, proc.stderr
    return keys


def add_licence(spell_cli, name: str, keys: dict, **overrides) -> None:
    token = entitlement_token(keys["private_key"], claims("iss1", "k1", **overrides))
    proc = spell_cli("license", "add", name, token)
    assert proc.returncode == 0, proc.stderr


def test_billing_needs_allow_billing(spell_cli, install, store):
    install(SPELLS / "billing")
    fails(
        spell_cli("cast", "fixtures/billing", "--allow-unsigned"),
        "billing enabled requires --allow-billing",
    )
    fails(
        spell_cli("cast", "fixtures/billing", "--allow-unsigned", "--allow-billing"),
        "billing enabled requires matching entitlement token",
    )
    assert latest_log(store)["summary"]["license"] == {"licensed": False}


def test_billing_with_a_matching_signed_licence(spell_cli, install, store, issuer):
    install(SPELLS / "billing")
    add_licence(spell_cli, "cheap", issuer, mode="upfront", max_amount=10)
    add_licence(spell_cli, "small", issuer, max_amount=9)
    fails(
        spell_cli("cast", "fixtures/billing", "--allow-unsigned", "--allow-billing"),
        "billing enabled requires matching entitlement token",
    )
    # on_success, "usd" against the manifest's "USD", 15 >= 10.
    add_licence(spell_cli, "dev", issuer)
    succeeds(
        spell_cli("cast", "fixtures/billing", "--allow-unsigned", "--allow-billing")
    )
    assert latest_log(store)["summary"]["license"] == {"licensed": True, "name": "dev"}


def test_licence_is_reverified_at_cast_time(spell_cli, install, store, issuer):
    install(SPELLS / "billing")
    add_licence(spell_cli, "dev", issuer)
    succeeds(
        spell_cli("cast", "fixtures/billing", "--allow-unsigned", "--allow-billing")
    )
    assert spell_cli("trust", "remove", "iss1").returncode == 0
    fails(
        spell_cli("cast", "fixtures/billing", "--allow-unsigned", "--allow-billing"),
        "billing enabled requires matching entitlement token",
    )


# Connector tokens ###########################################################


def test_connector_token(spell_cli, install, store):
    install(SPELLS / "permissions")
    fails(
        spell_cli("cast", "fixtures/permissions", "--allow-unsigned"),
        "missing connector token CONNECTOR_GITHUB_TOKEN",
    )
    fails(
        spell_cli(
            "cast",
            "fixtures/permissions",
            "--allow-unsigned",
            CONNECTOR_GITHUB_TOKEN="",
        ),
        "missing connector token CONNECTOR_GITHUB_TOKEN",
    )
    succeeds(
        spell_cli(
            "cast",
            "fixtures/permissions",
            "--allow-unsigned",
            CONNECTOR_GITHUB_TOKEN="gh-token-value",
        )
    )
    log = latest_log(store)
    assert log["steps"][0]["stdout_head"] == "github token: set\n"
    # The output's key names a token, so the whole value is masked (spec-cast §7.4).
    assert log["outputs"]["step.token.stdout"] == "[REDACTED]"


def test_connector_names_are_normalised(spell_cli, install, tmp_path):
    bundle = copy_fixture(
        "permissions",
        tmp_path / "p",
        permissions=[
            {"connector": "git-hub", "scopes": ["a"]},
            {"connector": "straße", "scopes": ["b"]},
        ],
    )
    install(bundle)
    fails(
        spell_cli("cast", "fixtures/permissions", "--allow-unsigned"),
        "missing connector token CONNECTOR_GIT_HUB_TOKEN",
    )
    fails(
        spell_cli(
            "cast",
            "fixtures/permissions",
            "--allow-unsigned",
            CONNECTOR_GIT_HUB_TOKEN="x",
        ),
        "missing connector token CONNECTOR_STRASSE_TOKEN",
    )


# Order ######################################################################


def test_guards_run_in_order(spell_cli, install, tmp_path, issuer):
    guarded = {
        "risk": "critical",
        "permissions": [{"connector": "github", "scopes": ["r"]}],
        "billing": {
            "enabled": True,
            "mode": "on_success",
            "currency": "USD",
            "max_amount": 10,
        },
    }
    install(
        make_bundle(
            tmp_path / "wrong-platform",
            "order/platform",
            {"s": ("shell", "#!/bin/sh\necho ran\n")},
            runtime={"execution": "host", "platforms": ["never/x"]},
            **guarded,
        )
    )
    fails(
        spell_cli("cast", "order/platform", "-p", "a=1"),
        "signature required: spell.sig.json not found",
    )
    proc = spell_cli(
        "cast", "order/platform", "--allow-unsigned", "--yes", "--allow-billing"
    )
    assert proc.stderr.startswith("platform mismatch: ")

    install(
        make_bundle(
            tmp_path / "b",
            "order/all",
            {"s": ("shell", "#!/bin/sh\necho ran\n")},
            **guarded,
        )
    )
    steps = [
        ([], "risk critical requires --yes"),
        (["--yes"], "billing enabled requires --allow-billing"),
        (
            ["--yes", "--allow-billing"],
            "billing enabled requires matching entitlement token",
        ),
    ]
    for flags, message in steps:
        fails(spell_cli("cast", "order/all", "--allow-unsigned", *flags), message)
    add_licence(spell_cli, "dev", issuer)
    fails(
        spell_cli("cast", "order/all", "--allow-unsigned", "--yes", "--allow-billing"),
        "missing connector token CONNECTOR_GITHUB_TOKEN",
    )
    succeeds(
        spell_cli(
            "cast",
            "order/all",
            "--allow-unsigned",
            "--yes",
            "--allow-billing",
            CONNECTOR_GITHUB_TOKEN="t0ken",
        )
    )


def test_summary_lists_effects_permissions_and_billing(spell_cli, install, tmp_path):
    bundle = make_bundle(
        tmp_path / "s",
        "pub/summary",
        {"s": ("shell", "#!/bin/sh\necho ok\n")},
        effects=[
            {"type": "deploy", "target": "prod", "mutates": True},
            {"type": "notify", "target": "slack", "mutates": False},
        ],
        permissions=[{"connector": "github", "scopes": ["repo:read", "repo:write"]}],
        billing={
            "enabled": False,
            "mode": "upfront",
            "currency": "EUR",
            "max_amount": 10.0,
        },
        risk="medium",
        runtime={"execution": "host", "platforms": ALL_PLATFORMS},
    )
    install(bundle)
    proc = spell_cli(
        "cast",
        "pub/summary",
        "--allow-unsigned",
        "--dry-run",
        CONNECTOR_GITHUB_TOKEN="x",
    )
    succeeds(proc)
    assert proc.stdout.split("execution_id:")[0] == (
        "=== Execution Summary ===\n"
        "id@version: pub/summary@1.0.0\n"
        "risk: medium\n"
        "effects:\n"
        "  - type=deploy, target=prod, mutates=true\n"
        "  - type=notify, target=slack, mutates=false\n"
        "permissions:\n"
        "  - connector=github, scopes=repo:read,repo:write\n"
        "billing: enabled=false, mode=upfront, max_amount=10, currency=EUR\n"
        "runtime: execution=host, docker_image=-\n"
    )
