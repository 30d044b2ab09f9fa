"""Security: nothing a step starts outlives its cast, which never overruns its deadline.

Steps here fight back: grandchildren that ignore SIGTERM, that call
``setsid()``, that hold the output pipes, daemons that double-fork. After an
interrupt (SIGINT or SIGTERM to ``spell cast``, even several in a row), an
execution timeout or a successful end, ``spell_run`` finds no process that
inherited the run's mark, and in docker mode no container is left. Step and
execution timeouts of shell steps have their own tests (tests/test_cast.py,
tests/test_runner.py).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from security_helpers import *  # noqa: F401,F403  (fixtures)
from security_helpers import (
    assert_ok,
    assert_refused,
    assert_sane,
    installed,
    log_texts,
)

TESTS = __import__("pathlib").Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from support import images  # noqa: E402

#: A step whose descendants resist: one ignores SIGTERM and SIGINT in the step's
#: group, one leaves the session and holds stdout, one double-forks into a
#: daemon. The step itself ignores both signals too.
STUBBORN = """#!/bin/sh
trap '' TERM INT
( trap '' TERM INT; exec sleep 300 ) &
setsid sh -c "trap '' TERM INT; exec sleep 300" &
python3 -c 'import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork(): os._exit(0)
os.setsid()
if os.fork(): os._exit(0)
time.sleep(300)' &
echo started
[ -z "$READY" ] || touch "$READY"
sleep 300
"""


def ready_file(tmp_path):
    """(environment, trigger): the step touches READY once its children run."""
    path = tmp_path / "ready"
    return {"READY": str(path)}, path.exists


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_cast_stops_every_process_the_step_started(
    signum, make_bundle, cli, spell_run, store, tmp_path
):
    installed(cli, make_bundle(files={"steps/run.sh": STUBBORN}))
    env, ready = ready_file(tmp_path)
    result = spell_run(
        "cast",
        "test/demo",
        "--allow-unsigned",
        env=env,
        signals=[(ready, signum)],
        timeout=15,
    )
    assert_refused(result, "cast interrupted", stdout=None)
    log = json.loads(log_texts(store))
    assert log["error"] == "cast interrupted" and log["success"] is False


def test_burst_of_sigterm_during_the_cleanup_leaves_nothing_running(
    make_bundle, cli, spell_run, tmp_path
):
    """A second signal used to cut the sweep after the first one short."""
    many = STUBBORN.replace(
        "echo started",
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do\n"
        "  setsid sh -c \"trap '' TERM INT; exec sleep 300\" &\ndone\necho started",
    )
    installed(cli, make_bundle(files={"steps/run.sh": many}))
    env, ready = ready_file(tmp_path)
    burst = [(ready, signal.SIGTERM)] + [(0.003, signal.SIGTERM)] * 150
    result = spell_run(
        "cast", "test/demo", "--allow-unsigned", env=env, signals=burst, timeout=15
    )
    assert_sane(result)  # and spell_run found nothing left running
    assert result.returncode != 0


def test_daemon_started_by_a_successful_step_does_not_outlive_the_cast(
    make_bundle, cli, spell_run
):
    step = STUBBORN.replace("sleep 300\n", "exit 0\n").replace(
        "exec sleep 300", "sleep 300"
    )
    installed(
        cli,
        make_bundle(
            files={
                "steps/run.sh": step.replace(
                    "( trap", "exec >/dev/null 2>&1 </dev/null\n( trap"
                )
            }
        ),
    )
    result = spell_run("cast", "test/demo", "--allow-unsigned", timeout=10)
    assert_ok(result)
    assert result.seconds < 5


def test_execution_timeout_bounds_an_http_status_check(
    make_bundle, cli, spell_run, store
):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        checks = [{"type": "http_status", "params": {"url": url, "expect": 200}}]
        installed(cli, make_bundle(checks=checks))
        result = spell_run(
            "cast",
            "test/demo",
            "--allow-unsigned",
            timeout=10,
            env={"SPELL_RUNTIME_EXECUTION_TIMEOUT_MS": "1500"},
        )
    finally:
        silent.close()
    assert_refused(result, "cast execution timed out after 1500ms", stdout=None)
    assert result.seconds < 4.5


def test_interrupt_during_a_slow_schema_pattern_leaves_no_validator_running(
    make_bundle, cli, spell_run
):
    schema = {"type": "object", "properties": {"name": {"pattern": "^(a+)+$"}}}
    installed(cli, make_bundle(files={"schema.json": json.dumps(schema)}))
    result = spell_run(
        "cast",
        "test/demo",
        "--allow-unsigned",
        "-p",
        "name=" + "a" * 40 + "!",
        signals=[(1.5, signal.SIGTERM)],
        timeout=4,
    )
    assert_refused(result, "cast interrupted")


def test_sigterm_to_spell_runner_stops_the_step_and_its_descendants(
    spell_run, pyz, tmp_path
):
    bundle = tmp_path / "bundle"
    (bundle / "steps").mkdir(parents=True)
    (bundle / "steps" / "run.sh").write_text(STUBBORN)
    (bundle / "steps" / "run.sh").chmod(0o755)
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "bundle_dir": str(bundle),
                "steps": [{"name": "run", "uses": "shell", "run": "steps/run.sh"}],
                "checks": [],
            }
        )
    )
    env, ready = ready_file(tmp_path)
    result = spell_run(
        "--plan",
        plan,
        pyz_path=pyz.runner,
        env=env,
        signals=[(ready, signal.SIGTERM)],
        timeout=15,
    )
    assert_refused(result, "spell-runner: interrupted")


# Docker ######################################################################


@pytest.fixture(scope="module")
def engine() -> dict:
    return images.require_engine()


@pytest.fixture(scope="module")
def runner_image(engine, pyz) -> str:
    return images.ensure_runner_image(pyz.runner)


def spell_containers(engine: dict, under) -> list[str]:
    """Names of ``spell-*`` containers (running or not) mounting a path under ``under``.

    The cast's TMPDIR is the test's own folder, so its mounts give its container
    away even when other casts share the engine.
    """

    def docker(*args):
        return subprocess.run(
            ["docker", *args],
            env=engine,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        ).stdout

    ids = docker("ps", "-aq", "--filter", "name=spell-").split()
    if not ids:
        return []
    found = json.loads(docker("inspect", *ids) or "[]")
    return [
        c["Name"]
        for c in found
        if any(
            (m.get("Source") or "").startswith(str(under)) for m in c.get("Mounts", [])
        )
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_docker_cast_leaves_no_container(
    signum, engine, runner_image, make_bundle, cli, spell_run, tmp_path
):
    platforms = ["linux/amd64", "linux/arm64", "linux/x64"]
    runtime = {
        "execution": "docker",
        "platforms": platforms,
        "docker_image": runner_image,
    }
    step = "#!/bin/sh\ntrap '' TERM INT\nsetsid sleep 300 &\necho started\nsleep 300\n"
    installed(cli, make_bundle(runtime=runtime, files={"steps/run.sh": step}))
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    if engine.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = engine["DOCKER_HOST"]
    seen = []

    def container_runs() -> bool:
        seen.extend(spell_containers(engine, temp))
        return bool(seen)

    result = spell_run(
        "cast",
        "test/demo",
        "--allow-unsigned",
        env=env,
        signals=[(container_runs, signum)],
        timeout=40,
    )
    assert seen, "no container was seen before the cast ended"
    assert_refused(result, "cast interrupted", stdout=None)
    assert spell_containers(engine, temp) == []
    assert list(temp.iterdir()) == []
