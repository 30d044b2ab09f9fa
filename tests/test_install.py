"""Install from folders and real git repositories: provenance, errors, atomicity, refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

import spell

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
DEMO_KEY = spell.id_key("test/demo")

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def version_dir(store, spell_id="test/demo", version="1.0.0"):
    return store / "spells" / spell.id_key(spell_id) / version


def store_is_clean(store) -> bool:
    """Nothing installed and no staging left behind."""
    spells = store / "spells"
    tmp = store / "tmp"
    return (not spells.exists() or not any(spells.iterdir())) and (
        not tmp.exists() or not any(tmp.iterdir())
    )


# From a folder ##################################################################


def test_install_from_folder(make_bundle, run_cli, store):
    root = make_bundle(files={"spell.sig.json": "{}\n", "README.md": "ignored",
                              "steps/sub/data.json": "{}"})
    code, out, err = run_cli("install", root)
    assert (code, out, err) == (0, "test/demo@1.0.0\n", "")
    vdir = version_dir(store)
    assert sorted(p.name for p in vdir.iterdir()) == [
        "schema.json", "source.json", "spell.sig.json", "spell.yaml", "steps"]
    assert (vdir / "steps" / "sub" / "data.json").read_text() == "{}"
    assert (vdir.parent / "spell.id.txt").read_text() == "test/demo\n"
    assert stat.S_IMODE((vdir / "steps" / "run.sh").stat().st_mode) & 0o111
    record = json.loads((vdir / "source.json").read_text())
    assert list(record) == ["type", "source", "installed_at"]
    assert record["type"] == "local"
    assert record["source"] == str(root)
    assert ISO_MS.match(record["installed_at"])
    assert (vdir / "source.json").read_text().endswith("}\n")


def test_source_is_recorded_as_given(make_bundle, run_cli, store, monkeypatch):
    root = make_bundle()
    monkeypatch.chdir(root.parent)
    assert run_cli("install", root.name)[0] == 0
    record = json.loads((version_dir(store) / "source.json").read_text())
    assert record["source"] == root.name


def test_store_folders_are_private(make_bundle, run_cli, store):
    assert run_cli("install", make_bundle())[0] == 0
    for rel in ("", "spells", "logs", "trust", "trust/publishers", "licenses",
                f"spells/{DEMO_KEY}"):
        assert stat.S_IMODE((store / rel).stat().st_mode) == 0o700, rel


def test_step_modes_are_kept_without_group_or_world_write(make_bundle, run_cli, store):
    root = make_bundle(files={"steps/plain.txt": "x"})
    (root / "steps" / "run.sh").chmod(0o777)
    (root / "steps" / "plain.txt").chmod(0o640)
    assert run_cli("install", root)[0] == 0
    steps = version_dir(store) / "steps"
    assert stat.S_IMODE((steps / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((steps / "plain.txt").stat().st_mode) == 0o640


def test_already_installed(make_bundle, run_cli, store):
    root = make_bundle()
    assert run_cli("install", root)[0] == 0
    assert run_cli("install", root) == (1, "", "already installed: test/demo@1.0.0\n")


def test_second_version_installs_beside_the_first(make_bundle, run_cli, store):
    assert run_cli("install", make_bundle())[0] == 0
    assert run_cli("install", make_bundle(version="1.1.0"))[0] == 0
    names = sorted(p.name for p in (store / "spells" / DEMO_KEY).iterdir())
    assert names == ["1.0.0", "1.1.0", "spell.id.txt"]


def test_id_file_mismatch(make_bundle, run_cli, store):
    assert run_cli("install", make_bundle())[0] == 0
    (store / "spells" / DEMO_KEY / "spell.id.txt").write_text("someone/else\n")
    code, out, err = run_cli("install", make_bundle(version="2.0.0"))
    assert code == 1
    assert err == (f"spell.id.txt mismatch for {DEMO_KEY}: expected 'someone/else', "
                   "got 'test/demo'\n")
    assert not version_dir(store, version="2.0.0").exists()


def test_not_a_directory_and_missing_path(tmp_path, run_cli, store):
    afile = tmp_path / "file"
    afile.write_text("x")
    assert run_cli("install", afile) == (1, "", f"bundle path must be a directory: {afile}\n")
    missing = tmp_path / "nope"
    assert run_cli("install", missing) == (
        1, "", f"ENOENT: no such file or directory, realpath '{missing}'\n")
    # http:// and file:// are local paths, as in the original
    code, _, err = run_cli("install", "http://spell.test/x.git#main")
    assert code == 1 and err.startswith("ENOENT: no such file or directory, realpath '")
    assert not (store / "spells").exists()


def test_manifest_errors_write_nothing(make_bundle, run_cli, store):
    code, _, err = run_cli("install", make_bundle(risk="extreme"))
    assert (code, err) == (1, "invalid risk: extreme\n")
    assert not store.exists()


def test_version_cannot_escape_the_store(make_bundle, run_cli, store, tmp_path):
    code, _, err = run_cli("install", make_bundle(version="../../../x"))
    assert code == 1
    assert err == "version must not contain '/' or '\\' or be '.' or '..': ../../../x\n"
    assert not any(p.name == "x" for p in tmp_path.rglob("x"))


def test_hidden_version_is_refused(make_bundle, run_cli, store):
    assert run_cli("install", make_bundle(version=".1")) == (
        1, "", "version must not start with '.': .1\n")
    assert store_is_clean(store)


def test_names_too_long_to_store_are_refused(make_bundle, run_cli, store):
    # 200 characters of 3-byte UTF-8 make a storage key of 800 characters
    code, _, err = run_cli("install", make_bundle(id="界" * 200))
    assert (code, err) == (1, "id or version is too long to store\n")


# Refusals ########################################################################


def test_run_path_outside_steps_is_refused(make_bundle, run_cli, store):
    root = make_bundle(steps=[{"uses": "shell", "name": "go", "run": "run.sh"}],
                       files={"run.sh": "#!/bin/sh\n"})
    assert run_cli("install", root) == (
        1, "", "step 'go' run path must be inside steps/: run.sh\n")
    root = make_bundle(steps=[{"uses": "shell", "name": "go", "run": "./steps/../run.sh"}],
                       files={"run.sh": "#!/bin/sh\n"})
    assert run_cli("install", root) == (
        1, "", "step 'go' run path must be inside steps/: ./steps/../run.sh\n")
    assert store_is_clean(store)


def test_inputs_schema_elsewhere_is_refused(make_bundle, run_cli, store):
    root = make_bundle(inputs_schema="sub/schema.json", files={"sub/schema.json": "{}"})
    assert run_cli("install", root) == (
        1, "", "inputs_schema must point to schema.json at the bundle root: sub/schema.json\n")


def test_symlink_in_steps_is_refused(make_bundle, run_cli, store):
    root = make_bundle()
    os.symlink("/etc/passwd", root / "steps" / "passwd")
    link = root / "steps" / "passwd"
    assert run_cli("install", root) == (1, "", f"symlink is not allowed in steps/: {link}\n")
    assert store_is_clean(store)


def test_symlinked_steps_folder_and_files_are_refused(make_bundle, run_cli, store, tmp_path):
    root = make_bundle()
    elsewhere = tmp_path / "elsewhere"
    shutil.move(root / "steps", elsewhere)
    os.symlink(elsewhere, root / "steps")
    assert run_cli("install", root) == (1, "", f"symlink is not allowed: {root}/steps\n")
    root = make_bundle(files={"schema.json": None})
    os.symlink(tmp_path / "bundles" / "bundle1" / "schema.json", root / "schema.json")
    assert run_cli("install", root) == (1, "", f"symlink is not allowed: {root}/schema.json\n")
    root = make_bundle(files={"spell.yaml": None})
    os.symlink(tmp_path / "bundles" / "bundle1" / "spell.yaml", root / "spell.yaml")
    code, _, err = run_cli("install", root)
    assert (code, err) == (1, f"spell.yaml must not be a symlink: {root}/spell.yaml\n")
    assert store_is_clean(store)


@pytest.mark.parametrize("target", ["/etc/hostname", "missing-target"])
def test_symlinked_signature_is_refused(make_bundle, run_cli, store, target):
    root = make_bundle()
    os.symlink(target, root / "spell.sig.json")
    assert run_cli("install", root) == (
        1, "", f"symlink is not allowed: {root}/spell.sig.json\n")


def test_special_files_in_steps_are_refused(make_bundle, run_cli, store):
    root = make_bundle()
    os.mkfifo(root / "steps" / "pipe")
    start = time.monotonic()
    assert run_cli("install", root) == (
        1, "", f"unsupported file type in steps/: {root}/steps/pipe\n")
    assert time.monotonic() - start < 5
    assert store_is_clean(store)


def test_failed_install_never_blocks_a_retry(make_bundle, run_cli, store):
    root = make_bundle()
    os.symlink("run.sh", root / "steps" / "alias.sh")
    assert run_cli("install", root)[0] == 1
    assert store_is_clean(store)
    (root / "steps" / "alias.sh").unlink()
    assert run_cli("install", root) == (0, "test/demo@1.0.0\n", "")


# Killed midway ####################################################################

BIG = 192 * 1024 * 1024


def _staged_big_file(store):
    tmp = store / "tmp"
    if not tmp.exists():
        return None
    for path in tmp.glob("install-*/id/*/steps/big.bin"):
        return path
    return None


def test_install_killed_during_copy_leaves_store_usable(make_bundle, run_pyz, pyz, store):
    root = make_bundle(files={"steps/big.bin": b""})
    with open(root / "steps" / "big.bin", "r+b") as handle:
        handle.truncate(BIG)  # sparse source; the copy still writes every byte
    proc = subprocess.Popen([sys.executable, str(pyz.spell), "install", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while _staged_big_file(store) is None and proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("the install never reached the copy of big.bin")
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate()
    if proc.returncode == 0:
        pytest.skip("the install finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    assert not (store / "spells" / DEMO_KEY).exists()
    assert run_pyz("list").stdout == "No spells installed\n"
    retry = run_pyz("install", root)
    assert (retry.returncode, retry.stdout, retry.stderr) == (0, "test/demo@1.0.0\n", "")
    assert (version_dir(store) / "steps" / "big.bin").stat().st_size == BIG
    assert not any((store / "tmp").iterdir()), "the retry cleans the dead install's stage"


def test_install_of_second_version_killed_leaves_first_intact(make_bundle, run_pyz, pyz,
                                                              store):
    assert run_pyz("install", make_bundle()).returncode == 0
    root = make_bundle(version="2.0.0", files={"steps/big.bin": b""})
    with open(root / "steps" / "big.bin", "r+b") as handle:
        handle.truncate(BIG)
    proc = subprocess.Popen([sys.executable, str(pyz.spell), "install", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while _staged_big_file(store) is None and proc.poll() is None:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate()
    if proc.returncode == 0:
        pytest.skip("the install finished before it could be killed")
    listing = run_pyz("list")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[1:] == ["test/demo@1.0.0\tDemo\tlow\tfalse\thost"]
    assert run_pyz("install", root).returncode == 0


# From git ########################################################################


def _git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def remotes(tmp_path, monkeypatch, store):
    """Bare repositories reachable as ``https://spell.test/<name>.git``."""
    base = tmp_path / "remotes"
    base.mkdir()
    config = tmp_path / "gitconfig"
    config.write_text(
        f'[url "{base.as_uri()}/"]\n\tinsteadOf = https://spell.test/\n'
        "[user]\n\tname = Spell Tests\n\temail = tests@spell.invalid\n"
        "[init]\n\tdefaultBranch = main\n"
        "[advice]\n\tdetachedHead = false\n"
    )
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    return base


def push_repo(remotes, name, bundle, *, tag="v1"):
    """Commit ``bundle`` into a fresh bare repo ``name``; return the commit."""
    work = remotes.parent / f"work-{name}"
    shutil.copytree(bundle, work, symlinks=True)
    _git("init", "-q", cwd=work)
    _git("add", "-A", cwd=work)
    _git("commit", "-q", "-m", "bundle", cwd=work)
    if tag:
        _git("tag", tag, cwd=work)
    bare = remotes / f"{name}.git"
    _git("clone", "-q", "--bare", str(work), str(bare))
    return _git("rev-parse", "HEAD", cwd=work)


@needs_git
@pytest.mark.parametrize("ref", ["main", "v1", "sha"])
def test_install_from_git(make_bundle, remotes, run_cli, store, ref):
    commit = push_repo(remotes, "hello", make_bundle())
    ref = commit if ref == "sha" else ref
    source = f"https://spell.test/hello.git#{ref}"
    assert run_cli("install", source) == (0, "test/demo@1.0.0\n", "")
    record = json.loads((version_dir(store) / "source.json").read_text())
    assert list(record) == ["type", "source", "ref", "commit", "installed_at"]
    assert record == {"type": "git", "source": source, "ref": ref, "commit": commit,
                      "installed_at": record["installed_at"]}
    assert ISO_MS.match(record["installed_at"])
    assert stat.S_IMODE((version_dir(store) / "steps" / "run.sh").stat().st_mode) & 0o100
    assert run_cli("inspect", "test/demo")[0] == 0
    assert store_is_clean(store) is False  # installed
    assert not any((store / "tmp").iterdir())


@needs_git
def test_git_sha_of_an_older_commit(make_bundle, remotes, run_cli, store):
    first = push_repo(remotes, "hist", make_bundle())
    work = remotes.parent / "work-hist"
    (work / "spell.yaml").write_text((work / "spell.yaml").read_text().replace(
        "version: 1.0.0", "version: 2.0.0"))
    _git("commit", "-qam", "two", cwd=work)
    _git("push", "-q", str(remotes / "hist.git"), "main", cwd=work)
    assert run_cli("install", f"https://spell.test/hist.git#{first}")[1] == "test/demo@1.0.0\n"
    assert run_cli("install", "https://spell.test/hist.git#main")[1] == "test/demo@2.0.0\n"


@needs_git
def test_git_requires_a_ref(remotes, run_cli, store):
    message = "git source requires explicit ref (#<ref>)\n"
    assert run_cli("install", "https://spell.test/hello.git") == (1, "", message)
    assert run_cli("install", "https://spell.test/hello.git#") == (1, "", message)
    assert run_cli("install", "git@spell.test:hello.git") == (1, "", message)
    assert run_cli("install", "SSH://spell.test/hello.git") == (1, "", message)


@needs_git
def test_git_clone_failures(make_bundle, remotes, run_cli, store):
    source = "https://spell.test/missing.git#main"
    code, out, err = run_cli("install", source)
    assert code == 1
    assert err.startswith(f"failed to clone git source '{source}': ")
    assert err.count("\n") == 1
    push_repo(remotes, "hello", make_bundle())
    source = "https://spell.test/hello.git#nosuch"
    code, out, err = run_cli("install", source)
    assert code == 1 and err.startswith(f"failed to clone git source '{source}': ")
    sha = "0" * 40
    source = f"https://spell.test/hello.git#{sha}"
    code, out, err = run_cli("install", source)
    assert code == 1 and err.startswith(f"failed to clone git source '{source}': ")
    assert store_is_clean(store)


@needs_git
def test_git_not_on_path(remotes, run_cli, store, monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert run_cli("install", "https://spell.test/hello.git#main") == (
        1, "", "git executable not found: install git and ensure it is on PATH\n")


@needs_git
def test_git_repo_without_manifest(make_bundle, remotes, run_cli, store):
    push_repo(remotes, "empty", make_bundle(files={"spell.yaml": None}))
    code, out, err = run_cli("install", "https://spell.test/empty.git#main")
    assert code == 1
    assert err.startswith("spell.yaml not found: ") and err.endswith("/bundle/spell.yaml\n")
    assert store_is_clean(store)


@needs_git
def test_git_repo_with_symlink_out_of_tree(make_bundle, remotes, run_cli, store):
    bundle = make_bundle()
    os.symlink("/etc/passwd", bundle / "steps" / "passwd")
    push_repo(remotes, "link", bundle)
    code, out, err = run_cli("install", "https://spell.test/link.git#main")
    assert code == 1
    assert err.startswith("symlink is not allowed in steps/: ")
    assert store_is_clean(store)
    bundle = make_bundle(files={"spell.yaml": None})
    os.symlink("/etc/passwd", bundle / "spell.yaml")
    push_repo(remotes, "yaml-link", bundle)
    code, out, err = run_cli("install", "https://spell.test/yaml-link.git#main")
    assert code == 1 and err.startswith("spell.yaml must not be a symlink: ")


@needs_git
@pytest.mark.parametrize(
    "source",
    [
        "https://spell.test/hello.git#--upload-pack=touch {marker}",
        "https://spell.test/hello.git#-u touch {marker}",
        "https://spell.test/hello.git#--config=core.sshCommand=touch {marker}",
        "ssh://-oProxyCommand=touch%20{marker}/x.git#main",
        "git@-oProxyCommand=touch {marker}:x.git#main",
        "https://evil.test/x.git#main",
        "ext::sh -c touch% {marker}#main",
    ],
)
def test_option_like_refs_and_command_transports_are_harmless(
        make_bundle, remotes, run_cli, store, tmp_path, source):
    push_repo(remotes, "hello", make_bundle())
    marker = tmp_path / "pwned"
    config = os.environ["GIT_CONFIG_GLOBAL"]
    with open(config, "a") as handle:
        handle.write(f'[url "ext::sh -c touch% {marker}% #"]\n\tinsteadOf = https://evil.test/\n')
    code, out, err = run_cli("install", source.format(marker=marker))
    assert code == 1
    assert err.count("\n") == 1
    assert not marker.exists()
    assert store_is_clean(store)


@needs_git
def test_invalid_ref_message(remotes, run_cli, store):
    source = "https://spell.test/hello.git#--upload-pack=x"
    assert run_cli("install", source) == (1, "", f"invalid git ref or url in source: {source}\n")
