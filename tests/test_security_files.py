"""Security: every file spell reads is a regular file, read with a size cap.

A FIFO would block a reader forever, ``/dev/zero`` and ``/dev/urandom`` never
end, and a 1 GiB sparse file costs no disk but a gigabyte of memory to read
whole. Each is planted where spell reads a file, at each entry point, and
must be refused at once (a few seconds at most, memory under the budget).
spell.yaml at install has its own tests (tests/test_manifest.py).
"""

from __future__ import annotations

import json
import os

import pytest

from security_helpers import *  # noqa: F401,F403  (fixtures)
from security_helpers import assert_ok, assert_refused, installed, sparse_file
from trust_helpers import make_token, new_key, pem_of, public_b64, sign_by_hand

import spell

#: Seconds a refusal may take, Python's start-up included.
PROMPT = 5.0


def plant(path, kind: str, tmp_path) -> None:
    """Replace ``path`` by a hostile file of ``kind``."""
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "sparse":
        sparse_file(path)
    elif kind in ("zero", "urandom"):
        os.symlink(f"/dev/{kind}", path)
    elif kind == "folder":
        os.mkdir(path)
    else:
        raise ValueError(kind)


#: A symlink to /dev/zero stands for every symlink, a folder for every other
#: non-regular file.
KINDS = ["fifo", "sparse", "zero", "folder"]


def version_dir(store, spell_id="test/demo"):
    return store / "spells" / spell.id_key(spell_id) / "1.0.0"


@pytest.mark.parametrize(
    "source", ["fifo", "/dev/zero", "/dev/urandom", "sparse", "folder", "link"]
)
def test_input_file_that_never_ends_or_is_huge_is_refused_at_once(
    source, make_bundle, cli, spell_run, tmp_path
):
    installed(cli, make_bundle())
    path = tmp_path / "input.json"
    if source.startswith("/dev/"):
        path = source
    elif source == "link":
        (tmp_path / "real.json").write_text("{}")
        os.symlink(tmp_path / "real.json", path)
    else:
        plant(path, source, tmp_path)
    result = spell_run(
        "cast", "test/demo", "--allow-unsigned", "--input", path, timeout=PROMPT
    )
    message = {
        "sparse": f"--input file is larger than 1048576 bytes: {path}",
        "link": f"--input file must not be a symlink: {path}",
    }.get(source, f"--input file is not a regular file: {path}")
    assert_refused(result, message)


@pytest.mark.parametrize("kind", KINDS)
def test_installed_schema_replaced_by_a_special_or_huge_file_is_refused(
    kind, make_bundle, cli, spell_run, store, tmp_path
):
    """A step runs inside its installed bundle and may rewrite it for the next run."""
    installed(cli, make_bundle())
    schema = version_dir(store) / "schema.json"
    plant(schema, kind, tmp_path)
    shown = f"{version_dir(store)}/./schema.json"
    message = {
        "sparse": f"schema.json is larger than 1048576 bytes: {shown}",
        "zero": f"schema.json must not be a symlink: {shown}",
    }.get(kind, f"schema.json is not a regular file: {shown}")
    for command in (
        ["cast", "test/demo", "--allow-unsigned"],
        ["inspect", "test/demo"],
    ):
        assert_refused(spell_run(*command, timeout=PROMPT), message)


@pytest.mark.parametrize("kind", ["fifo", "sparse", "zero"])
def test_installed_http_step_file_that_never_ends_or_is_huge_fails_the_step(
    kind, make_bundle, cli, spell_run, store, tmp_path
):
    manifest = make_bundle.manifest()
    manifest["steps"] = [{"uses": "http", "name": "call", "run": "steps/call.json"}]
    installed(
        cli,
        make_bundle(
            manifest,
            files={
                "steps/call.json": '{"method": "GET", "url": "http://127.0.0.1:9/"}'
            },
        ),
    )
    step = version_dir(store) / "steps" / "call.json"
    plant(step, kind, tmp_path)
    result = spell_run("cast", "test/demo", "--allow-unsigned", timeout=PROMPT)
    expected = {
        "fifo": f"http step 'call' file is not a regular file: {step}",
        "sparse": f"http step 'call' file exceeds 1048576 bytes: {step}",
        "zero": f"failed to read http step 'call': Too many levels of symbolic "
        f"links: {step}",
    }[kind]
    assert_refused(result, expected, stdout=None)
    assert result.stdout.startswith("=== Execution Summary ===")


@pytest.mark.parametrize("kind", KINDS)
def test_signature_file_that_never_ends_or_is_huge_makes_the_bundle_invalid(
    kind, make_bundle, cli, spell_run, store, tmp_path
):
    installed(cli, make_bundle())
    plant(version_dir(store) / "spell.sig.json", kind, tmp_path)
    detail = {
        "fifo": "not a regular file",
        "folder": "not a regular file",
        "sparse": "larger than 1048576 bytes",
        "zero": "symlinks are not allowed",
    }[kind]
    verify = spell_run("verify", "test/demo", timeout=PROMPT)
    assert_refused(verify, f"failed to read spell.sig.json: {detail}", stdout=None)
    assert verify.stdout.startswith("status: invalid\n")
    cast = spell_run("cast", "test/demo", timeout=PROMPT)
    assert_refused(cast, f"signature required: failed to read spell.sig.json: {detail}")


@pytest.mark.parametrize("kind", ["fifo", "sparse"])
def test_trust_file_that_never_ends_or_is_huge_is_an_error_not_a_hang(
    kind, make_bundle, spell_run, store, tmp_path
):
    """verify and cast read it strictly, trust add keeps it, list skips it."""
    key = new_key()
    bundle = make_bundle()
    sign_by_hand(bundle, key, publisher="test")
    assert_ok(spell_run("install", bundle))
    assert_ok(spell_run("trust", "add", "test", public_b64(key)))
    path = store / "trust" / "publishers" / (spell.id_key("test") + ".json")
    plant(path, kind, tmp_path)
    detail = {
        "fifo": "not a regular file",
        "sparse": "larger than 1048576 bytes",
        "zero": "symlinks are not allowed",
    }[kind]
    message = f"failed to read trust file {path}: {detail}"
    assert_refused(
        spell_run("verify", "test/demo", timeout=PROMPT), message, stdout=None
    )
    assert_refused(
        spell_run("cast", "test/demo", timeout=PROMPT), f"signature required: {message}"
    )
    assert_refused(
        spell_run("trust", "add", "test", public_b64(key), timeout=PROMPT), message
    )
    listing = spell_run("trust", "list", timeout=PROMPT)
    assert_ok(listing)
    assert listing.stdout == "No trusted publishers\n"


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_licence_file_that_never_ends_or_is_huge_unlocks_nothing_and_hangs_nothing(
    kind, make_bundle, cli, spell_run, store, tmp_path
):
    key = new_key()
    assert (
        cli("trust", "add", "entitlement-dev", public_b64(key), "--key-id", "k1")[0]
        == 0
    )
    billing = {
        "enabled": True,
        "mode": "on_success",
        "currency": "USD",
        "max_amount": 5,
    }
    installed(cli, make_bundle(billing=billing))
    assert cli("license", "add", "dev", make_token(key))[0] == 0
    path = store / "licenses" / (spell.id_key("dev") + ".json")
    plant(path, kind, tmp_path)
    cast = spell_run(
        "cast", "test/demo", "--allow-unsigned", "--allow-billing", timeout=PROMPT
    )
    assert_refused(cast, "billing enabled requires matching entitlement token")
    listing = spell_run("license", "list", timeout=PROMPT)
    assert_ok(listing)
    assert listing.stdout == "No licenses\n"
    detail = {
        "fifo": "not a regular file",
        "sparse": "larger than 1048576 bytes",
        "zero": "symlinks are not allowed",
    }[kind]
    added = spell_run("license", "add", "dev", make_token(key), timeout=PROMPT)
    assert_refused(added, f"failed to read license file {path}: {detail}")


@pytest.mark.parametrize("kind", ["fifo", "sparse", "urandom"])
def test_policy_file_that_never_ends_or_is_huge_stops_every_cast(
    kind, make_bundle, cli, spell_run, store, tmp_path
):
    installed(cli, make_bundle())
    plant(store / "policy.json", kind, tmp_path)
    detail = "larger than 1048576 bytes" if kind == "sparse" else "not a regular file"
    message = f"invalid policy: failed to read {store / 'policy.json'}: {detail}"
    assert_refused(
        spell_run("cast", "test/demo", "--allow-unsigned", timeout=PROMPT), message
    )
    assert_refused(spell_run("policy", "show", timeout=PROMPT), message)
    elsewhere = tmp_path / "candidate.json"
    plant(elsewhere, "fifo" if kind == "urandom" else kind, tmp_path)
    assert_refused(
        spell_run("policy", "validate", "--file", elsewhere, timeout=PROMPT),
        prefix=f"invalid policy: failed to read {elsewhere}: ",
    )


@pytest.mark.parametrize("kind", ["fifo", "sparse", "urandom", "folder"])
def test_private_key_file_that_never_ends_or_is_huge_is_refused(
    kind, make_bundle, spell_run, tmp_path
):
    bundle = make_bundle()
    key = tmp_path / "key.pem"
    plant(key, kind, tmp_path)
    detail = {"sparse": "larger than 65536 bytes"}.get(kind, "not a regular file")
    result = spell_run("sign", "bundle", bundle, "--private-key", key, timeout=PROMPT)
    assert_refused(result, f"failed to read private key file {key}: {detail}")
    assert not (bundle / "spell.sig.json").exists()


def test_private_key_may_be_a_symlink_to_a_regular_key_file(
    make_bundle, spell_run, tmp_path
):
    """User-given, like policy.json: a key store may link keys in (docs/security.md)."""
    real = tmp_path / "real.pem"
    real.write_bytes(pem_of(new_key()))
    os.symlink(real, tmp_path / "link.pem")
    assert_ok(
        spell_run(
            "sign", "bundle", make_bundle(), "--private-key", tmp_path / "link.pem"
        )
    )


@pytest.mark.parametrize("kind", ["fifo", "sparse"])
def test_log_file_that_never_ends_or_is_huge_is_not_read(
    kind, spell_run, store, tmp_path
):
    (store / "logs").mkdir(parents=True)
    name = "20260101T000000000Z_test_demo_1.0.0_abcd.json"
    if kind == "sparse":
        sparse_file(store / "logs" / name, 128 * 1024 * 1024)
    else:
        plant(store / "logs" / name, kind, tmp_path)
    assert_refused(spell_run("log", name, timeout=PROMPT), f"log not found: {name}")


@pytest.mark.parametrize("kind", ["fifo", "sparse"])
def test_installed_id_file_that_never_ends_or_is_huge_counts_as_missing(
    kind, make_bundle, cli, spell_run, store, tmp_path
):
    installed(cli, make_bundle())
    path = store / "spells" / spell.id_key("test/demo") / "spell.id.txt"
    plant(path, kind, tmp_path)
    for command in (
        ["cast", "test/demo", "--allow-unsigned"],
        ["inspect", "test/demo"],
    ):
        result = spell_run(*command, timeout=PROMPT)
        assert_refused(result, prefix="spell.id.txt ")
        assert str(path) in result.stderr
    # A listing skips the broken entry with a warning instead of failing whole.
    result = spell_run("list", timeout=PROMPT)
    assert result.returncode == 0 and result.stdout == "No spells installed\n"
    assert result.stderr.startswith("warning: skipping ") and str(path) in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "sparse", "folder"])
def test_runner_plan_that_never_ends_or_is_huge_is_refused(
    kind, spell_run, pyz, tmp_path
):
    plan = tmp_path / "plan.json"
    if kind == "/dev/zero":
        plan = kind
    elif kind == "sparse":
        sparse_file(plan)
    else:
        plant(plan, kind, tmp_path)
    result = spell_run("--plan", plan, pyz_path=pyz.runner, timeout=PROMPT)
    expected = (
        f"spell-runner: plan exceeds {64 * 1024 * 1024} bytes: {plan}"
        if kind == "sparse"
        else f"spell-runner: plan is not a regular file: {plan}"
    )
    assert_refused(result, expected)


def test_runner_plan_that_is_a_symlink_is_refused(spell_run, pyz, tmp_path):
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"bundle_dir": str(tmp_path)}))
    os.symlink(real, tmp_path / "plan.json")
    result = spell_run("--plan", tmp_path / "plan.json", pyz_path=pyz.runner)
    assert_refused(
        result,
        "spell-runner: cannot read plan: Too many levels of symbolic "
        f"links: {tmp_path / 'plan.json'}",
    )
