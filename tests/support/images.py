#!/usr/bin/env python3
"""Build the docker images the tests run spell bundles in, without Docker Hub.

This machine reaches Debian's package archive but no image registry, so the
base image is assembled from Debian packages: ``apt-get download`` fetches
python3.11, dash, coreutils, sed, grep and the libraries they load;
``dpkg-deb -x`` unpacks them into a root folder; a few files are added (a
``nonroot`` user with uid/gid 65532, ``/tmp``, a ``python3`` link, the
precompiled standard library); and ``docker import`` turns the folder into
``spell-base:<hash>``.

The runner image ``spell-runner-test:<hash>`` is that base plus a given
``spell_runner.pyz``, installed as ``/usr/local/lib/spell_runner.pyz`` with a
``/usr/local/bin/spell-runner`` shell wrapper (so the zipapp's own shebang
does not matter). The command line also tags it ``spell-runner-test:latest``,
the image that ``fixtures/spells/docker`` names.

Both tags are content hashes of their inputs (package versions and
checksums, the recipe, the pyz bytes), and an image whose tag already exists
is not built again. Downloaded packages are kept in ``/tmp/spell-image-cache``
(override with ``SPELL_IMAGE_CACHE``). Builds are serialised with a lock file,
so parallel test processes may call the ``ensure_*`` functions safely.

Docker commands go to ``$DOCKER_HOST``; when it is unset and no default
engine socket exists, to the private engine of tests/support/docker-engine.sh
if its socket is there (see ``engine_env()``).

Used by the tests (``require_engine()``, ``ensure_base_image()``,
``ensure_runner_image(pyz)``, ``bridge_gateway()``) and from the shell::

    python3 tests/support/images.py [--pyz dist/spell_runner.pyz] [--base]

which prints the tag. Standard library only; building needs root (chroot,
chown) and apt.
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Constants ##################################################################

#: Bump when the recipe changes in a way the inputs below do not show.
RECIPE_VERSION = "1"

BASE_REPO = "spell-base"
RUNNER_REPO = "spell-runner-test"

#: The closure of python3.11, dash, coreutils, sed and grep, found with
#: ``apt-cache depends --recurse --no-recommends`` and trimmed of what only
#: package management needs (dpkg, perl, tar, install-info). Every shared
#: library that the interpreter's extension modules load is here, so json,
#: ssl, ctypes, sqlite3, readline, lzma, bz2 and uuid all import.
BASE_PACKAGES = (
    # interpreter and standard library
    "python3.11", "python3.11-minimal",
    "libpython3.11-minimal", "libpython3.11-stdlib", "media-types",
    # shell and basic commands for shell steps (sh, sleep, echo, cat, id,
    # env, sed, grep)
    "dash", "coreutils", "debianutils", "sed", "grep",
    # C runtime
    "libc6", "libgcc-s1", "gcc-12-base", "libcrypt1",
    # libraries of coreutils
    "libacl1", "libattr1", "libgmp10", "libselinux1", "libpcre2-8-0",
    "libssl3",
    # libraries of the python extension modules
    "zlib1g", "libexpat1", "libffi8", "libbz2-1.0", "liblzma5",
    "libsqlite3-0", "libncursesw6", "libtinfo6",
    "libreadline8", "readline-common", "libuuid1", "libdb5.3",
    "libnsl2", "libtirpc3", "libtirpc-common", "libgssapi-krb5-2",
    "libkrb5-3", "libkrb5support0", "libk5crypto3", "libcom-err2",
    "libkeyutils1",
)

#: Folders dropped from the root folder: documentation only.
PRUNE_DIRS = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/lintian", "usr/share/bug",
)

NONROOT_UID = 65532

ETC_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    f"nonroot:x:{NONROOT_UID}:{NONROOT_UID}:nonroot:/home/nonroot:/bin/sh\n"
)
ETC_GROUP = (
    "root:x:0:\n"
    "nogroup:x:65534:\n"
    f"nonroot:x:{NONROOT_UID}:\n"
)

#: ``docker import --change`` lines for the base image. The default user
#: stays root, as in most images; spell passes ``--user 65532:65532``.
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "ENV PYTHONDONTWRITEBYTECODE=1",
    'CMD ["python3"]',
)

RUNNER_WRAPPER = (
    "#!/bin/sh\n"
    "exec python3 /usr/local/lib/spell_runner.pyz \"$@\"\n"
)

RUNNER_DOCKERFILE = (
    "FROM {base}\n"
    "COPY spell_runner.pyz /usr/local/lib/spell_runner.pyz\n"
    "COPY spell-runner /usr/local/bin/spell-runner\n"
)

APT_QUIET = ("-q", "-o", "APT::Sandbox::User=root")

#: The socket of the private engine that tests/support/docker-engine.sh starts.
PRIVATE_ENGINE = "/tmp/spell-dockerd/docker.sock"
DEFAULT_ENGINE = "/var/run/docker.sock"


def cache_dir() -> Path:
    """Where packages and the build lock live."""
    return Path(os.environ.get("SPELL_IMAGE_CACHE", "/tmp/spell-image-cache"))


# Errors and process helpers #################################################

class ImageError(Exception):
    """An image could not be built; the message says which step failed."""


def engine_env(environ=None) -> dict:
    """A copy of *environ* whose DOCKER_HOST points at an engine, if known.

    An explicit DOCKER_HOST wins; otherwise the default socket; otherwise the
    private engine's socket when it exists.
    """
    env = dict(os.environ if environ is None else environ)
    if not env.get("DOCKER_HOST") and not os.path.exists(DEFAULT_ENGINE):
        private = os.environ.get("SPELL_DOCKERD_DIR")
        sock = (os.path.join(private, "docker.sock") if private
                else PRIVATE_ENGINE)
        if os.path.exists(sock):
            env["DOCKER_HOST"] = f"unix://{sock}"
    return env


def _run(cmd, *, cwd=None, env=None, stdin=None):
    """Run *cmd*, return its stdout as text; raise ImageError on failure."""
    if env is None and cmd[0] == "docker":
        env = engine_env()
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, stdin=stdin if stdin is not None
            else subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ImageError(f"command not found: {cmd[0]}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ImageError(
            f"{' '.join(map(str, cmd[:3]))} ... failed "
            f"(exit {proc.returncode}): {detail}")
    return proc.stdout


def docker_available() -> bool:
    """True when ``docker info`` answers (with ``engine_env()``)."""
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            env=engine_env(), stdin=subprocess.DEVNULL, capture_output=True,
            timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def require_engine() -> dict:
    """For tests: return ``engine_env()`` if an engine answers, else stop.

    Under ``CI=true`` a missing engine fails the test (tests/run.sh makes
    docker mandatory there); elsewhere the test is skipped with the reason.
    """
    import pytest

    if docker_available():
        return engine_env()
    reason = ("no docker engine answers: run "
              "'bash tests/support/docker-engine.sh start' and export the "
              "DOCKER_HOST it prints (or use tests/run.sh)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true needs docker: {reason}")
    pytest.skip(reason)


def bridge_gateway() -> str:
    """The host's address on the engine's default bridge network.

    A container started with ``--network bridge`` reaches this machine at
    that address (and nothing beyond it with tests/support/docker-engine.sh),
    so a test server meant for such a container binds there, not to 127.0.0.1.
    """
    out = _run(["docker", "network", "inspect", "bridge", "--format",
                "{{range .IPAM.Config}}{{.Gateway}} {{end}}"])
    for address in out.split():
        if "." in address:
            return address
    raise ImageError("the bridge network has no IPv4 gateway")


def image_exists(tag: str) -> bool:
    """True when the engine has an image called *tag*."""
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag],
        env=engine_env(), stdin=subprocess.DEVNULL, capture_output=True)
    return proc.returncode == 0


@contextlib.contextmanager
def _build_lock():
    """Hold an exclusive lock on the cache folder while building."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Debian packages ############################################################

def parse_apt_records(text: str) -> list:
    """Parse ``apt-cache show`` output into dicts of the fields we use."""
    records, current = [], {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if current:
                records.append(current)
            current = {}
        elif not line.startswith(" ") and ":" in line:
            key, _, value = line.partition(":")
            if key in ("Package", "Version", "Architecture", "SHA256"):
                current[key] = value.strip()
    return records


def _lists_fingerprint(packages) -> str:
    """A digest of the apt package lists' names, sizes and mtimes."""
    digest = hashlib.sha256("\0".join(packages).encode())
    lists = Path("/var/lib/apt/lists")
    for path in sorted(lists.glob("*Packages*")):
        info = path.stat()
        digest.update(f"{path.name}:{info.st_size}:{info.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()


def package_records(packages=BASE_PACKAGES) -> list:
    """Return the candidate version and checksum of every package.

    ``apt-cache show`` takes a second here (this machine keeps no apt binary
    cache), so the answer is remembered in the cache folder until the
    package lists change. Runs ``apt-get update`` once if the lists do not
    know the packages yet (a fresh machine has no lists).
    """
    memo = cache_dir() / "apt-records.json"
    key = _lists_fingerprint(packages)
    try:
        saved = json.loads(memo.read_text())
        if saved.get("key") == key:
            return saved["records"]
    except (OSError, ValueError, AttributeError):
        pass
    records = _query_apt(packages)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": _lists_fingerprint(packages),
                               "records": records}))
    os.replace(tmp, memo)
    return records


def _query_apt(packages) -> list:
    cmd = ["apt-cache", "show", "--no-all-versions", *packages]
    try:
        text = _run(cmd)
    except ImageError:
        _run(["apt-get", *APT_QUIET, "update"])
        text = _run(cmd)
    records = parse_apt_records(text)
    found = {r.get("Package") for r in records}
    missing = sorted(set(packages) - found)
    if missing:
        raise ImageError(f"no Debian candidate for: {', '.join(missing)}")
    if any("SHA256" not in r or "Version" not in r for r in records):
        raise ImageError("apt-cache show gave a record without SHA256")
    return sorted(records, key=lambda r: r["Package"])


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_packages(records) -> list:
    """Download what the cache lacks; return the .deb paths in order.

    Files are stored under their SHA256, so a new version never overwrites an
    old one and a damaged download is noticed.
    """
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    wanted = {r["SHA256"]: r for r in records}
    missing = [r for sha, r in wanted.items()
               if not (debs / f"{sha}.deb").is_file()]
    if missing:
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            names = [f"{r['Package']}={r['Version']}" for r in missing]
            _run(["apt-get", *APT_QUIET, "download", *names], cwd=tmp)
            for path in Path(tmp).glob("*.deb"):
                sha = _sha256_file(path)
                if sha in wanted:
                    os.replace(path, debs / f"{sha}.deb")
    paths = []
    for record in records:
        path = debs / f"{record['SHA256']}.deb"
        if not path.is_file() or _sha256_file(path) != record["SHA256"]:
            path.unlink(missing_ok=True)
            raise ImageError(f"download of {record['Package']} failed")
        paths.append(path)
    return paths


# Base image #################################################################

def base_image_tag(records) -> str:
    """The content-addressed tag of the base image for *records*."""
    recipe = {
        "recipe": RECIPE_VERSION,
        "packages": [[r["Package"], r["Version"], r["SHA256"]]
                     for r in records],
        "passwd": ETC_PASSWD, "group": ETC_GROUP,
        "changes": BASE_CHANGES, "prune": PRUNE_DIRS,
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return f"{BASE_REPO}:{hashlib.sha256(blob).hexdigest()[:16]}"


def _symlink(target: str, link: Path) -> None:
    if not link.exists() and not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)


def assemble_rootfs(debs, rootfs: Path) -> None:
    """Unpack *debs* into *rootfs* and add what a package install would."""
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(rootfs)])
    for rel in PRUNE_DIRS:
        shutil.rmtree(rootfs / rel, ignore_errors=True)

    # Links that maintainer scripts or python3-minimal would have made.
    _symlink("python3.11", rootfs / "usr/bin/python3")
    _symlink("dash", rootfs / "bin/sh")
    _symlink("which.debianutils", rootfs / "usr/bin/which")

    etc = rootfs / "etc"
    (etc / "passwd").write_text(ETC_PASSWD)
    (etc / "group").write_text(ETC_GROUP)
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\n"
                                       "hosts: files dns\n")
    for rel in ("root", "spell", "spell-work", "home/nonroot"):
        (rootfs / rel).mkdir(parents=True, exist_ok=True)
    os.chown(rootfs / "home/nonroot", NONROOT_UID, NONROOT_UID)
    (rootfs / "root").chmod(0o700)
    for rel in ("tmp", "var/tmp"):
        (rootfs / rel).mkdir(parents=True, exist_ok=True)
        (rootfs / rel).chmod(0o1777)

    # The loader cache, so libraries in /usr/lib/<triplet> are found however
    # the loader was configured.
    _run(["ldconfig", "-r", str(rootfs)])
    # Precompile the standard library with the image's own interpreter: the
    # root is read-only at run time, so nothing could be cached later.
    _run(["chroot", str(rootfs), "/usr/bin/python3.11", "-m", "compileall",
          "-q", "/usr/lib/python3.11"])


def _docker_import(rootfs: Path, tag: str, changes) -> None:
    """Import *rootfs* as *tag*: ``tar -c . | docker import - tag``."""
    cmd = ["docker", "import"]
    for change in changes:
        cmd += ["--change", change]
    cmd += ["-", tag]
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _run(cmd, stdin=tar.stdout)
    finally:
        tar.stdout.close()
        if tar.wait() != 0:
            raise ImageError(f"tar of {rootfs} failed")


def ensure_base_image() -> str:
    """Return the base image's tag, building it first if needed."""
    records = package_records()
    tag = base_image_tag(records)
    if image_exists(tag):
        return tag
    with _build_lock():
        if image_exists(tag):
            return tag
        debs = fetch_packages(records)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            rootfs = Path(tmp) / "rootfs"
            rootfs.mkdir()
            assemble_rootfs(debs, rootfs)
            _docker_import(rootfs, tag, BASE_CHANGES)
    return tag


# Runner image ###############################################################

def runner_image_tag(base: str, pyz: bytes) -> str:
    """The content-addressed tag of base + *pyz*."""
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, base, RUNNER_WRAPPER, RUNNER_DOCKERFILE):
        digest.update(part.encode() + b"\0")
    digest.update(pyz)
    return f"{RUNNER_REPO}:{digest.hexdigest()[:16]}"


def ensure_runner_image(pyz_path, *, latest: bool = False) -> str:
    """Return the tag of base + *pyz_path*, building it first if needed.

    With *latest*, ``spell-runner-test:latest`` is pointed at it too; the
    command line does that for the real runner, tests should not (another
    test may be using ``latest``).
    """
    pyz_path = Path(pyz_path)
    if not pyz_path.is_file():
        raise ImageError(f"zipapp not found: {pyz_path}")
    pyz = pyz_path.read_bytes()
    base = ensure_base_image()
    tag = runner_image_tag(base, pyz)
    if not image_exists(tag):
        with _build_lock():
            if not image_exists(tag):
                _build_runner(base, pyz, tag)
    if latest:
        _run(["docker", "tag", tag, f"{RUNNER_REPO}:latest"])
    return tag


def _build_runner(base: str, pyz: bytes, tag: str) -> None:
    """``docker build`` a one-layer image from a local context, offline."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as ctx:
        ctx = Path(ctx)
        (ctx / "Dockerfile").write_text(RUNNER_DOCKERFILE.format(base=base))
        (ctx / "spell_runner.pyz").write_bytes(pyz)
        (ctx / "spell_runner.pyz").chmod(0o644)
        (ctx / "spell-runner").write_text(RUNNER_WRAPPER)
        (ctx / "spell-runner").chmod(0o755)
        # The classic builder needs no buildx plugin and no network for a
        # FROM that is already local.
        env = dict(engine_env(), DOCKER_BUILDKIT="0")
        _run(["docker", "build", "-q", "-t", tag, str(ctx)], env=env)


# Command line ###############################################################

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="images.py",
        description="Build (or reuse) the test images and print the tag.")
    parser.add_argument(
        "--pyz", metavar="PATH",
        help="build the runner image from this spell_runner.pyz "
             "(default: dist/spell_runner.pyz if it exists)")
    parser.add_argument(
        "--base", action="store_true",
        help="build and print only the base image")
    args = parser.parse_args(argv)

    pyz = args.pyz
    if pyz is None and not args.base:
        default = Path(__file__).resolve().parents[2] / "dist/spell_runner.pyz"
        if not default.is_file():
            print(f"images.py: error: {default} not found; "
                  "run build_zipapp.py or pass --pyz or --base",
                  file=sys.stderr)
            return 1
        pyz = default
    try:
        if args.base:
            tag = ensure_base_image()
        else:
            tag = ensure_runner_image(pyz, latest=True)
    except ImageError as exc:
        print(f"images.py: error: {exc}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
