"""`spell trust add|list|remove` and the strict trust-file loader."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

import spell
from trust_helpers import VECTOR_PUBLIC, home, new_key, public_b64, run, write_trust

assert home  # a fixture, used by name


def trust_file(store, publisher):
    return store / "trust" / "publishers" / (spell.id_key(publisher) + ".json")


def test_trust_add_writes_the_original_format(home):
    code, out, err = run(
        "trust", "add", "pub", f"  {VECTOR_PUBLIC}\n", "--key-id", "beta"
    )
    assert (code, out, err) == (0, "trusted publisher=pub key_id=beta\n", "")
    second = public_b64(new_key())
    assert run("trust", "add", "pub", second, "--key-id", "Alpha")[0] == 0
    path = trust_file(home, "pub")
    assert (
        path.read_text()
        == json.dumps(
            {
                "version": "v1",
                "publisher": "pub",
                "keys": [
                    {"key_id": "Alpha", "algorithm": "ed25519", "public_key": second},
                    {
                        "key_id": "beta",
                        "algorithm": "ed25519",
                        "public_key": VECTOR_PUBLIC,
                    },
                ],
            },
            indent=2,
        )
        + "\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert not (home / "licenses").exists()
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_trust_add_replaces_a_key_with_the_same_id(home):
    first, second = public_b64(new_key()), public_b64(new_key())
    run("trust", "add", "pub", first)
    run("trust", "add", "pub", second)
    trust = spell.load_trust("pub")
    assert trust["keys"] == [
        {"key_id": "default", "algorithm": "ed25519", "public_key": second}
    ]


@pytest.mark.parametrize(
    "key,detail",
    [
        (
            "MCowBQYDK2VwAyEAT+ShWx9zsTsJ1bQlDN2dyne9WvgTkEsUBl/bnn4PFfM=",
            "must be base64url",
        ),
        ("", "must be base64url"),
        ("AAAA", "invalid public key: "),
        ("MCowBQYDK2VwAyEA", "invalid public key: "),
        (VECTOR_PUBLIC + "A", "invalid public key: "),
        (VECTOR_PUBLIC[:-1] + "N", "not the exact base64url"),
        ("A" * (spell.PUBLIC_KEY_MAX_CHARS + 1), "longer than"),
    ],
)
def test_trust_add_refuses_bad_keys(home, key, detail):
    code, out, err = run("trust", "add", "pub", key)
    assert code == 1 and out == ""
    assert err.startswith("invalid public key: ") and detail in err
    assert err.count("\n") == 1
    assert not (home / "trust").exists()


def spki(private_key):
    from cryptography.hazmat.primitives import serialization

    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return spell.b64url_encode(der)


def test_trust_add_refuses_non_ed25519_keys(home):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    for key, name in (
        (rsa.generate_private_key(public_exponent=65537, key_size=1024), "RSA"),
        (ec.generate_private_key(ec.SECP256R1()), "EC"),
    ):
        code, _, err = run("trust", "add", "pub", spki(key))
        assert (code, err) == (
            1,
            f"invalid public key: expected an Ed25519 key, got {name}\n",
        )
    assert not (home / "trust").exists()


def test_trust_add_refuses_standard_base64(home):
    der = spell.b64url_decode(VECTOR_PUBLIC)
    code, _, err = run("trust", "add", "pub", base64.b64encode(der).decode())
    assert code == 1 and "must be base64url" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["", VECTOR_PUBLIC], "publisher must not be empty"),
        (["p\n", VECTOR_PUBLIC], "publisher must not contain control characters"),
        ([" pub ", VECTOR_PUBLIC], "publisher must not start or end with whitespace"),
        (["pub", VECTOR_PUBLIC, "--key-id", " "], "key id must not be empty"),
        (
            ["pub", VECTOR_PUBLIC, "--key-id", "k\x00"],
            "key id must not contain control characters",
        ),
        (
            ["pub", VECTOR_PUBLIC, "--key-id", "k1 "],
            "key id must not start or end with whitespace",
        ),
        (["p" * 200, VECTOR_PUBLIC], "publisher is too long to store"),
    ],
)
def test_trust_add_validates_publisher_and_key_id(home, args, message):
    code, _, err = run("trust", "add", *args)
    assert (code, err) == (1, message + "\n")
    assert not (home / "trust").exists()


def test_trusted_publisher_round_trips_through_strict_load(home):
    run("trust", "add", "ü nicode", VECTOR_PUBLIC, "--key-id", "k1")
    assert spell.trusted_key(spell.load_trust("ü nicode"), "k1") == VECTOR_PUBLIC


def test_trust_list(home):
    assert run("trust", "list") == (0, "No trusted publishers\n", "")
    assert not (home / "trust").exists()
    for publisher, key_id in (
        ("zeta", "k"),
        ("_under", "k"),
        ("Beta", "zeta"),
        ("Beta", "Alpha"),
        ("Beta", "beta"),
        ("alpha", "k"),
    ):
        assert (
            run("trust", "add", publisher, public_b64(new_key()), "--key-id", key_id)[0]
            == 0
        )
    code, out, _ = run("trust", "list")
    assert out.splitlines() == [
        "publisher\tkey_ids",
        "_under\tk",
        "alpha\tk",
        "Beta\tAlpha,beta,zeta",
        "zeta\tk",
    ]


def test_trust_list_is_lenient(home):
    run("trust", "add", "good", VECTOR_PUBLIC)
    folder = home / "trust" / "publishers"
    junk = {
        "a.json": "not json",
        "b.json": "[]",
        "c.json": '{"version": "v2"}',
        "d.json": '{"version": "v1", "publisher": " ", "keys": []}',
        "e.json": '{"version": "v1", "publisher": "e", "keys": {}}',
        "f.json": json.dumps(
            {
                "version": "v1",
                "publisher": " f ",
                "keys": [
                    1,
                    {"key_id": 5, "public_key": "x", "algorithm": "ed25519"},
                    {"key_id": "rsa", "public_key": "x", "algorithm": "rsa"},
                    {"key_id": "ok", "public_key": "x", "algorithm": "ed25519"},
                ],
            }
        ),
        "g.json": json.dumps(
            {
                "version": "v1",
                "publisher": "g",
                "keys": [{"key_id": "rsa", "public_key": "x", "algorithm": "rsa"}],
            }
        ),
        "notes.txt": "ignored",
    }
    for name, content in junk.items():
        (folder / name).write_text(content)
    os.mkfifo(folder / "fifo.json")
    (folder / "dir.json").mkdir()
    code, out, err = run("trust", "list")
    assert code == 0, err
    assert out.splitlines() == ["publisher\tkey_ids", "f\tok", "good\tdefault"]


def test_trust_remove(home):
    run("trust", "add", "pub", VECTOR_PUBLIC)
    assert run("trust", "remove", "pub") == (0, "removed publisher=pub\n", "")
    assert not trust_file(home, "pub").exists()
    assert run("trust", "remove", "pub") == (
        1,
        "",
        "trusted publisher not found: pub\n",
    )
    assert (
        run("trust", "remove", "x" * 300)[2]
        == "trusted publisher not found: " + "x" * 300 + "\n"
    )


#: The valid start of a trust file whose first key is cut short.
KEY_HEAD = '{"version": "v1", "publisher": "pub", "keys": [{"key_id": "k", '

STRICT_CASES = [
    ("not json", "failed to parse trust file: {path}"),
    ('{"version": "v1"', "failed to parse trust file: {path}"),
    ('{"version": NaN}', "failed to parse trust file: {path}"),
    ("[1]", "trust file must be a JSON object: {path}"),
    ("{}", "missing 'version' string"),
    ('{"version": "v2"}', "unsupported trust file version: v2"),
    ('{"version": "v1", "publisher": 3}', "missing 'publisher' string"),
    (
        '{"version": "v1", "publisher": "other"}',
        "trust file publisher mismatch: expected 'pub', got 'other'",
    ),
    (
        '{"version": "v1", "publisher": " pub ", "keys": []}',
        "trust file keys must be a non-empty array",
    ),
    (
        '{"version": "v1", "publisher": "pub", "keys": {}}',
        "trust file keys must be a non-empty array",
    ),
    (
        '{"version": "v1", "publisher": "pub", "keys": ["x"]}',
        "trust file keys[0] must be an object",
    ),
    ('{"version": "v1", "publisher": "pub", "keys": [{}]}', "missing 'key_id' string"),
    (
        '{"version": "v1", "publisher": "pub", "keys": [{"key_id": "k"}]}',
        "missing 'algorithm' string",
    ),
    (
        KEY_HEAD + '"algorithm": "rsa"}]}',
        "unsupported trust key algorithm: rsa",
    ),
    (
        KEY_HEAD + '"algorithm": "ed25519"}]}',
        "missing 'public_key' string",
    ),
    (
        KEY_HEAD + '"algorithm": "ed25519", "public_key": "a/b="}]}',
        "trust key public_key must be base64url",
    ),
    (
        KEY_HEAD + '"algorithm": "ed25519", "public_key": "ab"}, '
        '{"key_id": " k", "algorithm": "ed25519", "public_key": "cd"}]}',
        "duplicate trust key_id: k",
    ),
]


@pytest.mark.parametrize("content,message", STRICT_CASES)
def test_strict_trust_load(home, content, message):
    path = trust_file(home, "pub")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(spell.SpellError) as exc:
        spell.load_trust("pub")
    assert exc.value.message == message.format(path=path)
    # trust add loads the existing file strictly and writes nothing on error.
    code, out, err = run("trust", "add", "pub", VECTOR_PUBLIC, "--key-id", "new")
    assert (code, out, err) == (1, "", message.format(path=path) + "\n")
    assert path.read_text() == content


def test_strict_trust_load_special_and_oversized_files(home):
    path = trust_file(home, "pub")
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with pytest.raises(spell.SpellError, match="not a regular file"):
        spell.load_trust("pub")
    os.unlink(path)
    path.write_text(" " * (spell.JSON_FILE_MAX_BYTES + 1))
    code, _, err = run("trust", "add", "pub", VECTOR_PUBLIC)
    assert code == 1 and "larger than" in err
    assert spell.load_trust("nobody") is None


def test_hand_written_trust_file_loads(home):
    write_trust(home, "pub", [("k1", VECTOR_PUBLIC)])
    assert spell.load_trust("pub")["keys"][0]["public_key"] == VECTOR_PUBLIC


def test_undecodable_arguments_are_refused(home):
    bad = b"\xff".decode("utf-8", "surrogateescape")
    assert run("trust", "add", bad, VECTOR_PUBLIC) == (
        1,
        "",
        "publisher must be valid UTF-8\n",
    )
    assert run("trust", "remove", bad) == (
        1,
        "",
        f"trusted publisher not found: {bad}\n",
    )
    assert run("license", "add", bad, "x") == (
        1,
        "",
        "license name must be valid UTF-8\n",
    )
    assert run("license", "remove", bad) == (1, "", f"license not found: {bad}\n")
