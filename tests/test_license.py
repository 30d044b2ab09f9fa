"""Entitlement tokens, `spell license add|list|remove` and the billing match."""

from __future__ import annotations

import datetime
import json
import os
import stat

import pytest

import spell
from trust_helpers import (
    VECTOR_PUBLIC,
    VECTOR_TOKEN,
    home,
    make_token,
    new_key,
    run,
    trust,
    vector_key,
    write_trust,
)

assert home  # a fixture, used by name

NOW = datetime.datetime(2026, 2, 18, 10, 30, tzinfo=datetime.timezone.utc)
BILLING = {"enabled": True, "mode": "on_success", "currency": "usd", "max_amount": 15}


def b64json(value) -> str:
    return spell.b64url_encode(json.dumps(value).encode())


# Tokens ######################################################################


def test_vector_token_parses_and_verifies(home):
    parsed = spell.parse_entitlement_token(f"  {VECTOR_TOKEN}\n")
    assert parsed["token"] == VECTOR_TOKEN
    assert parsed["claims"] == {
        "version": "v1",
        "issuer": "iss1",
        "key_id": "k1",
        "mode": "on_success",
        "currency": "USD",
        "max_amount": 25,
        "not_before": "2020-01-01T00:00:00Z",
        "expires_at": "2099-01-01T00:00:00Z",
    }
    assert parsed["metadata"]["format"] == "ent1"
    assert parsed["metadata"]["payload_base64url"] == VECTOR_TOKEN.split(".")[1]
    write_trust(home, "iss1", [("k1", VECTOR_PUBLIC)])
    assert spell.verify_entitlement_token(VECTOR_TOKEN, NOW) == parsed
    assert spell.verify_entitlement_token(VECTOR_TOKEN, NOW.timestamp()) == parsed


FORMAT = (
    "invalid entitlement token format; expected "
    "ent1.<payloadBase64url>.<signatureBase64url>"
)
SEGMENTS = (
    "invalid entitlement token format; payload and signature segments are required"
)
PAYLOAD = "invalid entitlement payload: "
GOOD = {
    "version": "v1",
    "issuer": "i",
    "key_id": "k",
    "mode": "upfront",
    "currency": "USD",
    "max_amount": 1,
    "not_before": "2020-01-01T00:00:00Z",
    "expires_at": "2030-01-01T00:00:00Z",
}


def claims(**changes):
    body = dict(GOOD, **changes)
    return {k: v for k, v in body.items() if v is not ...}


@pytest.mark.parametrize(
    "token,message",
    [
        ("   ", "entitlement token must be non-empty"),
        ("ent1.a", FORMAT),
        ("ent2.a.b", FORMAT),
        ("ent1.a.b.c", FORMAT),
        ("ent1..b", SEGMENTS),
        ("ent1.a.", SEGMENTS),
        ("ent1.a+b.c", "invalid entitlement payload segment: must be base64url"),
        ("ent1.ab.c=", "invalid entitlement signature segment: must be base64url"),
        ("ent1.bm90IGpzb24.c", "invalid entitlement payload JSON: "),
        ("ent1." + b64json(None)[:-2] + ".c", "invalid entitlement payload JSON: "),
        (
            "ent1." + spell.b64url_encode(b'{"a": NaN}') + ".c",
            "invalid entitlement payload JSON: ",
        ),
        (
            "ent1." + spell.b64url_encode(b"\xff\xfe") + ".c",
            "invalid entitlement payload JSON: ",
        ),
        ("ent1." + b64json([1]) + ".c", PAYLOAD + "expected JSON object"),
        (
            "ent1." + "A" * spell.ENTITLEMENT_TOKEN_MAX_CHARS + ".c",
            "entitlement token is longer",
        ),
    ],
)
def test_token_format_errors(token, message):
    with pytest.raises(spell.EntitlementError) as exc:
        spell.parse_entitlement_token(token)
    assert exc.value.message.startswith(message)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"version": ...}, "missing 'version' string"),
        ({"version": "v2"}, "unsupported version 'v2'"),
        ({"issuer": " "}, "missing 'issuer' string"),
        ({"key_id": 1}, "missing 'key_id' string"),
        ({"mode": ...}, "missing 'mode' string"),
        ({"mode": "none"}, "unsupported mode 'none'"),
        ({"currency": ""}, "missing 'currency' string"),
        ({"max_amount": "5"}, "missing 'max_amount' number"),
        ({"max_amount": None}, "missing 'max_amount' number"),
        ({"max_amount": True}, "missing 'max_amount' number"),
        ({"max_amount": -1}, "max_amount must be a non-negative finite number"),
        ({"max_amount": 1e400}, "max_amount must be a non-negative finite number"),
        ({"max_amount": 10**400}, "max_amount must be a non-negative finite number"),
        ({"not_before": ...}, "missing 'not_before' string"),
        ({"not_before": "bad", "expires_at": ...}, "missing 'expires_at' string"),
        ({"not_before": "2020-01-01"}, "'not_before' must be an ISO-8601 timestamp"),
        (
            {"not_before": "2020-01-01t00:00:00Z"},
            "'not_before' must be an ISO-8601 timestamp",
        ),
        (
            {"not_before": "2020-01-01T00:00Z"},
            "'not_before' must be an ISO-8601 timestamp",
        ),
        (
            {"not_before": "2020-01-01T00:00:00+0100"},
            "'not_before' must be an ISO-8601 timestamp",
        ),
        (
            {"not_before": "2020-13-01T00:00:00Z"},
            "'not_before' is not a valid timestamp",
        ),
        (
            {"not_before": "2020-01-32T00:00:00Z"},
            "'not_before' is not a valid timestamp",
        ),
        (
            {"not_before": "2020-01-01T25:00:00Z"},
            "'not_before' is not a valid timestamp",
        ),
        (
            {"not_before": "2020-01-01T24:00:01Z"},
            "'not_before' is not a valid timestamp",
        ),
        (
            {"expires_at": "2020-01-01T00:60:00Z"},
            "'expires_at' is not a valid timestamp",
        ),
        (
            {"expires_at": "20200-01-01T00:00:00Z"},
            "'expires_at' must be an ISO-8601 timestamp",
        ),
        (
            {"expires_at": "2019-12-31T23:59:59.999Z"},
            "not_before must be <= expires_at",
        ),
    ],
)
def test_claim_errors(changes, message):
    body = claims(**changes)
    if changes.get("max_amount") == 1e400:
        payload = spell.b64url_encode(
            json.dumps(body).replace("Infinity", "1e400").encode()
        )
    else:
        payload = b64json(body)
    with pytest.raises(spell.EntitlementError) as exc:
        spell.parse_entitlement_token(f"ent1.{payload}.sig")
    assert exc.value.message == PAYLOAD + message


def test_timestamps_follow_date_parse_leniency():
    ms = spell.timestamp_ms
    assert ms("2026-02-30T00:00:00Z") == ms("2026-03-02T00:00:00Z")
    assert ms("2026-01-01T24:00:00.000Z") == ms("2026-01-02T00:00:00Z")
    assert ms("1970-01-01T00:00:00.123999Z") == 123
    assert ms("1970-01-01T01:00:00+01:00") == 0
    assert ms("1969-12-31T19:00:00-05:00") == 0
    assert ms("2000-02-29T00:00:00Z") == 951782400000
    assert ms("0000-01-01T00:00:00Z") == -62167219200000
    assert ms("2026-00-10T00:00:00Z") is None
    assert ms("２０２６-01-01T00:00:00Z") is None


@pytest.fixture
def issuer(home):
    """A trusted issuer key: `entitlement-dev`, key id k1."""
    key = new_key()
    trust("entitlement-dev", key, "k1")
    return key


def test_verification_errors(home, issuer):
    good = make_token(issuer)
    assert (
        spell.verify_entitlement_token(good, NOW)["claims"]["issuer"]
        == "entitlement-dev"
    )

    def error(token, now=NOW):
        with pytest.raises(spell.SpellError) as exc:
            spell.verify_entitlement_token(token, now)
        return exc.value.message

    assert error(make_token(issuer, issuer="issuer-a")) == (
        "entitlement issuer is not trusted: issuer-a"
    )
    assert error(make_token(issuer, key_id="k9")) == (
        "entitlement key_id is not trusted for issuer 'entitlement-dev': k9"
    )
    assert error(make_token(new_key())) == "entitlement signature verification failed"
    payload, signature = good.split(".")[1:]
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert (
        error(f"ent1.{payload}.{flipped}")
        == "entitlement signature verification failed"
    )
    assert error(f"ent1.{payload}.AAAA") == "entitlement signature verification failed"
    other = b64json(claims(issuer="entitlement-dev", key_id="k1"))
    assert (
        error(f"ent1.{other}.{signature}")
        == "entitlement signature verification failed"
    )
    window = make_token(
        issuer,
        not_before="2026-02-18T10:30:00.001Z",
        expires_at="2026-02-18T10:30:00.000+00:00",
    )
    assert error(window).endswith("not_before must be <= expires_at")
    future = make_token(issuer, not_before="2026-02-18T10:30:00.001Z")
    assert error(future) == (
        "entitlement token not valid yet (not_before=2026-02-18T10:30:00.001Z)"
    )
    expired = make_token(issuer, expires_at="2026-02-18T11:29:59+01:00")
    assert (
        error(expired)
        == "entitlement token expired (expires_at=2026-02-18T11:29:59+01:00)"
    )
    edge = make_token(
        issuer,
        not_before="2026-02-18T10:30:00Z",
        expires_at="2026-02-18T11:30:00+01:00",
    )
    assert spell.verify_entitlement_token(edge, NOW)
    assert error(make_token(issuer, max_amount=-2)).startswith(PAYLOAD)


def test_verification_with_unusable_trusted_keys(home):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    der = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    write_trust(home, "entitlement-dev", [("k1", spell.b64url_encode(der))])
    with pytest.raises(spell.SpellError) as exc:
        spell.verify_entitlement_token(make_token(new_key()), NOW)
    assert (
        exc.value.message
        == "invalid trusted public key: expected an Ed25519 key, got EC"
    )
    write_trust(home, "entitlement-dev", [("k1", "a/b")])
    with pytest.raises(
        spell.SpellError, match="^trust key public_key must be base64url$"
    ):
        spell.verify_entitlement_token(make_token(new_key()), NOW)


# spell license ###############################################################


def test_license_flow(home, issuer):
    token = make_token(issuer)
    code, out, err = run("license", "add", " dev ", f" {token} ")
    assert (code, out, err) == (0, "added license=dev\n", "")
    path = home / "licenses" / (spell.id_key("dev") + ".json")
    record = json.loads(path.read_text())
    assert list(record) == [
        "version",
        "name",
        "token",
        "token_metadata",
        "entitlement",
        "created_at",
        "updated_at",
    ]
    assert record["version"] == "v2" and record["token"] == token
    assert record["token_metadata"] == {
        "format": "ent1",
        "payload_base64url": token.split(".")[1],
        "signature_base64url": token.split(".")[2],
    }
    assert record["entitlement"]["max_amount"] == 25
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    code, out, _ = run("license", "list")
    lines = out.splitlines()
    assert (
        lines[0] == "name\tissuer\tmode\tcurrency\tmax_amount\texpires_at\tupdated_at"
    )
    assert lines[1].startswith(
        "dev\tentitlement-dev\ton_success\tUSD\t25\t2099-01-01T00:00:00Z\t"
    )
    assert token not in out and token.split(".")[2] not in out

    assert run("license", "remove", " dev") == (0, "removed license=dev\n", "")
    assert run("license", "list") == (0, "No licenses\n", "")
    assert run("license", "remove", " dev") == (1, "", "license not found:  dev\n")


def test_license_update_keeps_created_at(home, issuer):
    run("license", "add", "dev", make_token(issuer))
    path = home / "licenses" / (spell.id_key("dev") + ".json")
    record = json.loads(path.read_text())
    record["created_at"] = "2001-01-01T00:00:00.000Z"
    path.write_text(json.dumps(record))
    assert run("license", "add", "dev", make_token(issuer, max_amount=50))[0] == 0
    record = json.loads(path.read_text())
    assert record["created_at"] == "2001-01-01T00:00:00.000Z"
    assert record["entitlement"]["max_amount"] == 50
    assert record["updated_at"] != record["created_at"]


def test_license_add_refuses_bad_input_and_writes_nothing(home, issuer):
    assert run("license", "add", " ", "x") == (
        1,
        "",
        "license name must be non-empty\n",
    )
    assert run("license", "add", "a", " ") == (
        1,
        "",
        "license token must be non-empty\n",
    )
    code, _, err = run("license", "add", "a", "garbage")
    assert (code, err) == (1, FORMAT + "\n")
    code, _, err = run("license", "add", "a", make_token(new_key()))
    assert (code, err) == (1, "entitlement signature verification failed\n")
    code, _, err = run(
        "license", "add", "a", make_token(issuer, expires_at="2021-01-01T00:00:00Z")
    )
    assert (code, err) == (
        1,
        "entitlement token expired (expires_at=2021-01-01T00:00:00Z)\n",
    )
    code, _, err = run("license", "add", "x" * 200, make_token(issuer))
    assert code == 1 and "too long" in err
    assert not (home / "licenses").exists()


def test_license_remove_cannot_escape(home):
    code, _, err = run("license", "remove", "../../etc/passwd")
    assert (code, err) == (1, "license not found: ../../etc/passwd\n")
    assert run("license", "remove", "y" * 400)[0] == 1


STRICT = [
    ("nope", "failed to parse license file: {path}"),
    ("[]", "license file must be a JSON object: {path}"),
    ('{"version": "v3"}', "unsupported license file version: v3"),
    ('{"version": "v1"}', "missing 'name' string"),
    (
        '{"version": "v1", "name": "other"}',
        "license file name mismatch: expected 'dev', got 'other'",
    ),
    ('{"version": "v1", "name": "dev"}', "missing 'token' string"),
    ('{"version": "v1", "name": "dev", "token": "t"}', "missing 'created_at' string"),
    (
        '{"version": "v1", "name": "dev", "token": "t", "created_at": "c"}',
        "missing 'updated_at' string",
    ),
]


@pytest.mark.parametrize("content,message", STRICT)
def test_license_add_stops_on_a_broken_existing_record(home, issuer, content, message):
    path = home / "licenses" / (spell.id_key("dev") + ".json")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    code, out, err = run("license", "add", "dev", make_token(issuer))
    assert (code, out, err) == (1, "", message.format(path=path) + "\n")
    assert path.read_text() == content


def v2_record(source_token, **changes):
    """A licence record for ``source_token``, with fields replaced by ``changes``."""
    token = source_token
    parsed = spell.parse_entitlement_token(token)
    record = {
        "version": "v2",
        "name": "dev",
        "token": token,
        "token_metadata": parsed["metadata"],
        "entitlement": parsed["claims"],
        "created_at": "2026-01-01T00:00:00.000Z",
        "updated_at": "2026-01-01T00:00:00.000Z",
    }
    record.update(changes)
    return record


def test_v2_record_checks(home, issuer):
    token = make_token(issuer)
    other = make_token(issuer, max_amount=99)
    meta = spell.parse_entitlement_token(token)["metadata"]
    cases = [
        ({"token_metadata": None}, "license token_metadata must be an object: {path}"),
        (
            {"token_metadata": dict(meta, format="ent2")},
            "license token_metadata.format must be 'ent1'",
        ),
        (
            {"token_metadata": dict(meta, payload_base64url="a=")},
            "license token_metadata.payload_base64url must be base64url",
        ),
        (
            {"token_metadata": dict(meta, signature_base64url=5)},
            "license token_metadata.signature_base64url must be base64url",
        ),
        ({"entitlement": {"version": "v1"}}, PAYLOAD + "missing 'issuer' string"),
        ({"token": "ent1.x"}, "invalid stored entitlement token: " + FORMAT),
        (
            {"token": other},
            "stored entitlement token metadata does not match token segments",
        ),
        (
            {
                "entitlement": dict(
                    spell.parse_entitlement_token(token)["claims"], max_amount=99
                )
            },
            "stored entitlement claims do not match token payload claims",
        ),
    ]
    path = home / "licenses" / (spell.id_key("dev") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    for changes, message in cases:
        path.write_text(json.dumps(v2_record(token, **changes)))
        with pytest.raises(spell.SpellError) as exc:
            spell._load_license(str(path), "dev", strict=True)
        assert exc.value.message == message.format(path=path)
        assert spell.list_licenses() == []
    path.write_text(json.dumps(v2_record(token)))
    assert (
        spell._load_license(str(path), "dev", strict=True)["entitlement"]["max_amount"]
        == 25
    )


def test_license_list_is_lenient(home, issuer):
    run("license", "add", "beta", make_token(issuer, currency="EUR", max_amount=10.5))
    folder = home / "licenses"
    (folder / "legacy.json").write_text(
        json.dumps({"version": "v1", "name": "Alpha", "token": "old"})
    )
    (folder / "bad.json").write_text("{")
    (folder / "notes.txt").write_text("x")
    os.mkfifo(folder / "fifo.json")
    (folder / "big.json").write_text(" " * (spell.JSON_FILE_MAX_BYTES + 1))
    code, out, err = run("license", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "Alpha\t-\t-\t-\t-\t-\t-"
    assert lines[2].startswith("beta\tentitlement-dev\ton_success\tEUR\t10.5\t")
    assert len(lines) == 3


# Billing match ###############################################################


def test_find_matching_license(home, issuer):
    assert spell.find_matching_license(BILLING, NOW) is None
    run(
        "license",
        "add",
        "a-upfront",
        make_token(issuer, mode="upfront", max_amount=100),
    )
    run("license", "add", "b-small", make_token(issuer, max_amount=10))
    run("license", "add", "c-eur", make_token(issuer, currency="EUR", max_amount=100))
    assert spell.find_matching_license(BILLING, NOW) is None
    run("license", "add", "dev", make_token(issuer, currency=" usd ", max_amount=15))
    run("license", "add", "zz", make_token(issuer, max_amount=100))
    assert spell.find_matching_license(BILLING, NOW) == "dev"
    assert spell.find_matching_license(dict(BILLING, max_amount=16), NOW) == "zz"
    assert spell.find_matching_license(dict(BILLING, mode="none"), NOW) is None
    later = datetime.datetime(2099, 1, 1, 0, 0, 0, 1000, tzinfo=datetime.timezone.utc)
    assert spell.find_matching_license(BILLING, later) is None
    edge = datetime.datetime(2099, 1, 1, tzinfo=datetime.timezone.utc)
    assert spell.find_matching_license(BILLING, edge) == "dev"
    assert spell.find_matching_license(BILLING, datetime.datetime(2019, 1, 1)) is None


def test_hand_written_licence_does_not_match(home, issuer):
    forged = make_token(new_key(), max_amount=1000)
    path = home / "licenses" / (spell.id_key("forged") + ".json")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(v2_record(forged, name="forged")))
    assert [r["name"] for r in spell.list_licenses()] == ["forged"]
    assert spell.find_matching_license(BILLING, NOW) is None


def test_licence_of_a_removed_issuer_does_not_match(home, issuer):
    run("license", "add", "dev", make_token(issuer))
    assert spell.find_matching_license(BILLING, NOW) == "dev"
    trust("entitlement-dev", new_key(), "k1")
    assert spell.find_matching_license(BILLING, NOW) is None
    trust("entitlement-dev", issuer, "k1")
    assert spell.find_matching_license(BILLING, NOW) == "dev"
    assert run("trust", "remove", "entitlement-dev")[0] == 0
    assert spell.find_matching_license(BILLING, NOW) is None
    write_trust(home, "entitlement-dev", [("k1", "a+b")])
    assert spell.find_matching_license(BILLING, NOW) is None


def test_vector_token_as_a_licence(home):
    write_trust(home, "iss1", [("k1", VECTOR_PUBLIC)])
    assert run("license", "add", "vec", VECTOR_TOKEN)[0] == 0
    assert (
        spell.find_matching_license(
            {"mode": "on_success", "currency": "USD", "max_amount": 25}, NOW
        )
        == "vec"
    )
    assert vector_key()


def test_cast_only_unlocks_billing_with_a_verified_licence(home, issuer, fixtures_dir):
    assert run("install", str(fixtures_dir / "billing"))[0] == 0
    cast = (
        "cast",
        "fixtures/billing",
        "--allow-unsigned",
        "--allow-billing",
        "--dry-run",
    )
    code, out, err = run(*cast)
    assert (code, err) == (1, "billing enabled requires matching entitlement token\n")

    run("license", "add", "dev", make_token(issuer, currency="usd", max_amount=15))
    code, out, err = run(*cast)
    assert code == 0, err
    log_path = [line[5:] for line in out.splitlines() if line.startswith("log: ")][0]
    with open(log_path) as handle:
        log = json.load(handle)
    assert log["summary"]["license"] == {"licensed": True, "name": "dev"}

    assert run("trust", "remove", "entitlement-dev")[0] == 0
    code, _, err = run(*cast)
    assert (code, err) == (1, "billing enabled requires matching entitlement token\n")

    trust("entitlement-dev", issuer, "k1")
    path = home / "licenses" / (spell.id_key("dev") + ".json")
    path.write_text(json.dumps(v2_record(make_token(new_key()))))
    code, _, err = run(*cast)
    assert (code, err) == (1, "billing enabled requires matching entitlement token\n")
