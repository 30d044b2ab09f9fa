"""Security: only sound Ed25519 keys and signatures unlock anything.

Signatures are checked before a step runs, licences are verified again at
every cast against the trust store as it is then, and keys that would let
anyone sign (points of small order) are refused wherever a key is read.
"""

from __future__ import annotations

import json

import pytest

from security_helpers import *  # noqa: F401,F403  (fixtures)
from security_helpers import assert_ok, assert_refused, installed
from trust_helpers import make_token, new_key, public_b64, sign_by_hand, write_trust

import spell

#: SubjectPublicKeyInfo DER prefix of an Ed25519 key (RFC 8410).
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
#: The identity point, a key of order 1: (R = identity, S = 0) signs everything.
IDENTITY = bytes([1]) + bytes(31)
FORGED_SIGNATURE = spell.b64url_encode(IDENTITY + bytes(32))
#: The group order L of Ed25519 (RFC 8032, section 5.1).
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
WEAK_KEYS = {
    "identity": IDENTITY,
    "zero": bytes(32),  # order 4
    "minus-one": bytes.fromhex("ec" + "ff" * 30 + "7f"),  # order 2
    "non-canonical": bytes.fromhex("ee" + "ff" * 30 + "7f"),  # y = p + 1
}
BILLING = {"enabled": True, "mode": "on_success", "currency": "USD", "max_amount": 10}
STEP_MARKS = '#!/bin/sh\ntouch "$MARK"\necho ran\n'


def spki(raw: bytes) -> str:
    return spell.b64url_encode(SPKI_PREFIX + raw)


@pytest.mark.parametrize("name", sorted(WEAK_KEYS))
def test_small_order_public_key_is_refused_by_trust_add(name, spell_run, store):
    result = spell_run("trust", "add", "acme", spki(WEAK_KEYS[name]))
    assert_refused(
        result, "invalid public key: weak Ed25519 key (a point of small " "order)"
    )
    assert not (store / "trust").exists() or not any((store / "trust").rglob("*.json"))


def test_forged_signature_under_a_small_order_trusted_key_runs_nothing(
    make_bundle, cli, spell_run, store, tmp_path
):
    bundle = make_bundle(files={"steps/run.sh": STEP_MARKS})
    digest = spell.bundle_digest(str(bundle)).hex()
    (bundle / "spell.sig.json").write_text(
        json.dumps(
            {
                "version": "v1",
                "publisher": "test",
                "key_id": "default",
                "algorithm": "ed25519",
                "digest": {"algorithm": "sha256", "value": digest},
                "signature": FORGED_SIGNATURE,
            }
        )
    )
    installed(cli, bundle)
    write_trust(store, "test", [("default", spki(IDENTITY))])  # written by hand
    message = "invalid trusted public key: weak Ed25519 key (a point of small order)"
    verify = spell_run("verify", "test/demo")
    assert_refused(verify, message, stdout=None)
    assert verify.stdout.startswith("status: untrusted\n")
    mark = tmp_path / "ran"
    cast = spell_run("cast", "test/demo", env={"MARK": str(mark)})
    assert_refused(cast, f"signature required: {message}")
    assert not mark.exists()


def test_licence_forged_under_a_small_order_issuer_key_unlocks_nothing(
    make_bundle, cli, spell_run, store
):
    installed(cli, make_bundle(billing=BILLING))
    write_trust(store, "entitlement-dev", [("k1", spki(IDENTITY))])
    claims = {
        "version": "v1",
        "issuer": "entitlement-dev",
        "key_id": "k1",
        "mode": "on_success",
        "currency": "USD",
        "max_amount": 25,
        "not_before": "2020-01-01T00:00:00Z",
        "expires_at": "2099-01-01T00:00:00Z",
    }
    payload = spell.b64url_encode(json.dumps(claims).encode())
    token = f"ent1.{payload}.{FORGED_SIGNATURE}"
    added = spell_run("license", "add", "forged", token)
    assert_refused(
        added,
        "invalid trusted public key: weak Ed25519 key (a point of " "small order)",
    )
    # The same licence written into the store by hand.
    (store / "licenses").mkdir(parents=True, exist_ok=True)
    (store / "licenses" / (spell.id_key("forged") + ".json")).write_text(
        json.dumps(
            {
                "version": "v2",
                "name": "forged",
                "token": token,
                "token_metadata": {
                    "format": "ent1",
                    "payload_base64url": payload,
                    "signature_base64url": FORGED_SIGNATURE,
                },
                "entitlement": claims,
                "created_at": "2026-01-01T00:00:00.000Z",
                "updated_at": "2026-01-01T00:00:00.000Z",
            }
        )
    )
    cast = spell_run("cast", "test/demo", "--allow-unsigned", "--allow-billing")
    assert_refused(cast, "billing enabled requires matching entitlement token")


def test_signature_with_a_non_canonical_scalar_does_not_verify(
    make_bundle, cli, spell_run, store
):
    key = new_key()
    bundle = make_bundle()
    record = sign_by_hand(bundle, key, publisher="test")
    raw = spell.b64url_decode(record["signature"])
    scalar = int.from_bytes(raw[32:], "little") + GROUP_ORDER  # same value mod L
    record["signature"] = spell.b64url_encode(raw[:32] + scalar.to_bytes(32, "little"))
    (bundle / "spell.sig.json").write_text(json.dumps(record))
    installed(cli, bundle)
    assert cli("trust", "add", "test", public_b64(key))[0] == 0
    result = spell_run("verify", "test/demo")
    assert_refused(result, "signature verification failed", stdout=None)
    assert result.stdout.startswith("status: invalid\n")


def test_step_that_rewrites_its_installed_files_cannot_run_unsigned_code_later(
    make_bundle, cli, spell_run, tmp_path
):
    """Steps run inside the installed bundle (cwd); the digest catches a rewrite."""
    mark = tmp_path / "second-run"
    step = (
        "#!/bin/sh\n"
        f"printf '#!/bin/sh\\ntouch %s\\n' '{mark}' > steps/next.sh\n"
        "chmod +x steps/next.sh && mv steps/next.sh steps/run.sh\n"
        "echo rewritten\n"
    )
    key = new_key()
    bundle = make_bundle(files={"steps/run.sh": step})
    sign_by_hand(bundle, key, publisher="test")
    installed(cli, bundle)
    assert cli("trust", "add", "test", public_b64(key))[0] == 0
    assert_ok(spell_run("cast", "test/demo"))
    again = spell_run("cast", "test/demo")
    assert_refused(again, "signature required: digest mismatch")
    assert not mark.exists()


@pytest.fixture
def licensed(make_bundle, cli, store):
    """A billing bundle and a valid licence from a trusted issuer: the issuer's key."""
    key = new_key()
    assert (
        cli("trust", "add", "entitlement-dev", public_b64(key), "--key-id", "k1")[0]
        == 0
    )
    installed(cli, make_bundle(billing=BILLING))
    assert cli("license", "add", "dev", make_token(key))[0] == 0
    return key


def test_licence_stops_unlocking_once_its_issuer_key_is_replaced(
    licensed, cli, spell_run
):
    assert_ok(spell_run("cast", "test/demo", "--allow-unsigned", "--allow-billing"))
    code, _, err = cli(
        "trust", "add", "entitlement-dev", public_b64(new_key()), "--key-id", "k1"
    )
    assert code == 0, err
    cast = spell_run("cast", "test/demo", "--allow-unsigned", "--allow-billing")
    assert_refused(cast, "billing enabled requires matching entitlement token")


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_amount", 1_000_000),
        ("mode", "upfront"),
        ("expires_at", "2999-01-01T00:00:00Z"),
    ],
)
def test_licence_record_with_edited_claims_unlocks_nothing(
    field, value, licensed, make_bundle, cli, spell_run, store
):
    """Stored claims must equal the signed token's: editing them voids the licence."""
    path = store / "licenses" / (spell.id_key("dev") + ".json")
    small = make_token(
        licensed,
        max_amount=5,
        mode="upfront" if field != "mode" else "on_success",
        expires_at="2099-01-01T00:00:00Z",
    )
    assert cli("license", "add", "dev", small)[0] == 0
    record = json.loads(path.read_text())
    record["entitlement"][field] = value
    if field != "mode":
        record["entitlement"]["mode"] = "on_success"
    path.write_text(json.dumps(record))
    cast = spell_run("cast", "test/demo", "--allow-unsigned", "--allow-billing")
    assert_refused(cast, "billing enabled requires matching entitlement token")
