"""Shared helpers for the signature, trust, licence and policy tests."""

from __future__ import annotations

import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

import spell  # noqa: E402

#: The PKCS#8 key, its public key and the hello-host vectors of the original.
VECTOR_PEM = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEIOdbvpybHYsxmtmDlmytOtE2bBG3MVtuQ5T1KZQBS1Uo\n"
    b"-----END PRIVATE KEY-----\n"
)
VECTOR_PUBLIC = "MCowBQYDK2VwAyEAT-ShWx9zsTsJ1bQlDN2dyne9WvgTkEsUBl_bnn4PFfM"
HELLO_HOST_DIGEST = "c9c08ec3f9ac2dd33d054913541fa756424691d4dfe964e988f81ef6108ae86a"
HELLO_HOST_SIGNATURE = (
    "36n1gS5jopkSaugWs_CvqXD0dZz04dS6mpq-MPf0YuZN"
    "ZC-WgpbwEuqxqjIJMtWcfvWNIx2OXhVxoPj9ukQ-Dw"
)
VECTOR_TOKEN = (
    "ent1.eyJ2ZXJzaW9uIjoidjEiLCJpc3N1ZXIiOiJpc3MxIiwia2V5X2lkIjoiazEiLCJtb2Rl"
    "Ijoib25fc3VjY2VzcyIsImN1cnJlbmN5IjoiVVNEIiwibWF4X2Ftb3VudCI6MjUsIm5vdF9i"
    "ZWZvcmUiOiIyMDIwLTAxLTAxVDAwOjAwOjAwWiIsImV4cGlyZXNfYXQiOiIyMDk5LTAxLTAx"
    "VDAwOjAwOjAwWiJ9.H1EYAwEdQGsfE_bn9P2m_FiOhJqebNZsfAnGJPt9if7qIp4jFtzZCfu3"
    "96DLGeDFYwHy3CShCI3fn9stPQOjDQ"
)

MANIFEST_TEMPLATE = """\
id: {id}
version: "{version}"
name: Test Spell
summary: a spell for tests
inputs_schema: schema.json
risk: {risk}
permissions: []
effects:
  - type: notify
    target: stdout
    mutates: false
billing:
  enabled: false
  mode: none
  currency: USD
  max_amount: 0
runtime:
  execution: host
  platforms: [linux/x64, linux/arm64, darwin/arm64]
steps:
  - uses: shell
    name: main
    run: steps/main.sh
checks:
  - type: exit_code
"""


@pytest.fixture
def home(store, monkeypatch, tmp_path):
    """The conftest ``store`` (HOME and SPELL_HOME in ``tmp_path``), run from
    ``tmp_path`` so relative paths land there; returns the store folder."""
    monkeypatch.chdir(tmp_path)
    return store


def run(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = spell.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def write_bundle(
    path,
    spell_id: str = "pub/signed",
    version: str = "1.0.0",
    risk: str = "low",
    steps: dict | None = None,
):
    """Write a valid source bundle at ``path``; return it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "spell.yaml").write_text(
        MANIFEST_TEMPLATE.format(id=spell_id, version=version, risk=risk)
    )
    (path / "schema.json").write_text('{"type": "object"}\n')
    (path / "steps").mkdir(exist_ok=True)
    for rel, content in (steps or {"main.sh": "echo hello\n"}).items():
        target = path / "steps" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return path


def manifest_of(path) -> dict:
    return spell.load_manifest(str(path))


def new_key():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate()


def vector_key():
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(VECTOR_PEM, password=None)


def public_b64(private_key) -> str:
    from cryptography.hazmat.primitives import serialization

    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return spell.b64url_encode(der)


def pem_of(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_trust(store, publisher: str, keys: list[tuple[str, str]]) -> str:
    """Write a trust file by hand: ``keys`` is a list of (key_id, public key)."""
    folder = store / "trust" / "publishers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (spell.id_key(publisher) + ".json")
    path.write_text(
        json.dumps(
            {
                "version": "v1",
                "publisher": publisher,
                "keys": [
                    {"key_id": k, "algorithm": "ed25519", "public_key": p}
                    for k, p in keys
                ],
            }
        )
    )
    return str(path)


def trust(publisher: str, private_key, key_id: str = "default") -> None:
    code, _, err = run(
        "trust", "add", publisher, public_b64(private_key), "--key-id", key_id
    )
    assert code == 0, err


def sign_by_hand(bundle, private_key, publisher: str = "pub", key_id: str = "default"):
    """Sign a bundle with the digest function and ``cryptography`` only."""
    digest = spell.bundle_digest(str(bundle))
    record = {
        "version": "v1",
        "publisher": publisher,
        "key_id": key_id,
        "algorithm": "ed25519",
        "digest": {"algorithm": "sha256", "value": digest.hex()},
        "signature": spell.b64url_encode(private_key.sign(digest)),
    }
    (bundle / "spell.sig.json").write_text(json.dumps(record, indent=2))
    return record


def make_token(private_key, claims: dict | None = None, **changes) -> str:
    """Mint an ``ent1`` token over ``claims`` (defaults: the dev licence)."""
    body = dict(
        claims
        or {
            "version": "v1",
            "issuer": "entitlement-dev",
            "key_id": "k1",
            "mode": "on_success",
            "currency": "USD",
            "max_amount": 25,
            "not_before": "2020-01-01T00:00:00Z",
            "expires_at": "2099-01-01T00:00:00Z",
        }
    )
    body.update(changes)
    payload = spell.b64url_encode(json.dumps(body).encode("utf-8"))
    signature = spell.b64url_encode(private_key.sign(payload.encode("ascii")))
    return f"ent1.{payload}.{signature}"


def last_line(text: str) -> str:
    lines = text.strip("\n").split("\n")
    return lines[-1]
