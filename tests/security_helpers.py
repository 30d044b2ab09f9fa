"""Shared tools of the security suite (``tests/test_security_*.py``).

Every hostile input must end one of two ways: it works as documented, or it is
refused with one line on stderr and exit status 1. These helpers run the built
``spell.pyz`` the way a user does and check everything around that outcome:

``spell_run``
    ``spell_run(*args, env=None, timeout=20, pyz_path=None, signals=())``
    returns an ``Outcome``: exit status, stdout, stderr, the peak resident
    memory of the process (VmHWM, sampled from /proc while it runs) and the
    seconds it took. The process gets a clean environment (the store's HOME and
    SPELL_HOME, no SPELL_*/CONNECTOR_* of the developer's shell) plus ``env``,
    and a unique ``SECURITY_MARK`` variable that every process it starts
    inherits, so ``leftovers()`` can find them. Output goes to files, never to
    pipes, so a leftover process holding the output cannot hang the test. A
    run past ``timeout`` is killed and fails the test. ``signals`` is a list of
    ``(when, signal)`` sent to the process in order, ``when`` being seconds
    after the previous one (or the start) or a function that says, polled ten
    times a second, that the time has come.
``assert_refused(outcome, message=None, *, prefix=None)``
    Exit 1, nothing on stdout, exactly one line on stderr (equal to
    ``message`` or starting with ``prefix``), no traceback or internal error.
``assert_sane(outcome)``
    What every outcome must satisfy: no traceback or internal error, memory
    under ``MEMORY_BUDGET_KIB``, no process left (checked by ``spell_run``).
``outside``
    A sentinel folder beside the store (``<tmp>/outside``, holding one file)
    and the rest of HOME: ``outside.changes()`` lists what appeared, vanished
    or changed there since the fixture was made.
``cli``
    ``cli(*argv) -> (code, out, err)``: the CLI in-process, for set-up steps
    that are not under test (much faster than a zipapp run).
``api_server``
    ``start(buttons, **options) -> (server, client)``: the Execution API in
    this process, for the few cross-checks of what reaches a receipt.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import spell  # noqa: E402

#: Peak resident memory allowed for a spell process facing hostile input. An
#: ordinary cast peaks near 32 MiB (Python with PyYAML, jsonschema and
#: cryptography loaded); the hostile inputs below are 100 MiB to 1 GiB, so
#: reading or buffering any of them whole would blow through this at once.
MEMORY_BUDGET_KIB = 96 * 1024

#: Variables of the developer's shell that would change what spell does.
_DROPPED_PREFIXES = ("SPELL_", "CONNECTOR_", "COV_CORE_")
_DROPPED_NAMES = ("APP_SECRET", "COVERAGE_PROCESS_START", "DOCKER_HOST")


class Outcome(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    peak_kib: int
    seconds: float


# Processes ##################################################################


def _peak_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+)", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def marked_processes(mark: str) -> list[int]:
    """Live processes whose environment or command line holds ``mark``."""
    found = []
    needle = mark.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if (needle in environ or needle in cmdline) and _alive(int(entry)):
            found.append(int(entry))
    return found


def leftovers(mark: str, grace: float = 1.0) -> list[int]:
    """Processes still running with ``mark`` after ``grace`` seconds; kills them.

    Killed processes die asynchronously, so a short grace avoids counting one
    that SIGKILL has already reached. Whatever is found is killed by pid (the
    test started it) so one failure does not leak into the next test.
    """
    end = time.monotonic() + grace
    while True:
        found = marked_processes(mark)
        if not found or time.monotonic() > end:
            break
        time.sleep(0.02)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return found


# Running the zipapp #########################################################


def clean_env(store: Path, **extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED_NAMES
    }
    env.update(HOME=str(store.parent), SPELL_HOME=str(store))
    env.update(extra)
    return env


@pytest.fixture
def spell_run(pyz, store, tmp_path):
    io_dir = tmp_path / "io"
    io_dir.mkdir()
    counter = iter(range(1_000_000))

    def run(
        *args,
        env=None,
        timeout=20.0,
        pyz_path=None,
        signals=(),
        cwd=None,
        check_leftovers=True,
    ) -> Outcome:
        mark = f"spell-security-{uuid.uuid4().hex}"
        full_env = clean_env(store, SECURITY_MARK=mark, **(env or {}))
        n = next(counter)
        out_path, err_path = io_dir / f"{n}.out", io_dir / f"{n}.err"
        cmd = [sys.executable, str(pyz_path or pyz.spell), *map(str, args)]
        pending = list(signals)
        last_sent = 0.0  # seconds after the start
        next_poll = 0.0
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            began = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        peak = 0
        hung = False
        try:
            while proc.poll() is None:
                peak = max(peak, _peak_kib(proc.pid))
                elapsed = time.monotonic() - began
                while pending:
                    when, signum = pending[0]
                    if callable(when):
                        if elapsed < next_poll:
                            break
                        next_poll = elapsed + 0.1
                        if not when():
                            break
                    elif elapsed - last_sent < when:
                        break
                    proc.send_signal(signum)
                    pending.pop(0)
                    last_sent = elapsed
                if elapsed > timeout:
                    hung = True
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
        seconds = time.monotonic() - began
        outcome = Outcome(
            proc.returncode,
            out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"),
            peak,
            seconds,
        )
        left = leftovers(mark) if check_leftovers else []
        if hung:
            pytest.fail(
                f"spell {' '.join(map(str, args))[:200]} still running after "
                f"{timeout}s (stderr: {outcome.stderr[-300:]!r})"
            )
        assert not left, f"processes left running after spell exited: {left}"
        return outcome

    return run


def assert_sane(outcome: Outcome) -> None:
    assert "Traceback" not in outcome.stderr, outcome.stderr[-2000:]
    assert "internal error" not in outcome.stderr, outcome.stderr[-2000:]
    assert (
        outcome.peak_kib < MEMORY_BUDGET_KIB
    ), f"peak memory {outcome.peak_kib} KiB over {MEMORY_BUDGET_KIB} KiB"


def assert_refused(
    outcome: Outcome,
    message: str | None = None,
    *,
    prefix: str | None = None,
    stdout: str | None = "",
) -> None:
    """Exit 1 with exactly one line on stderr, and nothing else went wrong."""
    assert_sane(outcome)
    assert outcome.returncode == 1, (outcome.returncode, outcome.stderr[-500:])
    assert (
        outcome.stderr.endswith("\n") and outcome.stderr.count("\n") == 1
    ), outcome.stderr[-2000:]
    if message is not None:
        assert outcome.stderr == message + "\n"
    if prefix is not None:
        assert outcome.stderr.startswith(prefix), outcome.stderr
    if stdout is not None:
        assert outcome.stdout == stdout, outcome.stdout[-500:]


def assert_ok(outcome: Outcome) -> None:
    assert_sane(outcome)
    assert outcome.returncode == 0, outcome.stderr[-2000:]


# What spell may touch #######################################################


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict:
    """Every entry under ``root`` (links not followed): its type, size and mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in dirs + files:
            path = here / name
            info = path.lstat()
            found[str(path.relative_to(root))] = (
                info.st_mode,
                info.st_size,
                info.st_mtime_ns,
            )
    return found


class Outside:
    """The sentinel folder beside HOME and the rest of HOME outside the store."""

    def __init__(self, tmp_path: Path, store: Path):
        self.root = tmp_path / "outside"
        self.root.mkdir(exist_ok=True)
        (self.root / "sentinel.txt").write_text("untouched\n")
        self.home = store.parent
        self.store = store
        self._before = self._state()

    def _state(self) -> dict:
        return {
            "outside": snapshot(self.root),
            "home": snapshot(self.home, skip=(self.store,)),
        }

    def changes(self) -> dict:
        before, after = self._before, self._state()
        diff = {}
        for area in before:
            names = set(before[area]) | set(after[area])
            changed = sorted(
                n for n in names if before[area].get(n) != after[area].get(n)
            )
            if changed:
                diff[area] = changed
        return diff


@pytest.fixture
def outside(tmp_path, store) -> Outside:
    return Outside(tmp_path, store)


# In-process set-up ##########################################################


@pytest.fixture
def cli(store, monkeypatch):
    for key in list(os.environ):
        if key.startswith(_DROPPED_PREFIXES) or key in _DROPPED_NAMES:
            monkeypatch.delenv(key)

    def run(*argv) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = spell.main([str(a) for a in argv], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    return run


def installed(cli, bundle: Path) -> None:
    code, _, err = cli("install", bundle)
    assert code == 0, err


def sparse_file(path: Path, size: int = 1 << 30) -> Path:
    """A file of ``size`` bytes (1 GiB by default) that takes no disk space."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def log_texts(store: Path) -> str:
    """Every execution log of the store, concatenated."""
    logs = store / "logs"
    if not logs.is_dir():
        return ""
    return "".join(p.read_text(encoding="utf-8") for p in sorted(logs.glob("*.json")))


# The Execution API ##########################################################


@pytest.fixture
def api_server(cli, tmp_path):
    """``start(buttons, **options) -> (server, client)``: the API in this process.

    ``buttons`` are registry entries (``api_helpers.button``); the server
    listens on 127.0.0.1 and is closed after the test.
    """
    from api_helpers import Client, write_registry

    servers = []

    def start(buttons, **options):
        registry = write_registry(tmp_path, buttons, name="security-registry.json")
        options.setdefault("quiet", True)
        server = spell.start_execution_api_server(registryPath=str(registry), **options)
        servers.append(server)
        keys = options.get("authKeys") or []
        token = keys[0].split("=", 1)[1] if keys else None  # "role=token"
        return server, Client(server, token=token)

    yield start
    for server in servers:
        server.close(cancel=True)
