#!/usr/bin/env python3
"""Build the site: write artifacts/site/index.html under the working folder.

The working folder is the bundle's (the installed copy on the host, a copy
inside the container in docker mode), so the page lands where the manifest's
``file_exists`` check looks for it.
"""

import html
import json
import os
from datetime import datetime, timezone

SITE_DIR = os.path.join("artifacts", "site")

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
</head>
<body>
<main>
<h1>{title}</h1>
<p>{message}</p>
<p><small>{site_name}, built {built_at}</small></p>
</main>
</body>
</html>
"""


def main():
    with open(os.environ["INPUT_JSON"], encoding="utf-8") as handle:
        given = json.load(handle)
    site_name = given["site_name"]
    page = PAGE.format(
        title=html.escape(given.get("title") or site_name),
        message=html.escape(given.get("message") or "Published with spell."),
        site_name=html.escape(site_name),
        built_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    )
    os.makedirs(SITE_DIR, exist_ok=True)
    target = os.path.join(SITE_DIR, "index.html")
    partial = os.path.join("artifacts", ".index.html.partial")  # outside the site
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(page)
    os.replace(partial, target)
    print(f"built {os.path.abspath(target)} ({len(page.encode('utf-8'))} bytes)")


if __name__ == "__main__":
    main()
