"""The test infrastructure itself: fixtures, docker engine, images, chromium.

Docker and chromium tests skip with a reason when those are missing, except
under ``CI=true``, where tests/run.sh promises both and a missing one fails.
"""

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SPELLS = ROOT / "fixtures" / "spells"

# tests/support is imported as the package "support", from tests/ (which is
# where pytest's default import mode finds it; made explicit here).
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from support import images  # noqa: E402

CI = os.environ.get("CI") == "true"

ALL_PLATFORMS = ["linux/amd64", "linux/arm64", "darwin/arm64", "darwin/x64",
                 "win32/x64"]

#: Folder name -> manifest id, as listed in fixtures/README.md.
FIXTURE_IDS = {
    "hello-host": "fixtures/hello-host",
    "risk-high": "fixtures/risk-high",
    "billing": "fixtures/billing",
    "permissions": "fixtures/permissions",
    "platform": "fixtures/platform",
    "http": "fixtures/http",
    "docker": "fixtures/hello-docker",
    "signed": "signed/hello",
    "slow": "fixtures/slow",
    "fail": "fixtures/fail",
    "multi-check": "fixtures/multi-check",
    "secret-echo": "fixtures/secret-echo",
}

#: Every flag of spell's hardened ``docker run``, plus the exec-capable work
#: tmpfs and a read-only root.
HARDENED = [
    "--rm", "--network", "none", "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges", "--read-only",
    "--user", "65532:65532", "--pids-limit", "256",
    "--tmpfs", "/tmp:rw,noexec,nosuid,size=64m",
    "--tmpfs", "/spell-work:rw,exec,nosuid,size=64m,uid=65532,gid=65532",
]


def _manifest(name):
    return yaml.safe_load((SPELLS / name / "spell.yaml").read_text("utf-8"))


# Fixtures ###################################################################

def test_fixture_folders_match_the_list():
    found = sorted(p.name for p in SPELLS.iterdir() if p.is_dir())
    assert found == sorted(FIXTURE_IDS)
    readme = (ROOT / "fixtures" / "README.md").read_text("utf-8")
    for name in FIXTURE_IDS:
        assert f"| `{name}` |" in readme


@pytest.mark.parametrize("name", sorted(FIXTURE_IDS))
def test_fixture_bundle_is_complete(name):
    bundle = SPELLS / name
    manifest = _manifest(name)
    assert manifest["id"] == FIXTURE_IDS[name]
    for key in ("version", "name", "summary"):
        assert isinstance(manifest[key], str) and manifest[key].strip()
    assert manifest["inputs_schema"] == "./schema.json"
    assert manifest["risk"] in ("low", "medium", "high", "critical")
    assert isinstance(manifest["permissions"], list)
    assert isinstance(manifest["effects"], list)
    assert set(manifest["billing"]) >= {"enabled", "mode", "currency",
                                        "max_amount"}
    assert manifest["runtime"]["execution"] in ("host", "docker")
    assert manifest["checks"]

    schema = json.loads((bundle / "schema.json").read_text("utf-8"))
    assert schema["$schema"] == \
        "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"

    assert (bundle / "steps").is_dir()
    names = [step["name"] for step in manifest["steps"]]
    assert names and len(names) == len(set(names))
    for step in manifest["steps"]:
        path = bundle / step["run"]
        assert path.is_file(), step["run"]
        assert path.resolve().is_relative_to((bundle / "steps").resolve())
        if step["uses"] == "shell":
            assert os.access(path, os.X_OK), f"{step['run']} not executable"
            assert path.read_bytes().startswith(b"#!"), step["run"]
        else:
            assert step["uses"] == "http"
            definition = json.loads(path.read_text("utf-8"))
            assert {"method", "url"} <= set(definition)


def test_fixture_platforms():
    for name in FIXTURE_IDS:
        platforms = _manifest(name)["runtime"]["platforms"]
        expected = ["never/platform"] if name == "platform" else ALL_PLATFORMS
        assert platforms == expected, name


def test_fixture_manifest_details():
    billing = _manifest("billing")["billing"]
    assert billing == {"enabled": True, "mode": "on_success",
                       "currency": "USD", "max_amount": 10}
    assert _manifest("risk-high")["risk"] == "high"
    assert _manifest("permissions")["permissions"] == [
        {"connector": "github", "scopes": ["repo:read"]}]
    docker = _manifest("docker")["runtime"]
    assert docker["execution"] == "docker"
    assert docker["docker_image"] == "spell-runner-test:latest"
    request = json.loads(
        (SPELLS / "http" / "steps" / "request.json").read_text("utf-8"))
    assert request["url"] == \
        "{{INPUT.base_url}}/v1/deploy/{{INPUT.project}}"
    assert request["headers"] == {"x-test-header": "{{ENV.TEST_HEADER}}"}


def _run_step(bundle, step, data, tmp_path, **env):
    input_json = tmp_path / "input.json"
    input_json.write_text(json.dumps(data, separators=(",", ":")))
    step_env = dict(os.environ, INPUT_JSON=str(input_json), **env)
    return subprocess.run(
        [str(SPELLS / bundle / "steps" / step)], cwd=tmp_path, env=step_env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def test_fixture_steps_run_on_the_host(tmp_path):
    out = _run_step("hello-host", "hello.py", {"name": "world"}, tmp_path)
    assert out.returncode == 0 and out.stdout == "hello world\n"

    out = _run_step("slow", "slow.sh", {"ms": 20}, tmp_path)
    assert out.returncode == 0 and out.stdout == "slept 20ms\n"

    out = _run_step("fail", "b.sh", {}, tmp_path)
    assert out.returncode == 3 and "b failed on purpose" in out.stderr

    out = _run_step("multi-check", "write.sh", {}, tmp_path)
    assert out.returncode == 0
    assert (tmp_path / "artifacts" / "out.txt").is_file()

    out = _run_step("secret-echo", "echo.py", {"token": "tk-1"}, tmp_path,
                    APP_SECRET="s-1")
    assert out.stdout == "APP_SECRET=s-1\ntoken=tk-1\n"

    out = _run_step("permissions", "token.sh", {}, tmp_path,
                    CONNECTOR_GITHUB_TOKEN="gh-secret")
    assert out.stdout == "github token: set\n"
    assert "gh-secret" not in out.stdout


# Image builder: pure parts ##################################################

def test_apt_records_are_parsed():
    text = ("Package: a\nVersion: 1:2.0-1\nArchitecture: amd64\n"
            "Description: x\n more\nSHA256: abc\n\nPackage: b\n"
            "Version: 3\nSHA256: def\n")
    assert images.parse_apt_records(text) == [
        {"Package": "a", "Version": "1:2.0-1", "Architecture": "amd64",
         "SHA256": "abc"},
        {"Package": "b", "Version": "3", "SHA256": "def"}]


def test_image_tags_follow_content():
    records = [{"Package": "a", "Version": "1", "SHA256": "x"}]
    tag = images.base_image_tag(records)
    assert tag.startswith("spell-base:") and len(tag.split(":")[1]) == 16
    assert images.base_image_tag(records) == tag
    changed = [{"Package": "a", "Version": "2", "SHA256": "y"}]
    assert images.base_image_tag(changed) != tag
    one = images.runner_image_tag(tag, b"zip-1")
    assert one.startswith("spell-runner-test:")
    assert images.runner_image_tag(tag, b"zip-2") != one


def test_engine_script_rejects_unknown_commands():
    proc = subprocess.run(
        ["bash", str(TESTS / "support" / "docker-engine.sh"), "bogus"],
        capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


# Docker engine and images ###################################################

@pytest.fixture(scope="module")
def engine():
    return images.require_engine()


@pytest.fixture(scope="module")
def base_image(engine):
    return images.ensure_base_image()


def _docker(env, *args, timeout=120):
    return subprocess.run(["docker", *args], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout)


def test_engine_answers(engine):
    proc = _docker(engine, "info", "--format", "{{.ServerVersion}}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_base_image_runs_python_hardened(engine, base_image):
    code = ("import json, urllib.request, subprocess, selectors, ctypes, "
            "ssl, sqlite3, zipfile, os; "
            "print('ok', os.getuid(), os.getgid())")
    proc = _docker(engine, "run", *HARDENED, base_image, "python3", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok 65532 65532\n"


def test_base_image_runs_steps_only_in_the_work_tmpfs(engine, base_image):
    script = (
        "printf '#!/bin/sh\\necho step $(id -u) $(pwd)\\n' > /spell-work/s.sh"
        " && chmod 755 /spell-work/s.sh && cd /spell-work && ./s.sh"
        " && cp s.sh /tmp/t.sh && if /tmp/t.sh 2>/dev/null;"
        " then echo tmp-exec; else echo tmp-noexec; fi"
        " && if touch /etc/x 2>/dev/null; then echo rw; else echo ro; fi")
    proc = _docker(engine, "run", *HARDENED, base_image, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == [
        "step 65532 /spell-work", "tmp-noexec", "ro"]


def test_fixture_steps_run_in_the_base_image(engine, base_image, tmp_path):
    tmp_path.chmod(0o755)
    data = tmp_path / "input.json"
    data.write_text('{"name":"world","ms":10,"token":"tk"}')
    data.chmod(0o644)
    script = ("cp -r /spell /spell-work/b && cd /spell-work/b"
              " && ./hello-host/steps/hello.py && ./slow/steps/slow.sh"
              " && ./docker/steps/hello.sh && ./secret-echo/steps/echo.py")
    proc = _docker(
        engine, "run", *HARDENED, "--workdir", "/spell",
        "-v", f"{SPELLS}:/spell:ro",
        "-v", f"{data}:/tmp/spell-input/input.json:ro",
        "-e", "INPUT_JSON=/tmp/spell-input/input.json", "-e", "APP_SECRET=s",
        base_image, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "hello world\nslept 10ms\n"
        "hello-docker uid=65532 cwd=/spell-work/b\nAPP_SECRET=s\ntoken=tk\n")


def test_runner_image_is_built_from_a_zipapp(engine, tmp_path):
    pyz = tmp_path / "toy.pyz"
    with zipfile.ZipFile(pyz, "w") as archive:
        # A fixed date keeps the bytes, and so the image tag, the same
        # from run to run: no new image each time.
        entry = zipfile.ZipInfo("__main__.py", date_time=(2020, 1, 1, 0, 0, 0))
        archive.writestr(
            entry, "import sys\nprint('toy-runner', *sys.argv[1:])\n"
                   "sys.exit(3)\n")
    tag = images.ensure_runner_image(pyz)
    assert tag.startswith("spell-runner-test:")
    assert images.ensure_runner_image(pyz) == tag
    proc = _docker(engine, "run", *HARDENED, tag, "spell-runner", "a", "b")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "toy-runner a b\n"


def test_runner_image_from_run_sh(engine):
    tag = os.environ.get("SPELL_TEST_RUNNER_IMAGE")
    if not tag:
        if CI:
            pytest.fail("CI=true but SPELL_TEST_RUNNER_IMAGE is not set")
        pytest.skip("SPELL_TEST_RUNNER_IMAGE is not set "
                    "(tests/run.sh sets it)")
    proc = _docker(engine, "run", *HARDENED, tag, "sh", "-c",
                   "test -x /usr/local/bin/spell-runner"
                   " && test -s /usr/local/lib/spell_runner.pyz && echo ok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"


# Chromium ###################################################################

def _chromium():
    path = os.environ.get("SPELL_TEST_CHROMIUM") or shutil.which("chromium")
    if path:
        return path
    if CI:
        pytest.fail("CI=true but chromium is not installed")
    pytest.skip("chromium is not installed (tests/run.sh installs it)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def test_chromium_renders_a_local_page(tmp_path):
    chromium = _chromium()
    (tmp_path / "index.html").write_text(
        "<p id=x>static</p><script>"
        "document.getElementById('x').textContent='by-script'</script>")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-quic", "--no-first-run",
                 "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--dump-dom",
                 f"http://127.0.0.1:{server.server_port}/"],
                capture_output=True, text=True, timeout=90,
                stdin=subprocess.DEVNULL)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '<p id="x">by-script</p>' in proc.stdout
