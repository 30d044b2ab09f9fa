#!/usr/bin/env python3
"""Tag the tip of a branch, in a local clone and/or on GitHub.

Input ($INPUT_JSON): ``branch`` (required), ``tag``, ``path`` (a local clone),
``repository`` (``owner/name``) and ``push``. With ``path`` the tag is created
in that clone. With ``repository`` the step prints the GitHub REST requests
that create the tag, and sends them when ``push`` is true.

The token comes from CONNECTOR_GITHUB_TOKEN (spell refuses to start the cast
without it) and is never printed. The API address comes from GITHUB_API_URL
(default https://api.github.com), an operator setting, never an input: whoever
chooses that address receives the token. Plain http is refused except to a
loopback address.
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone

DEFAULT_API_URL = "https://api.github.com"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: GitHub answers within seconds; do not hang until the step timeout.
REQUEST_TIMEOUT_S = 20


class Failure(Exception):
    """A reason to stop, printed as one line on stderr."""


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would carry the token to another address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def git(path, *args):
    try:
        done = subprocess.run(
            ["git", "-C", path, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise Failure("git is not installed on this host") from None
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()
        reason = detail[-1] if detail else f"exit code {done.returncode}"
        raise Failure(f"git {args[0]} failed: {reason}")
    return done.stdout.strip()


def tag_locally(path, branch, tag):
    """Create a lightweight tag at the branch tip; return the commit."""
    if not os.path.isdir(path):
        raise Failure(f"not a folder: {path}")
    try:
        ref = f"refs/heads/{branch}^{{commit}}"
        sha = git(path, "rev-parse", "--verify", "--quiet", ref)
    except Failure:
        raise Failure(f"no branch {branch} in {path}") from None
    git(path, "check-ref-format", f"refs/tags/{tag}")
    git(path, "tag", "--no-sign", tag, sha)
    print(f"tagged {branch} at {sha} as {tag} in {path}")
    return sha


def api_base():
    base = os.environ.get("GITHUB_API_URL", "").strip() or DEFAULT_API_URL
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme == "https" or (
        parsed.scheme == "http" and parsed.hostname in LOOPBACK_HOSTS
    ):
        return base.rstrip("/")
    raise Failure(
        f"GITHUB_API_URL must be https (or http to a loopback address): {base}"
    )


def send(method, url, token, body=None):
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("accept", "application/vnd.github+json")
    request.add_header("authorization", f"Bearer {token}")
    request.add_header("x-github-api-version", "2022-11-28")
    request.add_header("user-agent", "spell-samples-repo-ops")
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        opener = urllib.request.build_opener(NoRedirects)
        with opener.open(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read().decode("utf-8") or "null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read().decode("utf-8")).get("message", "")
        except (ValueError, AttributeError, UnicodeDecodeError):
            message = ""
        detail = f": {message}" if isinstance(message, str) and message else ""
        raise Failure(f"github answered {exc.code} to {method} {url}{detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Failure(f"github request failed: {method} {url}: {reason}") from None


def tag_on_github(repository, branch, tag, sha, token, push):
    base = f"{api_base()}/repos/{repository}"
    shown = "authenticated by CONNECTOR_GITHUB_TOKEN"
    if sha is None:
        url = f"{base}/git/ref/heads/{urllib.parse.quote(branch)}"
        if not push:
            print(f"would send: GET {url}  ({shown})")
        else:
            found = send("GET", url, token)
            target = found.get("object") if isinstance(found, dict) else None
            sha = target.get("sha") if isinstance(target, dict) else None
            if not isinstance(sha, str):
                raise Failure(f"github did not return a commit for branch {branch}")
    body = {"ref": f"refs/tags/{tag}", "sha": sha or "<the commit from the GET above>"}
    url = f"{base}/git/refs"
    if not push:
        print(f"would send: POST {url} {json.dumps(body)}  ({shown})")
        print("push is false: nothing was sent to GitHub")
        return
    send("POST", url, token, body)
    print(f"created refs/tags/{tag} on {repository} at {sha}")


def main():
    with open(os.environ["INPUT_JSON"], encoding="utf-8") as handle:
        given = json.load(handle)
    token = os.environ.get("CONNECTOR_GITHUB_TOKEN", "").strip()
    if not token:
        raise Failure("CONNECTOR_GITHUB_TOKEN is empty")
    branch = given["branch"]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tag = given.get("tag") or f"{branch.replace('/', '-')}-{stamp}"
    path, repository = given.get("path"), given.get("repository")
    if not path and not repository:
        raise Failure(
            "nothing to do: give 'path' (a local clone), 'repository' (owner/name) or both"
        )
    sha = tag_locally(path, branch, tag) if path else None
    if repository:
        tag_on_github(repository, branch, tag, sha, token, bool(given.get("push")))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as exc:
        print(f"repo-ops: {exc}", file=sys.stderr)
        sys.exit(1)
