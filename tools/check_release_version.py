#!/usr/bin/env python3
"""Check that a release tag names the version spell.py declares.

    python3 tools/check_release_version.py v1.2.3 [--source spell.py]

``__version__ = "..."`` in ``spell.py`` is the single source of truth (the
package build reads it through pyproject's dynamic version). The file is read
as text, never imported, so the check needs none of spell's dependencies.
Prints one line and exits 0 when the tag is ``v`` + that version, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: v + a SemVer core version without leading zeros.
TAG_RE = re.compile(r"v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
#: ``__version__ = "1.2.3"`` alone on its line, with an optional comment.
VERSION_LINE_RE = re.compile(
    r"^__version__\s*=\s*"
    r"""(?P<quote>["'])(?P<version>[^"'\n]*)(?P=quote)\s*(?:#.*)?$""",
    re.MULTILINE,
)


class CheckError(Exception):
    """Why the tag cannot be released, as one line."""


def declared_version(source: str) -> str:
    """The version in ``source`` (the path of spell.py), read without importing it."""
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise CheckError(f"cannot read {source}: {exc.strerror}") from None
    found = VERSION_LINE_RE.findall(text)
    if len(found) != 1:
        how_many = "no" if not found else f"{len(found)}"
        raise CheckError(
            f'{source} has {how_many} __version__ = "..." lines, expected one'
        )
    return found[0][1]


def check(tag: str, source: str) -> str:
    """The success line for ``tag``; raises CheckError when it cannot be released."""
    if TAG_RE.fullmatch(tag) is None:
        raise CheckError(
            f"malformed tag {tag!r}: expected v<major>.<minor>.<patch>, e.g. v1.2.3"
        )
    version = declared_version(source)
    if tag != f"v{version}":
        raise CheckError(
            f"tag {tag} does not match spell.__version__ {version!r} in {source}: "
            f'set __version__ = "{tag[1:]}" or tag v{version}'
        )
    return f"tag {tag} matches spell.__version__ {version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check that a release tag (vX.Y.Z) matches spell.__version__."
    )
    parser.add_argument("tag", help="the tag being released, e.g. v1.2.3")
    parser.add_argument(
        "--source",
        default=os.path.join(ROOT, "spell.py"),
        help="the file declaring __version__ (default: spell.py of this checkout)",
    )
    args = parser.parse_args(argv)
    try:
        line = check(args.tag, args.source)
    except CheckError as exc:
        print(f"check_release_version: error: {exc}", file=sys.stderr)
        return 1
    print(line)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
