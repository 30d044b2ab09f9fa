"""Security: names from bundles and arguments never lead spell outside its folders.

Ids, versions, key ids, licence names, execution ids and publisher names are
all hostile here: ``..``, ``/``, absolute paths, odd Unicode, names too long
for a file. Each test checks the outcome (works as documented, or one line and
exit 1) and that nothing appeared or changed outside the store.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from security_helpers import *  # noqa: F401,F403  (fixtures)
from security_helpers import assert_ok, assert_refused, assert_sane, installed
from trust_helpers import make_token, new_key, public_b64

import spell

TRAVERSAL_IDS = ["../../../../outside/pwned", "/tmp/spell-security-{uuid}/x"]


@pytest.mark.parametrize("spell_id", TRAVERSAL_IDS)
def test_manifest_id_made_of_path_parts_stays_one_folder_of_the_store(
    spell_id, make_bundle, spell_run, store, outside
):
    spell_id = spell_id.format(uuid=uuid.uuid4().hex)
    result = spell_run("install", make_bundle(id=spell_id))
    assert_ok(result)
    assert result.stdout == f"{spell_id}@1.0.0\n"
    assert sorted(os.listdir(store / "spells")) == [spell.id_key(spell_id)]

    for command in (["inspect", spell_id], ["verify", spell_id]):
        assert_sane(spell_run(*command))
    cast = spell_run("cast", spell_id, "--allow-unsigned")
    assert_ok(cast)
    execution_id = cast.stdout.split("execution_id: ")[1].split("\n")[0]
    assert "/" not in execution_id
    assert (store / "logs" / execution_id).is_file()
    shown = spell_run("log", execution_id)
    assert_ok(shown)
    assert json.loads(shown.stdout)["id"] == spell_id

    assert outside.changes() == {}
    assert not os.path.exists(spell_id) and not os.path.exists(
        os.path.dirname(spell_id)
    )


@pytest.mark.parametrize("command", ["inspect", "cast", "verify"])
def test_version_flag_with_path_parts_cannot_select_a_folder_outside_the_store(
    command, make_bundle, cli, spell_run, store, outside
):
    installed(cli, make_bundle())
    installed(cli, make_bundle(id="other/spell"))
    other = spell.id_key("other/spell")
    for version in (f"../{other}/1.0.0", "../../../outside", "/etc", ".", ".."):
        result = spell_run(
            command,
            "test/demo",
            "--version",
            version,
            "--allow-unsigned" if command == "cast" else "--json",
        )
        assert_refused(result, f"version not installed for test/demo: {version}")
    assert outside.changes() == {}


@pytest.mark.parametrize("command", ["inspect", "cast", "verify"])
def test_id_argument_with_path_parts_finds_nothing_outside_the_store(
    command, make_bundle, cli, spell_run, tmp_path, outside
):
    installed(cli, make_bundle())
    # A complete bundle where a naive join of the id would land.
    decoy = make_bundle(dirname="decoy")
    for spell_id in (str(decoy), "../../../bundles/decoy", "../" * 8 + "etc"):
        result = spell_run(
            command, spell_id, *(["--allow-unsigned"] if command == "cast" else [])
        )
        assert_refused(result, f"spell not installed: {spell_id}")
    assert outside.changes() == {}


@pytest.mark.parametrize("field", ["id", "version"])
def test_lone_surrogate_in_manifest_id_or_version_is_refused_with_one_line(
    field, make_bundle, spell_run, store
):
    text = make_bundle().joinpath("spell.yaml").read_text()
    value = {"id": "test/\\ud800x", "version": "1.\\ud800"}[field]
    original = {"id": "id: test/demo", "version": "version: 1.0.0"}[field]
    bundle = make_bundle(yaml_text=text.replace(original, f'{field}: "{value}"'))
    result = spell_run("install", bundle)
    assert_refused(result)
    assert not (store / "spells").exists() or not os.listdir(store / "spells")


def test_version_starting_with_a_dot_is_not_installed_out_of_sight(
    make_bundle, spell_run, store
):
    """Listings skip hidden folders: such a version could never be found again."""
    result = spell_run("install", make_bundle(version=".hidden"))
    assert_refused(result, "version must not start with '.': .hidden")
    assert not (store / "spells").exists() or not os.listdir(store / "spells")


def test_version_named_like_the_id_file_is_refused_clearly(
    make_bundle, spell_run, store
):
    result = spell_run("install", make_bundle(version="spell.id.txt"))
    assert_refused(result)
    assert not result.stderr.startswith("EISDIR"), result.stderr
    assert "/tmp/" not in result.stderr


def test_id_too_long_for_a_file_name_is_refused_not_truncated(
    make_bundle, spell_run, store, outside
):
    # 100 characters, 300 bytes of UTF-8: its encoded folder name is 400 bytes.
    spell_id = "p/" + "\u20ac" * 98
    result = spell_run("install", make_bundle(id=spell_id))
    assert_refused(result, "id or version is too long to store")
    assert not (store / "spells").exists() or not os.listdir(store / "spells")
    assert_refused(spell_run("inspect", spell_id), f"spell not installed: {spell_id}")
    assert outside.changes() == {}


def test_keygen_labels_with_path_parts_write_only_inside_the_out_dir(
    spell_run, tmp_path, outside
):
    keys = tmp_path / "keys"
    result = spell_run(
        "sign",
        "keygen",
        "../../outside/pwned",
        "--key-id",
        "../../x",
        "--out-dir",
        keys,
    )
    assert_ok(result)
    assert sorted(os.listdir(keys)) == [
        ".._.._outside_pwned__.._.._x.private.pem",
        ".._.._outside_pwned__.._.._x.public.b64url.txt",
    ]
    assert outside.changes() == {}


def test_sign_bundle_never_writes_through_a_symlinked_signature_file(
    make_bundle, spell_run, tmp_path, outside
):
    keys = tmp_path / "keys"
    assert_ok(spell_run("sign", "keygen", "test", "--out-dir", keys))
    bundle = make_bundle()
    target = outside.root / "sentinel.txt"
    os.symlink(target, bundle / "spell.sig.json")
    outside.__init__(tmp_path, outside.store)  # the link is part of the baseline
    result = spell_run(
        "sign", "bundle", bundle, "--private-key", keys / "test__default.private.pem"
    )
    assert_ok(result)
    assert not (bundle / "spell.sig.json").is_symlink()
    assert json.loads((bundle / "spell.sig.json").read_text())["publisher"] == "test"
    assert target.read_text() == "untouched\n"
    assert outside.changes() == {}


def test_trusted_publisher_with_path_parts_stays_in_the_trust_folder(
    spell_run, store, outside
):
    publisher = "../../../outside/sentinel.txt"
    key = public_b64(new_key())
    assert_ok(spell_run("trust", "add", publisher, key, "--key-id", "../k"))
    files = os.listdir(store / "trust" / "publishers")
    assert files == [spell.id_key(publisher) + ".json"]
    listing = spell_run("trust", "list")
    assert listing.stdout == f"publisher\tkey_ids\n{publisher}\t../k\n"
    assert_ok(spell_run("trust", "remove", publisher))
    assert os.listdir(store / "trust" / "publishers") == []
    assert_refused(
        spell_run("trust", "remove", "../../../outside/sentinel.txt"),
        "trusted publisher not found: ../../../outside/sentinel.txt",
    )
    assert outside.changes() == {}


def test_licence_name_with_path_parts_stays_in_the_licence_folder(
    spell_run, cli, store, outside
):
    key = new_key()
    assert (
        cli("trust", "add", "entitlement-dev", public_b64(key), "--key-id", "k1")[0]
        == 0
    )
    name = "../../../outside/sentinel.txt"
    assert_ok(spell_run("license", "add", name, make_token(key)))
    assert os.listdir(store / "licenses") == [spell.id_key(name) + ".json"]
    assert_ok(spell_run("license", "remove", name))
    assert os.listdir(store / "licenses") == []
    for hostile in (name, "/etc/passwd", "../policy"):
        assert_refused(
            spell_run("license", "remove", hostile), f"license not found: {hostile}"
        )
    long_name = "\u20ac" * 100
    result = spell_run("license", "add", long_name, make_token(key))
    assert_refused(result, prefix="license name is too long")
    assert outside.changes() == {}
