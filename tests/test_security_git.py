"""Security: a git source can neither run commands nor reach outside its tree.

tests/test_install.py covers refs and URLs that look like options, the ``ext::``
transport and symlinked step files; these cover what a hostile repository can
hold besides: submodules with command transports, a symlinked ``steps``
folder or schema, and control characters in the source.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from security_helpers import *  # noqa: F401,F403  (fixtures)
from security_helpers import assert_ok, assert_refused

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None, reason="git is not installed"
)


def git(*args, cwd=None) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


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
        '[protocol "file"]\n\tallow = always\n'
    )
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    return base


def publish(remotes, name, bundle, prepare=None) -> str:
    """Commit ``bundle`` (after ``prepare(work)``) to a bare repo; return the source."""
    work = remotes.parent / f"work-{name}"
    shutil.copytree(bundle, work, symlinks=True)
    git("init", "-q", cwd=work)
    if prepare:
        prepare(work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "bundle", cwd=work)
    git("clone", "-q", "--bare", str(work), str(remotes / f"{name}.git"))
    return f"https://spell.test/{name}.git#main"


def git_env() -> dict:
    return {
        key: os.environ[key] for key in ("GIT_CONFIG_GLOBAL", "GIT_CONFIG_NOSYSTEM")
    }


def test_submodule_with_a_command_transport_is_never_fetched(
    make_bundle, remotes, spell_run, store, tmp_path
):
    mark = tmp_path / "pwned"

    def add_submodule(work):
        (work / ".gitmodules").write_text(
            '[submodule "steps/lib"]\n\tpath = steps/lib\n'
            f"\turl = ext::sh -c touch% {mark}% >&2\n"
        )
        git(
            "update-index",
            "--add",
            "--cacheinfo",
            f"160000,{'1' * 40},steps/lib",
            cwd=work,
        )

    source = publish(remotes, "sub", make_bundle(), add_submodule)
    result = spell_run("install", source, env=git_env())
    assert_ok(result)
    assert result.stdout == "test/demo@1.0.0\n"
    assert not mark.exists()


@pytest.mark.parametrize("name", ["steps", "schema.json"])
def test_repository_whose_steps_or_schema_is_a_symlink_out_of_the_tree_is_refused(
    name, make_bundle, remotes, spell_run, store, outside
):
    bundle = make_bundle()
    target = outside.root / name
    shutil.move(bundle / name, target)
    os.symlink(target, bundle / name)
    outside.__init__(
        outside.root.parent, store
    )  # the moved file is part of the baseline
    result = spell_run("install", publish(remotes, "link", bundle), env=git_env())
    assert_refused(result, prefix="symlink is not allowed: ")
    assert result.stderr.rstrip("\n").endswith(f"/bundle/{name}")
    assert not (store / "spells").exists() or not os.listdir(store / "spells")
    assert outside.changes() == {}


@pytest.mark.parametrize(
    "source",
    [
        "https://spell.test/hello.git#main\n--upload-pack=touch {mark}",
        "https://spell.test/hello.git#main\x1b[2J",
        "https://spell.test/hel\nlo.git#main",
    ],
)
def test_source_with_control_characters_is_refused_in_one_escaped_line(
    source, make_bundle, remotes, spell_run, store, tmp_path
):
    publish(remotes, "hello", make_bundle())
    mark = tmp_path / "pwned"
    source = source.format(mark=mark)
    result = spell_run("install", source, env=git_env())
    assert_refused(result)
    assert "\x1b" not in result.stderr
    assert not mark.exists()
    assert not (store / "spells").exists() or not os.listdir(store / "spells")
