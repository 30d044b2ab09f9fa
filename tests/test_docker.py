"""``spell cast`` in docker mode, against a real engine (never mocked).

The runner image is built once per session from the zipapp under test
(tests/support/images.py). Tests that need the engine skip with a reason when
none answers, except under ``CI=true``, where they fail instead. Validation
of SPELL_DOCKER_* and of the image name happens before docker is called, so
those tests run everywhere.

Containers are found by their bind mounts: each test's store lives in its own
temporary folder, so a ``spell-*`` container mounting a path under it is this
test's, even when other casts share the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cast_helpers import (
    ALL_PLATFORMS,
    TESTS,
    all_cmdlines,
    clean_env,
    copy_fixture,
    latest_log,
    make_bundle,
    stdout_fields,
    wait_for,
)

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from support import images  # noqa: E402

# Fixtures ###################################################################


@pytest.fixture(scope="session")
def engine() -> dict:
    """The environment (DOCKER_HOST) of an engine that answers; skip or fail without."""
    return images.require_engine()


@pytest.fixture(scope="session")
def runner_image(engine, pyz) -> str:
    """The runner image built from the spell_runner.pyz under test."""
    return images.ensure_runner_image(pyz.runner, latest=False)


@pytest.fixture
def spell_cli(run_pyz, store):
    """``spell_cli(*args, **extra_env)``: spell with a clean environment plus the engine's.

    TMPDIR is ``<HOME>/tmp``, so the container's mounts lie under the test's HOME.
    """
    engine_host = images.engine_env().get("DOCKER_HOST")

    def run(*args, timeout=120, **extra_env):
        env = cast_env({"DOCKER_HOST": engine_host} if engine_host else {}, store)
        env.update(extra_env)
        return run_pyz(*args, env=env, timeout=timeout)

    return run


@pytest.fixture
def install(spell_cli):
    def run(source) -> None:
        proc = spell_cli("install", source)
        assert proc.returncode == 0, proc.stderr

    return run


def docker_bundle(
    root: Path, image: str, script: str, spell_id: str = "dk/spell", **fields
):
    """A one-step docker bundle whose step ``hello`` runs ``script``."""
    runtime = {"execution": "docker", "platforms": ALL_PLATFORMS, "docker_image": image}
    return make_bundle(
        root, spell_id, {"hello": ("shell", script)}, runtime=runtime, **fields
    )


def docker(engine: dict, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", *args],
        env=engine,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def containers_of(engine: dict, store: Path) -> list[dict]:
    """``docker inspect`` of every ``spell-*`` container of this test's casts.

    Those mount folders under the test's HOME (its TMPDIR, see ``cast_env``).
    """
    marker = store.parent
    ids = docker(engine, "ps", "-aq", "--filter", "name=spell-").stdout.split()
    if not ids:
        return []
    # A container may vanish between ps and inspect; inspect prints the others.
    proc = docker(engine, "inspect", *ids)
    found = json.loads(proc.stdout or "[]")
    return [
        c
        for c in found
        if any(str(marker) in (m.get("Source") or "") for m in c.get("Mounts", []))
    ]


def start_cast(pyz, env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(pyz.spell), "cast", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cast_env(engine: dict, store: Path, **extra) -> dict:
    """A clean environment with the engine's DOCKER_HOST and TMPDIR under HOME."""
    tmp = store.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    env = clean_env(TMPDIR=str(tmp))
    if engine.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = engine["DOCKER_HOST"]
    env.update(extra)
    return env


SLEEPER = "#!/bin/sh\necho started\nsleep 2\n"


def inspect_while_running(engine, pyz, store, *args, **env_vars) -> tuple[dict, tuple]:
    """Start a cast of a sleeping step, inspect its container, then let it finish."""
    proc = start_cast(pyz, cast_env(engine, store, **env_vars), *args)
    try:
        [container] = wait_for(lambda: containers_of(engine, store), timeout=30)
        out = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return container, (proc.returncode, *out)


# Validation before docker is called (no engine needed) ######################

DOCKER_ERRORS = [
    (
        "SPELL_DOCKER_NETWORK",
        "bad",
        "SPELL_DOCKER_NETWORK must be one of: none, bridge, host",
    ),
    (
        "SPELL_DOCKER_USER",
        "invalid user",
        "SPELL_DOCKER_USER must not contain whitespace",
    ),
    ("SPELL_DOCKER_READ_ONLY", "2", "SPELL_DOCKER_READ_ONLY must be '1' or '0'"),
    (
        "SPELL_DOCKER_PIDS_LIMIT",
        "-1",
        "SPELL_DOCKER_PIDS_LIMIT must be an integer >= 0",
    ),
    (
        "SPELL_DOCKER_PIDS_LIMIT",
        "1.5",
        "SPELL_DOCKER_PIDS_LIMIT must be an integer >= 0",
    ),
    (
        "SPELL_DOCKER_MEMORY",
        "bad",
        "SPELL_DOCKER_MEMORY must be a positive integer optionally "
        "suffixed with b, k, m, or g",
    ),
    (
        "SPELL_DOCKER_MEMORY",
        "12t",
        "SPELL_DOCKER_MEMORY must be a positive integer optionally "
        "suffixed with b, k, m, or g",
    ),
    ("SPELL_DOCKER_CPUS", "0", "SPELL_DOCKER_CPUS must be a number > 0"),
    ("SPELL_DOCKER_CPUS", "-1", "SPELL_DOCKER_CPUS must be a number > 0"),
    ("SPELL_DOCKER_CPUS", "1_5", "SPELL_DOCKER_CPUS must be a number > 0"),
    ("SPELL_DOCKER_CPUS", "Infinity", "SPELL_DOCKER_CPUS must be a number > 0"),
]


def test_invalid_docker_settings_fail_before_the_summary(spell_cli, install, tmp_path):
    install(copy_fixture("docker", tmp_path / "d"))
    for n, (name, value, message) in enumerate(DOCKER_ERRORS):
        # Refused before the summary, and (unlike the original) in a dry run too.
        flags = ["--dry-run"] if n % 2 else []
        proc = spell_cli(
            "cast", "fixtures/hello-docker", "--allow-unsigned", *flags, **{name: value}
        )
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", message + "\n")


@pytest.mark.parametrize("name, value, message", DOCKER_ERRORS)
def test_docker_settings_refuse_what_javascript_refuses(name, value, message):
    import spell

    with pytest.raises(spell.SpellError) as caught:
        spell.docker_settings({name: value}, "img:1")
    assert caught.value.message == message


def test_docker_settings_are_checked_in_the_original_order(
    spell_cli, install, tmp_path
):
    install(copy_fixture("docker", tmp_path / "d"))
    env = {
        "SPELL_DOCKER_NETWORK": "x",
        "SPELL_DOCKER_USER": "a b",
        "SPELL_DOCKER_READ_ONLY": "x",
        "SPELL_DOCKER_PIDS_LIMIT": "x",
        "SPELL_DOCKER_MEMORY": "x",
        "SPELL_DOCKER_CPUS": "x",
    }
    expected = [message for _, _, message in DOCKER_ERRORS]
    order = [
        "SPELL_DOCKER_NETWORK",
        "SPELL_DOCKER_USER",
        "SPELL_DOCKER_READ_ONLY",
        "SPELL_DOCKER_PIDS_LIMIT",
        "SPELL_DOCKER_MEMORY",
        "SPELL_DOCKER_CPUS",
    ]
    for name in order:
        proc = spell_cli(
            "cast", "fixtures/hello-docker", "--allow-unsigned", "--dry-run", **env
        )
        assert proc.stderr.startswith(name), proc.stderr
        assert proc.stderr.strip() in expected
        del env[name]


def test_valid_docker_settings_pass_the_dry_run(spell_cli, install, tmp_path):
    install(copy_fixture("docker", tmp_path / "d"))
    proc = spell_cli(
        "cast",
        "fixtures/hello-docker",
        "--allow-unsigned",
        "--dry-run",
        SPELL_DOCKER_NETWORK=" host ",
        SPELL_DOCKER_USER="",
        SPELL_DOCKER_READ_ONLY="0",
        SPELL_DOCKER_PIDS_LIMIT="0x10",
        SPELL_DOCKER_MEMORY="512M",
        SPELL_DOCKER_CPUS=" .5 ",
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("image", ["--privileged", "a b", "-v/:/host", "img\n:x"])
def test_image_names_that_could_be_options_are_refused(
    spell_cli, install, tmp_path, image
):
    install(copy_fixture("docker", tmp_path / "d", **{"runtime.docker_image": image}))
    proc = spell_cli("cast", "fixtures/hello-docker", "--allow-unsigned")
    assert (proc.returncode, proc.stdout) == (1, "")
    shown = image.replace("\n", "\\n")
    assert proc.stderr == f"invalid docker image name: {shown}\n"


def test_docker_missing_from_path(spell_cli, install, tmp_path):
    install(copy_fixture("docker", tmp_path / "d"))
    proc = spell_cli(
        "cast",
        "fixtures/hello-docker",
        "--allow-unsigned",
        PATH=str(tmp_path / "empty-bin"),
    )
    assert proc.returncode == 1
    assert proc.stderr == "docker not found: install docker and ensure it is on PATH\n"
    assert "execution_id:" not in proc.stdout


def test_docker_daemon_down(spell_cli, install, tmp_path):
    if shutil.which("docker") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true needs the docker client")
        pytest.skip("the docker client is not installed")
    install(copy_fixture("docker", tmp_path / "d"))
    proc = spell_cli(
        "cast",
        "fixtures/hello-docker",
        "--allow-unsigned",
        DOCKER_HOST=f"unix://{tmp_path}/dead.sock",
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("docker daemon is not reachable: ")
    assert proc.stderr.count("\n") == 1


# Real containers ############################################################


def test_cast_under_default_hardening(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    install(
        copy_fixture("docker", tmp_path / "d", **{"runtime.docker_image": runner_image})
    )
    proc = spell_cli("cast", "fixtures/hello-docker", "--allow-unsigned", "--verbose")
    assert proc.returncode == 0, proc.stderr
    fields = stdout_fields(proc.stdout)
    assert proc.stdout.endswith(
        f"execution_id: {fields['execution_id']}\nlog: {fields['log']}\n"
    )
    assert f"docker_image={runner_image}" in proc.stdout
    log = latest_log(store)
    assert log["success"] is True
    assert (
        log["outputs"]["step.hello.stdout"]
        == "hello-docker uid=65532 cwd=/spell-work\n"
    )
    assert [s["stepName"] for s in log["steps"]] == ["hello"]
    assert log["checks"] == [
        {"type": "exit_code", "success": True, "message": "all steps succeeded"}
    ]
    assert "[hello:stdout] hello-docker uid=65532" in proc.stderr
    tmp = store.parent / "tmp"
    assert list(tmp.iterdir()) == [], "the input folder was left behind"
    assert containers_of(engine, store) == []


def test_failing_step_message_reaches_the_user(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    install(
        docker_bundle(
            tmp_path / "b",
            runner_image,
            "#!/bin/sh\necho partial\necho oops >&2\nexit 3\n",
        )
    )
    proc = spell_cli("cast", "dk/spell", "--allow-unsigned")
    assert proc.returncode == 1
    assert proc.stderr == "step failed: hello (exit code 3)\n"
    log = latest_log(store)
    assert log["error"] == "step failed: hello (exit code 3)"
    [step] = log["steps"]
    assert (step["exitCode"], step["stderr_head"], step["stdout_head"]) == (
        3,
        "oops\n",
        "partial\n",
    )


def test_step_timeout_leaves_no_container(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    install(docker_bundle(tmp_path / "b", runner_image, "#!/bin/sh\nsleep 30\n"))
    began = time.monotonic()
    proc = spell_cli(
        "cast", "dk/spell", "--allow-unsigned", SPELL_RUNTIME_STEP_TIMEOUT_MS="300"
    )
    assert proc.stderr == "shell step 'hello' timed out after 300ms\n"
    assert time.monotonic() - began < 20
    wait_for(lambda: containers_of(engine, store) == [], timeout=10)


def test_execution_timeout_leaves_no_container(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    install(docker_bundle(tmp_path / "b", runner_image, "#!/bin/sh\nsleep 30\n"))
    proc = spell_cli(
        "cast", "dk/spell", "--allow-unsigned", SPELL_RUNTIME_EXECUTION_TIMEOUT_MS="500"
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("cast execution timed out after 500ms"), proc.stderr
    wait_for(lambda: containers_of(engine, store) == [], timeout=10)


def test_container_is_killed_when_the_runner_overruns(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    # A check is not bounded by the execution deadline inside the runner; a
    # connection to an unrouted address hangs, so the host must kill the container.
    checks = [
        {"type": "http_status", "params": {"url": "http://192.0.2.1/", "expect": 200}}
    ]
    install(
        docker_bundle(
            tmp_path / "b", runner_image, "#!/bin/sh\necho quick\n", checks=checks
        )
    )
    began = time.monotonic()
    proc = spell_cli(
        "cast",
        "dk/spell",
        "--allow-unsigned",
        SPELL_DOCKER_NETWORK="bridge",
        SPELL_RUNTIME_EXECUTION_TIMEOUT_MS="1500",
    )
    assert proc.stderr == "cast execution timed out after 1500ms\n"
    assert time.monotonic() - began < 20
    wait_for(lambda: containers_of(engine, store) == [], timeout=10)


def test_connector_token_reaches_the_step_but_no_command_line(
    engine, runner_image, pyz, install, store, tmp_path
):
    script = (
        '#!/bin/sh\nprintf %s "$CONNECTOR_GITHUB_TOKEN" | sha256sum | cut -c1-64\n'
        "sleep 2\n"
    )
    install(
        docker_bundle(
            tmp_path / "b",
            runner_image,
            script,
            permissions=[{"connector": "github", "scopes": ["repo"]}],
        )
    )
    token = "ghs-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:24]
    proc = start_cast(
        pyz,
        cast_env(engine, store, CONNECTOR_GITHUB_TOKEN=token),
        "dk/spell",
        "--allow-unsigned",
    )
    try:
        wait_for(lambda: containers_of(engine, store), timeout=30)
        # Let the runner and the step start, then look at every command line.
        time.sleep(0.5)
        leaks = [line for line in all_cmdlines() if token.encode() in line]
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert leaks == []
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert latest_log(store)["steps"][0]["stdout_head"] == digest + "\n"
    assert token not in out + err


NET_PROBE = "#!/bin/sh\nls /sys/class/net | tr '\\n' ' '\n"


def test_network_is_off_by_default_and_on_with_bridge(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    install(docker_bundle(tmp_path / "b", runner_image, NET_PROBE))
    proc = spell_cli("cast", "dk/spell", "--allow-unsigned")
    assert proc.returncode == 0, proc.stderr
    assert latest_log(store)["outputs"]["step.hello.stdout"].split() == ["lo"]
    proc = spell_cli(
        "cast", "dk/spell", "--allow-unsigned", SPELL_DOCKER_NETWORK="bridge"
    )
    assert proc.returncode == 0, proc.stderr
    assert "eth0" in latest_log(store)["outputs"]["step.hello.stdout"].split()


def test_default_container_settings(
    engine, runner_image, pyz, install, store, tmp_path
):
    install(docker_bundle(tmp_path / "b", runner_image, SLEEPER))
    container, (code, out, err) = inspect_while_running(
        engine, pyz, store, "dk/spell", "--allow-unsigned"
    )
    assert code == 0, err
    host, config = container["HostConfig"], container["Config"]
    assert container["Name"].startswith("/spell-")
    assert host["NetworkMode"] == "none"
    assert config["User"] == "65532:65532"
    assert host["ReadonlyRootfs"] is True
    assert host["PidsLimit"] == 256
    assert (host["Memory"], host["NanoCpus"]) == (0, 0)
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert "noexec" in host["Tmpfs"]["/tmp"]
    assert host["AutoRemove"] is True
    assert not any(e.startswith("CONNECTOR_") for e in config["Env"])
    mounts = {m["Destination"]: m for m in container["Mounts"]}
    assert mounts["/spell"]["RW"] is False and mounts["/tmp/spell-input"]["RW"] is False


def test_overridden_container_settings(
    engine, runner_image, pyz, install, store, tmp_path
):
    install(docker_bundle(tmp_path / "b", runner_image, SLEEPER))
    container, (code, out, err) = inspect_while_running(
        engine,
        pyz,
        store,
        "dk/spell",
        "--allow-unsigned",
        SPELL_DOCKER_NETWORK="bridge",
        SPELL_DOCKER_USER="1000:1000",
        SPELL_DOCKER_READ_ONLY="0",
        SPELL_DOCKER_PIDS_LIMIT="64",
        SPELL_DOCKER_MEMORY="128m",
        SPELL_DOCKER_CPUS="1.5",
    )
    assert code == 0, err
    host, config = container["HostConfig"], container["Config"]
    assert host["NetworkMode"] == "bridge"
    assert config["User"] == "1000:1000"
    assert host["ReadonlyRootfs"] is False
    assert host["PidsLimit"] == 64
    assert host["Memory"] == 128 * 1024 * 1024
    assert host["NanoCpus"] == 1_500_000_000


def test_blank_user_and_zero_pids_leave_the_flags_out(
    engine, runner_image, pyz, install, store, tmp_path
):
    install(docker_bundle(tmp_path / "b", runner_image, SLEEPER))
    container, (code, out, err) = inspect_while_running(
        engine,
        pyz,
        store,
        "dk/spell",
        "--allow-unsigned",
        SPELL_DOCKER_USER="",
        SPELL_DOCKER_PIDS_LIMIT="0",
    )
    assert code == 0, err
    assert container["Config"]["User"] == ""
    assert container["HostConfig"]["PidsLimit"] in (None, 0, -1)


def test_missing_image(engine, spell_cli, install, tmp_path):
    image = "spell-missing-image:none"
    install(copy_fixture("docker", tmp_path / "d", **{"runtime.docker_image": image}))
    proc = spell_cli("cast", "fixtures/hello-docker", "--allow-unsigned")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"docker image not found: {image} (build it locally; " f"see docs/docker.md)\n"
    )


def test_sigterm_removes_the_container(
    engine, runner_image, pyz, install, store, tmp_path
):
    install(docker_bundle(tmp_path / "b", runner_image, "#!/bin/sh\nsleep 30\n"))
    proc = start_cast(pyz, cast_env(engine, store), "dk/spell", "--allow-unsigned")
    try:
        wait_for(lambda: containers_of(engine, store), timeout=30)
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err) == (1, "cast interrupted\n")
    wait_for(lambda: containers_of(engine, store) == [], timeout=10)


def test_run_arguments_carry_names_not_values():
    import spell

    settings = spell.docker_settings({}, "img:1")
    manifest = {"permissions": [{"connector": "git-hub", "scopes": []}]}
    env = {
        "CONNECTOR_GIT_HUB_TOKEN": "tok-value-123",
        "SPELL_RUNTIME_STEP_TIMEOUT_MS": " 750 ",
    }
    passed = spell._passed_environment(manifest, env)
    assert passed == {
        "CONNECTOR_GIT_HUB_TOKEN": "tok-value-123",
        "SPELL_RUNTIME_STEP_TIMEOUT_MS": "750",
    }
    args = spell.docker_run_args(
        settings, "/b/1.0.0", "/t/share", "spell-x", sorted(passed), events=False
    )
    assert "tok-value-123" not in " ".join(args)
    assert args[args.index("CONNECTOR_GIT_HUB_TOKEN") - 1] == "-e"
    for flag in (
        ["--network", "none"],
        ["--cap-drop", "ALL"],
        ["--read-only"],
        ["--security-opt", "no-new-privileges"],
        ["--user", "65532:65532"],
        ["--pids-limit", "256"],
        ["--tmpfs", "/tmp:rw,noexec,nosuid,size=64m"],
        ["-v", "/b/1.0.0:/spell:ro"],
        ["--name", "spell-x"],
    ):
        start = args.index(flag[0])
        assert args[start : start + len(flag)] == flag
    assert args[:2] == ["run", "--rm"]
    # The image comes after "--", so it is never read as an option.
    assert args[args.index("--") + 1] == "img:1"
    assert args[-3:] == ["spell-runner", "--plan", "/tmp/spell-input/plan.json"]
    with pytest.raises(spell.SpellError):
        spell.docker_run_args(settings, "/b:c/1.0.0", "/t", "n", [], events=False)


def test_huge_execution_timeout_is_no_deadline(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    install(docker_bundle(tmp_path / "b", runner_image, "#!/bin/sh\necho fine\n"))
    proc = spell_cli(
        "cast",
        "dk/spell",
        "--allow-unsigned",
        SPELL_RUNTIME_EXECUTION_TIMEOUT_MS="1e20",
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert latest_log(store)["outputs"]["step.hello.stdout"] == "fine\n"


def test_owner_only_files_are_readable_in_the_container(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    bundle = docker_bundle(tmp_path / "b", runner_image, "#!/bin/sh\necho private ok\n")
    (bundle / "steps" / "hello.sh").chmod(0o700)
    (bundle / "schema.json").chmod(0o600)
    install(bundle)
    proc = spell_cli("cast", "dk/spell", "--allow-unsigned")
    assert proc.returncode == 0, proc.stderr
    assert latest_log(store)["outputs"]["step.hello.stdout"] == "private ok\n"


def test_docker_platform_is_linux_with_the_host_arch(spell_cli, install, tmp_path):
    import spell

    host = spell.host_platform()
    arch = host.split("/")[1]
    target = "linux/" + ("amd64" if arch == "x64" else arch)
    install(
        copy_fixture("docker", tmp_path / "d", **{"runtime.platforms": ["plan9/mips"]})
    )
    proc = spell_cli("cast", "fixtures/hello-docker", "--allow-unsigned")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        f"platform mismatch: host={host}, runtime=docker, target={target}, "
        "spell supports=plan9/mips\n"
    )


def test_checks_run_in_the_container_work_folder(
    engine, runner_image, spell_cli, install, store, tmp_path
):
    runtime = {
        "execution": "docker",
        "platforms": ["linux/amd64", "linux/arm64"],
        "docker_image": runner_image,
    }
    install(copy_fixture("multi-check", tmp_path / "m", runtime=runtime))
    proc = spell_cli("cast", "fixtures/multi-check", "--allow-unsigned")
    assert proc.returncode == 0, proc.stderr
    assert latest_log(store)["checks"] == [
        {"type": "exit_code", "success": True, "message": "all steps succeeded"},
        {
            "type": "file_exists",
            "success": True,
            "message": "file exists: /spell-work/artifacts/out.txt",
        },
    ]
