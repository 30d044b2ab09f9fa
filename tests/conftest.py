"""Shared fixtures for the whole suite; keep this file small and generic.

Fixtures
--------
``store``
    A private, empty store.  Sets ``HOME`` to ``<tmp>/home`` and ``SPELL_HOME``
    to ``<tmp>/home/.spell`` (monkeypatched, so in-process calls and child
    processes both see it) and returns ``SPELL_HOME`` as a ``Path``.  Nothing is
    created inside it: spell creates its folders itself.
``run_cli``
    ``run_cli(*argv) -> (code, out, err)``: runs ``spell.main(list(argv))``
    in-process with ``StringIO`` streams.  Uses ``store``, so a test never
    touches the real home.
``pyz``
    Session-wide: builds ``spell.pyz`` and ``spell_runner.pyz`` once with
    ``build_zipapp.py --out-dir`` into a temp folder and returns
    ``Zipapps(spell=Path, runner=Path)``.
``run_pyz``
    ``run_pyz(*args, env=None, timeout=60, cwd=None, python_flags=(),
    pyz_path=None) -> subprocess.CompletedProcess`` (text, captured): runs
    ``<python> [python_flags] dist/spell.pyz args...`` as a user would.  ``env``
    defaults to the current environment (with the ``store`` fixture's ``HOME``
    and ``SPELL_HOME``); a dict passed in replaces it whole.  Pass
    ``pyz_path=pyz.runner`` to run the runner instead.
``fixtures_dir``
    ``Path`` of ``fixtures/spells`` (the shared fixture bundles).
``make_bundle``
    ``make_bundle(manifest=None, *, yaml_text=None, files=None, dirname=None,
    **fields) -> Path``: writes a valid source bundle under ``tmp_path`` (a
    host bundle ``test/demo@1.0.0`` with ``schema.json`` and one executable
    shell step ``steps/run.sh``) and returns its folder.  ``fields`` replace
    top-level manifest keys; ``manifest`` replaces the whole manifest (dumped
    as YAML); ``yaml_text`` is written verbatim instead; ``files`` maps
    relative paths to ``str``/``bytes`` contents to add, or to ``None`` to
    delete.  ``make_bundle.manifest()`` returns a fresh copy of the base
    manifest to edit.
"""

from __future__ import annotations

import copy
import io
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import spell  # noqa: E402  (needs the path above)


class Zipapps(NamedTuple):
    spell: Path
    runner: Path


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    root = home / ".spell"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SPELL_HOME", str(root))
    return root


@pytest.fixture
def run_cli(store):
    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = spell.main([str(a) for a in argv], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture(scope="session")
def pyz(tmp_path_factory) -> Zipapps:
    out_dir = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "build_zipapp.py"), "--out-dir", str(out_dir)],
        check=True,
        capture_output=True,
    )
    return Zipapps(out_dir / "spell.pyz", out_dir / "spell_runner.pyz")


@pytest.fixture
def run_pyz(store, pyz):
    def run(*args, env=None, timeout=60, cwd=None, python_flags=(), pyz_path=None):
        cmd = [sys.executable, *python_flags, str(pyz_path or pyz.spell)]
        return subprocess.run(
            cmd + [str(a) for a in args],
            env=dict(os.environ) if env is None else env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def fixtures_dir() -> Path:
    return REPO_ROOT / "fixtures" / "spells"


BASE_MANIFEST = {
    "id": "test/demo",
    "version": "1.0.0",
    "name": "Demo",
    "summary": "A demo bundle",
    "inputs_schema": "./schema.json",
    "risk": "low",
    "permissions": [],
    "effects": [{"type": "notify", "target": "stdout", "mutates": False}],
    "billing": {"enabled": False, "mode": "none", "currency": "USD", "max_amount": 0},
    "runtime": {"execution": "host", "platforms": ["linux/amd64", "linux/arm64"]},
    "steps": [{"uses": "shell", "name": "run", "run": "steps/run.sh"}],
    "checks": [{"type": "exit_code"}],
}
BASE_SCHEMA = (
    '{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", '
    '"properties": {"name": {"type": "string"}}, "additionalProperties": true}\n'
)


@pytest.fixture
def make_bundle(tmp_path):
    import yaml

    counter = itertools.count(1)

    def make(manifest=None, *, yaml_text=None, files=None, dirname=None, **fields):
        root = tmp_path / "bundles" / (dirname or f"bundle{next(counter)}")
        (root / "steps").mkdir(parents=True)
        (root / "schema.json").write_text(BASE_SCHEMA)
        step = root / "steps" / "run.sh"
        step.write_text("#!/bin/sh\necho ok\n")
        step.chmod(0o755)
        if yaml_text is None:
            data = copy.deepcopy(BASE_MANIFEST if manifest is None else manifest)
            data.update(fields)
            yaml_text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        target = root / "spell.yaml"
        if isinstance(yaml_text, bytes):
            target.write_bytes(yaml_text)
        else:
            target.write_text(yaml_text, encoding="utf-8")
        for rel, content in (files or {}).items():
            path = root / rel
            if content is None:
                path.unlink()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        return root

    def manifest():
        return copy.deepcopy(BASE_MANIFEST)

    make.manifest = manifest
    return make
