#!/usr/bin/env python3
"""Publish the built site and record what was published.

With ``target_dir`` the site folder replaces ``<target_dir>/<site_name>``: it
is copied beside the live copy first and swapped in with renames, so readers
see the old site or the new one, never half of each. Either way
``artifacts/publish.json`` lists every file with its size and SHA-256.
"""

import hashlib
import json
import os
import shutil
import sys
from datetime import datetime, timezone

SITE_DIR = os.path.join("artifacts", "site")
RECORD = os.path.join("artifacts", "publish.json")


def digest(path):
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            sha.update(block)
    return sha.hexdigest()


def site_files():
    files = []
    for folder, _, names in os.walk(SITE_DIR):
        for name in names:
            path = os.path.join(folder, name)
            files.append(
                {
                    "path": os.path.relpath(path, SITE_DIR),
                    "bytes": os.path.getsize(path),
                    "sha256": digest(path),
                }
            )
    return sorted(files, key=lambda entry: entry["path"])


def replace_folder(source, live):
    """Copy ``source`` to ``live``, swapping the old copy out in one rename."""
    parent, name = os.path.split(live)
    incoming = os.path.join(parent, f".{name}.incoming-{os.getpid()}")
    outgoing = os.path.join(parent, f".{name}.outgoing-{os.getpid()}")
    shutil.copytree(source, incoming)
    if os.path.isdir(live):
        os.rename(live, outgoing)
    os.rename(incoming, live)
    shutil.rmtree(outgoing, ignore_errors=True)


def main():
    with open(os.environ["INPUT_JSON"], encoding="utf-8") as handle:
        given = json.load(handle)
    if not os.path.isfile(os.path.join(SITE_DIR, "index.html")):
        print(
            "publish: nothing built: artifacts/site/index.html is missing",
            file=sys.stderr,
        )
        return 1
    destination = None
    target_dir = given.get("target_dir")
    if target_dir:
        if not os.path.isdir(target_dir):
            print(f"publish: target_dir is not a folder: {target_dir}", file=sys.stderr)
            return 1
        destination = os.path.join(target_dir, given["site_name"])
        replace_folder(SITE_DIR, destination)
    files = site_files()
    record = {
        "site_name": given["site_name"],
        "published_to": destination,
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    with open(RECORD + ".partial", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    os.replace(RECORD + ".partial", RECORD)
    where = destination or "nowhere (no target_dir): the site is only built"
    print(f"published {len(files)} file(s) to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
