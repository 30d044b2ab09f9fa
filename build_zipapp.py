"""Build ``dist/spell.pyz`` and ``dist/spell_runner.pyz``, byte for byte reproducible.

``spell.pyz`` holds both modules and runs ``spell.main``; ``spell_runner.pyz``
holds the runner alone and is what runner images put on PATH as
``spell-runner``.  Each archive also carries an unchecked hash-based ``.pyc``
per module so start-up skips compiling (zipimport falls back to the source on
another Python version).  Entries are sorted, dated 1980-01-01 and given fixed
permissions, so two builds of the same tree are identical.

Usage: ``python build_zipapp.py [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import marshal
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.abspath(__file__))
SHEBANG = b"#!/usr/bin/env python3\n"
#: The earliest date a zip entry can carry; any fixed date makes builds repeatable.
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
#: -rw-r--r-- for every entry, whatever the checkout's umask.
ENTRY_MODE = 0o644 << 16

MAIN_TEMPLATE = """\
import sys

import {module}

# zipapp's generated __main__ drops the return value; keep the exit status.
sys.exit({module}.main())
"""

#: spell's top-level help is static, so it is rendered at build time: the
#: commonest first call, ``spell.pyz --help``, then costs no module import.
SPELL_MAIN_TEMPLATE = """\
import sys

# Rendered from spell.build_parser() by build_zipapp.py (80 columns).
HELP = {help!r}

if sys.argv[1:] in (["--help"], ["-h"]):
    try:
        sys.stdout.write(HELP)
        sys.stdout.flush()
    except OSError:  # a closed pipe, as the CLI itself answers it
        sys.exit(1)
    sys.exit(0)

import spell

# zipapp's generated __main__ drops the return value; keep the exit status.
sys.exit(spell.main())
"""
#: The help is rendered for this width, whatever the building terminal has.
HELP_COLUMNS = "80"


def render_help() -> str:
    """``spell --help`` as this tree prints it, at ``HELP_COLUMNS`` columns."""
    env = dict(os.environ, COLUMNS=HELP_COLUMNS, LINES="24", PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-c", "import spell, sys; sys.exit(spell.main(['--help']))"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )
    return done.stdout


def _pyc(source: bytes, name: str) -> bytes:
    """An unchecked hash-based pyc (PEP 552) of ``source``."""
    code = compile(source, name, "exec", dont_inherit=True, optimize=0)
    flags = 0b01  # hash-based, check_source off
    source_hash = importlib.util.source_hash(source)
    header = importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + source_hash
    return header + marshal.dumps(code)


def _entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    # Stored, not deflated: inflating the modules cost more start-up time
    # than reading a few hundred extra KiB from the page cache.
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = ENTRY_MODE
    info.create_system = 3  # Unix, so the mode above means what it says
    archive.writestr(info, data)


def build(path: str, modules: list[str], entry_module: str, main_py: str = "") -> None:
    """Write one zipapp holding ``modules`` that runs ``entry_module.main()``.

    ``main_py`` replaces the default ``__main__.py`` when given.
    """
    entries = {}
    for module in modules:
        with open(os.path.join(ROOT, f"{module}.py"), "rb") as handle:
            source = handle.read()
        entries[f"{module}.py"] = source
        entries[f"{module}.pyc"] = _pyc(source, f"{module}.py")
    main_py = main_py or MAIN_TEMPLATE.format(module=entry_module)
    entries["__main__.py"] = main_py.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(entries):
            _entry(archive, name, entries[name])
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(SHEBANG + buffer.getvalue())
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build spell's zipapps.")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "dist"))
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    spell_pyz = os.path.join(args.out_dir, "spell.pyz")
    runner_pyz = os.path.join(args.out_dir, "spell_runner.pyz")
    build(spell_pyz, ["spell", "spell_runner"], "spell",
          SPELL_MAIN_TEMPLATE.format(help=render_help()))
    build(runner_pyz, ["spell_runner"], "spell_runner")
    print(spell_pyz)
    print(runner_pyz)
    return 0


if __name__ == "__main__":
    sys.exit(main())
