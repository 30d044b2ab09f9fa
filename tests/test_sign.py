"""Bundle digest, keygen, sign bundle, verification and `spell verify`."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

import spell
from trust_helpers import (
    HELLO_HOST_DIGEST,
    HELLO_HOST_SIGNATURE,
    VECTOR_PEM,
    VECTOR_PUBLIC,
    home,
    last_line,
    write_bundle,
    manifest_of,
    new_key,
    pem_of,
    public_b64,
    run,
    sign_by_hand,
    trust,
    vector_key,
    write_trust,
)

assert home  # a fixture, used by name


# Digest ######################################################################


def vec_bundle(path):
    files = {
        "spell.yaml": "id: pub/vec\n",
        "schema.json": "{}\n",
        "steps/a.js": "A\n",
        "steps/B.js": "B\n",
        "steps/a_b.js": "U\n",
        "steps/a-b.js": "D\n",
        "steps/sub/c.js": "S\n",
        "spell.sig.json": "ignored",
        "README.md": "ignored",
    }
    for rel, content in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return path


def test_digest_vector_in_locale_order(tmp_path):
    bundle = vec_bundle(tmp_path / "vec")
    assert spell.bundle_files(str(bundle)) == [
        "schema.json",
        "spell.yaml",
        "steps/a_b.js",
        "steps/a-b.js",
        "steps/a.js",
        "steps/B.js",
        "steps/sub/c.js",
    ]
    assert spell.bundle_digest(str(bundle)).hex() == (
        "223cca9622ba00a5678e7c31bb43cc7612e5e2a42541f33e8c7f205fedde93b2"
    )


def test_digest_framing_and_byte_order_differs(tmp_path):
    bundle = vec_bundle(tmp_path / "vec")
    byte_order = sorted(spell.bundle_files(str(bundle)))
    h = hashlib.sha256(b"spell-bundle-v1\x00")
    for rel in byte_order:
        h.update(
            b"file\x00" + rel.encode() + b"\x00" + (bundle / rel).read_bytes() + b"\x00"
        )
    assert h.hexdigest().startswith("ab3620b3") and h.hexdigest().endswith("4f7b")
    assert spell.bundle_digest(str(bundle), byte_order) == h.digest()


def test_digest_ignores_root_extras_but_covers_hidden_step_files(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    before = spell.bundle_digest(str(bundle))
    (bundle / ".hidden").write_text("x")
    (bundle / "source.json").write_text("{}")
    assert spell.bundle_digest(str(bundle)) == before
    (bundle / "steps" / ".hidden").write_text("x")
    assert spell.bundle_digest(str(bundle)) != before
    (bundle / "steps" / "empty").mkdir()
    assert "steps/.hidden" in spell.bundle_files(str(bundle))


def test_digest_streams_in_chunks(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "b", steps={"big.bin": "x" * 100_000})
    expected = spell.bundle_digest(str(bundle))
    reads = []
    real_read = os.read

    def spy(fd, n):
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(spell, "HASH_CHUNK_BYTES", 4096)
    monkeypatch.setattr(spell.os, "read", spy)
    assert spell.bundle_digest(str(bundle)) == expected
    assert reads and max(reads) <= 4096


def test_digest_refuses_symlinks_and_special_files(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    link = bundle / "steps" / "link.sh"
    link.symlink_to(bundle / "steps" / "main.sh")
    with pytest.raises(spell.SpellError, match="^symlink is not allowed in steps/: "):
        spell.bundle_digest(str(bundle))
    link.unlink()
    fifo = bundle / "steps" / "sub" / "pipe"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(spell.SpellError) as exc:
        spell.bundle_digest(str(bundle))
    assert exc.value.message == f"unsupported file type in steps/: {fifo}"


def test_digest_root_files(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    (bundle / "schema.json").unlink()
    with pytest.raises(spell.SpellError, match="^schema.json not found$"):
        spell.bundle_digest(str(bundle))
    os.mkfifo(bundle / "schema.json")
    with pytest.raises(spell.SpellError, match="^schema.json not found$"):
        spell.bundle_digest(str(bundle))
    (bundle / "spell.yaml").unlink()
    with pytest.raises(spell.SpellError, match="^spell.yaml not found$"):
        spell.bundle_digest(str(bundle))
    other = write_bundle(tmp_path / "c")
    (other / "steps" / "main.sh").unlink()
    (other / "steps").rmdir()
    (other / "steps").write_text("")
    with pytest.raises(spell.SpellError, match="^steps/ must be a directory$"):
        spell.bundle_digest(str(other))


def test_digest_file_swapped_for_fifo_after_listing(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    files = spell.bundle_files(str(bundle))
    (bundle / "steps" / "main.sh").unlink()
    os.mkfifo(bundle / "steps" / "main.sh")
    with pytest.raises(spell.SpellError, match="^unsupported file type in steps/"):
        spell.bundle_digest(str(bundle), files)


# Signature vectors ###########################################################


def test_signature_vector_is_reproduced():
    key = vector_key()
    assert public_b64(key) == VECTOR_PUBLIC
    signature = key.sign(bytes.fromhex(HELLO_HOST_DIGEST))
    assert spell.b64url_encode(signature) == HELLO_HOST_SIGNATURE
    public = spell._ed25519_public_key(VECTOR_PUBLIC)
    assert spell._ed25519_verify(public, signature, bytes.fromhex(HELLO_HOST_DIGEST))


def test_load_private_key_accepts_the_vector_key(tmp_path):
    path = tmp_path / "k.pem"
    path.write_bytes(VECTOR_PEM)
    assert public_b64(spell.load_private_key(str(path))) == VECTOR_PUBLIC


# Keygen ######################################################################


def test_keygen_writes_keys_and_prints_six_lines(home, tmp_path):
    code, out, err = run("sign", "keygen", "a b/c", "--out-dir", str(tmp_path / "keys"))
    assert code == 0, err
    private = tmp_path / "keys" / "a_b_c__default.private.pem"
    public = tmp_path / "keys" / "a_b_c__default.public.b64url.txt"
    key = public.read_text().strip()
    assert out.splitlines() == [
        "publisher: a b/c",
        "key_id: default",
        f"private_key: {private}",
        f"public_key_file: {public}",
        f"public_key_base64url: {key}",
        f"trust_add: spell trust add a b/c {key} --key-id default",
    ]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert key.startswith("MCowBQYDK2VwAyEA") and len(key) == 59
    assert public_b64(spell.load_private_key(str(private))) == key


def test_keygen_refuses_to_overwrite_without_force(home, tmp_path):
    args = (
        "sign",
        "keygen",
        "signed",
        "--key-id",
        "k1",
        "--out-dir",
        str(tmp_path / "k"),
    )
    assert run(*args)[0] == 0
    private = tmp_path / "k" / "signed__k1.private.pem"
    before = private.read_bytes()
    code, out, err = run(*args)
    assert code == 1 and out == ""
    assert "already exists" in err and "--force" in err
    assert private.read_bytes() == before
    code, _, err = run(*args, "--force")
    assert code == 0, err
    assert private.read_bytes() != before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "publisher,key_id,message",
    [
        ("  ", "k", "publisher must not be empty"),
        ("a\x01", "k", "publisher must not contain control characters"),
        ("p", "", "key id must not be empty"),
        ("p", "k\x7f", "key id must not contain control characters"),
        (" p", "k", "publisher must not start or end with whitespace"),
    ],
)
def test_keygen_validates_labels(home, tmp_path, publisher, key_id, message):
    code, _, err = run(
        "sign",
        "keygen",
        publisher,
        "--key-id",
        key_id,
        "--out-dir",
        str(tmp_path / "k"),
    )
    assert (code, err) == (1, message + "\n")
    assert not (tmp_path / "k").exists()


# Sign bundle #################################################################


def test_sign_bundle_verifies_with_cryptography_alone(home, tmp_path):
    bundle = write_bundle(tmp_path / "b")
    key = new_key()
    (tmp_path / "k.pem").write_bytes(pem_of(key))
    code, out, err = run(
        "sign", "bundle", str(bundle), "--private-key", "k.pem", "--key-id", "k1"
    )
    assert code == 0, err
    record = json.loads((bundle / "spell.sig.json").read_text())
    assert list(record) == [
        "version",
        "publisher",
        "key_id",
        "algorithm",
        "digest",
        "signature",
    ]
    assert record["publisher"] == "pub" and record["key_id"] == "k1"
    assert record["digest"] == {
        "algorithm": "sha256",
        "value": spell.bundle_digest(str(bundle)).hex(),
    }
    assert out.splitlines() == [
        f"signed: {bundle / 'spell.sig.json'}",
        "publisher: pub",
        "key_id: k1",
        f"digest: {record['digest']['value']}",
    ]
    sig = record["signature"]
    key.public_key().verify(
        spell.b64url_decode(sig), bytes.fromhex(record["digest"]["value"])
    )
    assert (bundle / "spell.sig.json").read_text().endswith("}\n")


def test_sign_bundle_publisher_mismatch(home, tmp_path):
    bundle = write_bundle(tmp_path / "b")
    (tmp_path / "k.pem").write_bytes(pem_of(new_key()))
    code, _, err = run(
        "sign",
        "bundle",
        str(bundle),
        "--private-key",
        "k.pem",
        "--publisher",
        " other ",
    )
    assert (code, err) == (
        1,
        "publisher mismatch: manifest expects 'pub', got 'other'\n",
    )
    assert not (bundle / "spell.sig.json").exists()


def rsa_pem():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return pem_of(rsa.generate_private_key(public_exponent=65537, key_size=1024))


def ec_pem():
    from cryptography.hazmat.primitives.asymmetric import ec

    return pem_of(ec.generate_private_key(ec.SECP256R1()))


def encrypted_pem():
    from cryptography.hazmat.primitives import serialization

    return new_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.parametrize(
    "make,expected",
    [
        (rsa_pem, "failed to parse private key: expected an Ed25519 key, got RSA"),
        (ec_pem, "failed to parse private key: expected an Ed25519 key, got EC"),
        (encrypted_pem, "failed to parse private key: the key is encrypted"),
        (lambda: b"garbage", "failed to parse private key: not a PEM file"),
        (lambda: VECTOR_PEM[:60], "failed to parse private key: "),
    ],
)
def test_sign_bundle_refuses_bad_keys(home, tmp_path, make, expected):
    bundle = write_bundle(tmp_path / "b")
    (tmp_path / "k.pem").write_bytes(make())
    code, out, err = run("sign", "bundle", str(bundle), "--private-key", "k.pem")
    assert code == 1 and out == ""
    assert err.startswith(expected) and err.count("\n") == 1
    assert not (bundle / "spell.sig.json").exists()


def test_sign_bundle_key_file_problems(home, tmp_path):
    bundle = write_bundle(tmp_path / "b")
    code, _, err = run("sign", "bundle", str(bundle), "--private-key", "missing.pem")
    assert (code, err) == (1, "private key file not found: missing.pem\n")
    code, _, err = run("sign", "bundle", str(bundle), "--private-key", "/dev/zero")
    assert (code, err) == (
        1,
        "failed to read private key file /dev/zero: not a regular file\n",
    )
    (tmp_path / "big.pem").write_bytes(b"x" * (spell.PRIVATE_KEY_MAX_BYTES + 1))
    code, _, err = run("sign", "bundle", str(bundle), "--private-key", "big.pem")
    assert code == 1 and "larger than" in err
    assert not (bundle / "spell.sig.json").exists()


# Verification ################################################################


@pytest.fixture
def signed(home, tmp_path):
    """A bundle signed by hand with a trusted key: (bundle, manifest, key)."""
    bundle = write_bundle(
        tmp_path / "b", steps={"main.sh": "echo hi\n", "lib/x.sh": "x\n"}
    )
    key = new_key()
    sign_by_hand(bundle, key, key_id="k1")
    trust("pub", key, "k1")
    return bundle, manifest_of(bundle), key


def verify(bundle):
    return spell.verify_bundle(manifest_of(bundle), str(bundle))


def test_verified(signed):
    bundle, manifest, _ = signed
    result = spell.verify_bundle(manifest, str(bundle))
    digest = spell.bundle_digest(str(bundle)).hex()
    assert result == {
        "ok": True,
        "status": "verified",
        "publisher": "pub",
        "key_id": "k1",
        "digest": digest,
        "message": "verified",
    }
    assert list(spell.signature_log_block(result, True).items()) == [
        ("required", True),
        ("status", "verified"),
        ("publisher", "pub"),
        ("key_id", "k1"),
        ("digest", digest),
    ]


def test_sign_bundle_output_verifies(home, tmp_path):
    bundle = write_bundle(tmp_path / "b")
    key = new_key()
    (tmp_path / "k.pem").write_bytes(pem_of(key))
    assert run("sign", "bundle", str(bundle), "--private-key", "k.pem")[0] == 0
    trust("pub", key)
    assert verify(bundle)["status"] == "verified"


def test_unsigned(home, tmp_path):
    bundle = write_bundle(tmp_path / "b")
    result = verify(bundle)
    assert result == {
        "ok": False,
        "status": "unsigned",
        "publisher": "pub",
        "message": "spell.sig.json not found",
    }
    assert spell.signature_log_block(result, False) == {
        "required": False,
        "status": "unsigned",
        "publisher": "pub",
    }


@pytest.mark.parametrize("change", ["edit", "add", "remove", "rename", "nested"])
def test_tampered_step_files_give_digest_mismatch(signed, change):
    bundle, _, _ = signed
    steps = bundle / "steps"
    if change == "edit":
        (steps / "main.sh").write_text("echo evil\n")
    elif change == "add":
        (steps / "extra.sh").write_text("echo evil\n")
    elif change == "remove":
        (steps / "lib" / "x.sh").unlink()
    elif change == "rename":
        (steps / "lib" / "x.sh").rename(steps / "lib" / "y.sh")
    else:
        (steps / "lib" / "deeper").mkdir()
        (steps / "lib" / "deeper" / "z").write_text("")
    result = verify(bundle)
    assert (result["status"], result["message"]) == ("invalid", "digest mismatch")
    assert result["digest"] == spell.bundle_digest(str(bundle)).hex()


def edit_sig(bundle, **changes):
    path = bundle / "spell.sig.json"
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))
    return record


def test_edited_signature_fails(signed):
    bundle, _, _ = signed
    record = json.loads((bundle / "spell.sig.json").read_text())
    sig = record["signature"]
    edit_sig(bundle, signature=("B" if sig[0] == "A" else "A") + sig[1:])
    result = verify(bundle)
    assert (result["status"], result["message"]) == (
        "invalid",
        "signature verification failed",
    )


def test_short_signature_fails(signed):
    bundle, _, _ = signed
    edit_sig(bundle, signature="AAAA")
    assert verify(bundle)["message"] == "signature verification failed"


def test_edited_digest_field_is_a_digest_mismatch(signed):
    bundle, _, _ = signed
    edit_sig(bundle, digest={"algorithm": "sha256", "value": "0" * 64})
    assert verify(bundle)["message"] == "digest mismatch"


def test_swapped_key_fails(signed, home):
    bundle, _, _ = signed
    trust("pub", new_key(), "k1")
    result = verify(bundle)
    assert (result["status"], result["message"]) == (
        "invalid",
        "signature verification failed",
    )


def test_publisher_mismatch_reports_declared_digest(signed):
    bundle, _, _ = signed
    record = edit_sig(bundle, publisher="evil")
    assert verify(bundle) == {
        "ok": False,
        "status": "invalid",
        "publisher": "pub",
        "key_id": "k1",
        "digest": record["digest"]["value"],
        "message": "signature publisher mismatch: expected 'pub', got 'evil'",
    }


def test_untrusted_statuses(signed, home):
    bundle, _, key = signed
    edit_sig(bundle, key_id="k2")
    result = verify(bundle)
    assert (result["status"], result["message"]) == (
        "untrusted",
        "trusted key_id not found: k2",
    )
    assert result["key_id"] == "k2"
    assert run("trust", "remove", "pub")[0] == 0
    result = verify(bundle)
    assert (result["status"], result["message"]) == (
        "untrusted",
        "no trusted key for publisher: pub",
    )


def test_non_ed25519_trusted_key_is_untrusted(signed, home):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    bundle, _, _ = signed
    der = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    write_trust(home, "pub", [("k1", spell.b64url_encode(der))])
    result = verify(bundle)
    assert result["status"] == "untrusted"
    assert (
        result["message"]
        == "invalid trusted public key: expected an Ed25519 key, got EC"
    )
    write_trust(home, "pub", [("k1", "AAAA")])
    assert verify(bundle)["message"].startswith("invalid trusted public key: ")


#: The valid start of a signature file, for cases that break a later field.
SIG_HEAD = (
    '{"version": "v1", "publisher": "pub", "key_id": "k", "algorithm": "ed25519", '
)


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"version": "v1"', "failed to parse spell.sig.json: "),
        ("not json", "failed to parse spell.sig.json: "),
        ("[]", "spell.sig.json must be a JSON object"),
        ('{"version": 1}', "spell.sig.json missing 'version' string"),
        ('{"version": "v2"}', "unsupported signature version: v2"),
        (
            '{"version": "v1", "publisher": " "}',
            "spell.sig.json missing 'publisher' string",
        ),
        (
            '{"version": "v1", "publisher": "pub"}',
            "spell.sig.json missing 'key_id' string",
        ),
        (
            '{"version": "v1", "publisher": "pub", "key_id": "k", "algorithm": "rsa"}',
            "unsupported signature algorithm: rsa",
        ),
        (
            SIG_HEAD + '"digest": "x"}',
            "spell.sig.json.digest must be an object",
        ),
        (
            SIG_HEAD + '"digest": {}}',
            "spell.sig.json missing 'algorithm' string",
        ),
        (
            SIG_HEAD + '"digest": {"algorithm": "md5"}}',
            "unsupported digest algorithm: md5",
        ),
        (
            SIG_HEAD + '"digest": {"algorithm": "sha256"}}',
            "spell.sig.json missing 'value' string",
        ),
        (
            SIG_HEAD + '"digest": {"algorithm": "sha256", "value": "abc"}}',
            "spell.sig.json.digest.value must be a sha256 hex string",
        ),
        (
            SIG_HEAD
            + '"digest": {"algorithm": "sha256", "value": "'
            + "A" * 64
            + '"}}',
            "spell.sig.json missing 'signature' string",
        ),
        (
            SIG_HEAD
            + '"digest": {"algorithm": "sha256", "value": "'
            + "A" * 64
            + '"}, "signature": "a+b="}',
            "spell.sig.json.signature must be base64url",
        ),
        ('{"version": NaN}', "failed to parse spell.sig.json: "),
    ],
)
def test_malformed_signature_files_are_invalid(home, tmp_path, content, message):
    bundle = write_bundle(tmp_path / "b")
    (bundle / "spell.sig.json").write_text(content)
    result = verify(bundle)
    assert result["status"] == "invalid" and result["ok"] is False
    assert result["message"].startswith(message)
    assert "key_id" not in result and "digest" not in result


def test_signature_file_must_be_a_small_regular_file(home, tmp_path):
    bundle = write_bundle(tmp_path / "b")
    os.mkfifo(bundle / "spell.sig.json")
    assert (
        verify(bundle)["message"] == "failed to read spell.sig.json: not a regular file"
    )
    os.unlink(bundle / "spell.sig.json")
    (bundle / "spell.sig.json").write_text(" " * (spell.JSON_FILE_MAX_BYTES + 1))
    assert verify(bundle)["message"].startswith(
        "failed to read spell.sig.json: larger than"
    )
    os.unlink(bundle / "spell.sig.json")
    (bundle / "spell.sig.json").symlink_to(tmp_path / "nowhere")
    assert verify(bundle)["message"].startswith(
        "failed to read spell.sig.json: symlink"
    )


def test_digest_errors_during_verification_are_invalid(signed):
    bundle, _, _ = signed
    (bundle / "steps" / "l").symlink_to("/etc/passwd")
    result = verify(bundle)
    assert result["status"] == "invalid"
    assert result["message"].startswith("symlink is not allowed in steps/: ")
    assert "digest" not in result


def test_broken_trust_file_is_invalid(signed, home):
    bundle, _, _ = signed
    write_trust(home, "pub", [("k1", "abc+/=")])
    result = verify(bundle)
    assert result == {
        "ok": False,
        "status": "invalid",
        "publisher": "pub",
        "message": "trust key public_key must be base64url",
    }


# spell verify ################################################################


def test_verify_command(signed, home, tmp_path):
    bundle, _, _ = signed
    assert run("install", str(bundle))[0] == 0
    code, out, err = run("verify", "pub/signed")
    assert code == 0, err
    installed = home / "spells" / spell.id_key("pub/signed") / "1.0.0"
    digest = spell.bundle_digest(str(installed)).hex()
    assert out.splitlines() == [
        "status: verified",
        "publisher: pub",
        "key_id: k1",
        f"digest: {digest}",
        "files:",
        "  schema.json",
        "  spell.yaml",
        "  steps/lib/x.sh",
        "  steps/main.sh",
    ]
    code, out, err = run("verify", "pub/signed", "--version", "1.0.0", "--json")
    assert code == 0
    assert json.loads(out)["files"][-1] == "steps/main.sh"

    (installed / "steps" / "main.sh").write_text("tampered\n")
    code, out, err = run("verify", "pub/signed")
    assert code == 1
    assert out.splitlines()[0] == "status: invalid"
    assert last_line(err) == "digest mismatch"


def test_verify_command_unsigned_and_missing(home, tmp_path):
    bundle = write_bundle(tmp_path / "b")
    assert run("install", str(bundle))[0] == 0
    code, out, err = run("verify", "pub/signed")
    assert code == 1
    assert out.splitlines()[:4] == [
        "status: unsigned",
        "publisher: pub",
        "key_id: -",
        "digest: -",
    ]
    assert err == "spell.sig.json not found\n"
    code, out, err = run("verify", "nope/x")
    assert (code, out, err) == (1, "", "spell not installed: nope/x\n")
