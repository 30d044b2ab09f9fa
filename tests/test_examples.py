"""The samples in examples/: every spell installs and casts, the registry is valid.

Casts run through ``dist/spell.pyz`` (the ``pyz`` and ``run_pyz`` fixtures of
conftest.py) in a private store, the way a user runs them. Network traffic
stays on 127.0.0.1: the webhook receiver and the fake GitHub API are real
``http.server`` servers started here.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import http.client
import importlib.util
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SPELLS = EXAMPLES / "spells"
REGISTRY = EXAMPLES / "button-registry.v1.json"
REGISTRY_SCHEMA = EXAMPLES / "button-registry.v1.schema.json"

#: The three real-use samples; hello (the smallest) is installed and cast too.
NEW_SAMPLES = ("call-webhook", "repo-ops", "publish-site")
ALL_SAMPLES = ("hello",) + NEW_SAMPLES
PLATFORMS = ["linux/amd64", "linux/arm64", "darwin/arm64", "darwin/x64"]
#: Looks like a GitHub token, so it must never show up in output or logs.
TOKEN = "ghp_sampleToken0123456789abcdefABCDEF"

#: Variables of the developer's shell that would change what a cast does.
_STEERING = (
    "SPELL_RUNTIME_",
    "SPELL_DOCKER_",
    "SPELL_API_",
    "CONNECTOR_",
    "GITHUB_API_URL",
)
_PROXIES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _manifest(folder: str) -> dict:
    return yaml.safe_load((SPELLS / folder / "spell.yaml").read_text(encoding="utf-8"))


def _schema(folder: str) -> dict:
    return json.loads((SPELLS / folder / "schema.json").read_text(encoding="utf-8"))


def _sample_for(spell_id: str) -> str:
    for folder in ALL_SAMPLES:
        if _manifest(folder)["id"] == spell_id:
            return folder
    raise AssertionError(f"no sample has id {spell_id}")


def _load_receiver():
    path = SPELLS / "call-webhook" / "receiver.py"
    spec = importlib.util.spec_from_file_location("webhook_receiver", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Helpers ######################################################################


@pytest.fixture
def env(store) -> dict:
    """The environment of a cast: the store's, minus anything that steers spell."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_STEERING) and name.lower() not in _PROXIES
    }


@pytest.fixture
def installed(run_pyz, env):
    """Install every sample into the private store with the zipapp."""
    for folder in ALL_SAMPLES:
        done = run_pyz("install", SPELLS / folder, env=env)
        assert done.returncode == 0, done.stderr
        manifest = _manifest(folder)
        assert done.stdout == f"{manifest['id']}@{manifest['version']}\n"
    return env


@pytest.fixture
def cast(run_pyz, installed):
    """``cast(spell_id, *flags, params={}, **env)``, unsigned samples allowed.

    Each ``params`` item becomes ``-p key=value`` (non-strings as JSON); the
    keyword arguments are added to the environment.
    """

    def run(spell_id: str, *flags, params: dict | None = None, **extra_env):
        args = [spell_id, "--allow-unsigned", *flags]
        for key, value in (params or {}).items():
            text = value if isinstance(value, str) else json.dumps(value)
            args += ["-p", f"{key}={text}"]
        return run_pyz("cast", *args, env={**installed, **extra_env}, timeout=120)

    return run


def cast_log(done: subprocess.CompletedProcess) -> dict:
    """The log a successful cast names on its ``log:`` line."""
    lines = dict(
        line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line
    )
    assert lines["execution_id"] == os.path.basename(lines["log"])
    return json.loads(Path(lines["log"]).read_text(encoding="utf-8"))


def latest_log(store: Path) -> dict:
    logs = sorted((store / "logs").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(logs[-1].read_text(encoding="utf-8"))


def installed_dir(store: Path, spell_id: str, version: str = "1.0.0") -> Path:
    key = base64.urlsafe_b64encode(spell_id.encode()).decode().rstrip("=")
    return store / "spells" / key / version


class FakeServer:
    """A local HTTP server answering from ``routes`` and keeping every request.

    ``routes`` maps ``(method, path)`` to ``(status, JSON body[, headers])``.
    """

    def __init__(self, routes: dict):
        self.requests: list[dict] = []
        self.routes = routes
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode("utf-8") if length else ""
                outer.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": json.loads(body) if body else None,
                    }
                )
                answer = outer.routes.get((self.command, self.path), (404, {}))
                status, payload, *headers = answer
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                for name, value in headers[0].items() if headers else ():
                    self.send_header(name, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# The bundles ##################################################################


@pytest.mark.parametrize("folder", NEW_SAMPLES)
def test_manifest_has_every_field(folder):
    manifest = _manifest(folder)
    assert manifest["id"] == f"samples/{folder}"
    assert manifest["version"] == "1.0.0"
    assert manifest["name"] and manifest["summary"]
    assert manifest["inputs_schema"] == "./schema.json"
    assert manifest["risk"] in ("low", "medium", "high", "critical")
    assert isinstance(manifest["permissions"], list)
    assert manifest["effects"], "a sample says what it changes"
    vocabulary = {"create", "update", "delete", "deploy", "notify"}
    assert {effect["type"] for effect in manifest["effects"]} <= vocabulary
    assert manifest["billing"] == {
        "enabled": False,
        "mode": "none",
        "currency": "USD",
        "max_amount": 0,
    }
    assert manifest["runtime"] == {"execution": "host", "platforms": PLATFORMS}
    assert manifest["steps"] and manifest["checks"]
    assert (SPELLS / folder / "README.md").is_file()


@pytest.mark.parametrize("folder", NEW_SAMPLES)
def test_step_files_are_runnable(folder):
    for step in _manifest(folder)["steps"]:
        path = SPELLS / folder / step["run"]
        assert path.parent.name == "steps"
        if step["uses"] == "shell":
            assert os.access(path, os.X_OK), f"{path} is not executable"
            assert path.read_bytes().startswith(b"#!/"), f"{path} has no shebang"
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        else:
            definition = json.loads(path.read_text(encoding="utf-8"))
            assert {"method", "url"} <= definition.keys()


@pytest.mark.parametrize("folder", NEW_SAMPLES)
def test_schema_is_draft_2020_12(folder):
    schema = _schema(folder)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object" and schema["additionalProperties"] is False


def test_the_specific_shapes_of_each_sample():
    webhook = _manifest("call-webhook")
    assert (webhook["risk"], webhook["effects"][0]["type"]) == ("medium", "notify")
    assert [step["uses"] for step in webhook["steps"]] == ["http"]
    assert {check["type"] for check in webhook["checks"]} == {
        "http_status",
        "jsonpath_equals",
    }
    notify = json.loads((SPELLS / "call-webhook/steps/notify.json").read_text())
    assert notify["url"] == "{{INPUT.webhook_url}}"
    assert notify["body"]["payload"] == "{{INPUT.payload}}"

    repo = _manifest("repo-ops")
    assert repo["permissions"] == [
        {"connector": "github", "scopes": ["contents:write"]}
    ]

    site = _manifest("publish-site")
    assert site["risk"] == "high"
    assert [step["uses"] for step in site["steps"]] == ["shell", "shell"]
    assert {"type": "file_exists", "params": {"path": "artifacts/site/index.html"}} in (
        site["checks"]
    )


def test_install_and_list_every_sample(installed, run_pyz):
    done = run_pyz("list", env=installed)
    assert done.returncode == 0, done.stderr
    for folder in ALL_SAMPLES:
        assert f"samples/{folder}@1.0.0\t" in done.stdout


# Dry runs and guards ##########################################################

WEBHOOK_INPUT = {
    "webhook_url": "http://127.0.0.1:9/nobody-listens",
    "event": "deploy",
    "source": "manual",
    "payload": {"service": "web"},
}
DRY_RUNS = {
    "hello": ((), {"name": "world"}),
    "call-webhook": ((), WEBHOOK_INPUT),
    "repo-ops": ((), {"branch": "main", "repository": "acme/web"}),
    "publish-site": (("--yes",), {"site_name": "demo"}),
}


@pytest.mark.parametrize("folder", ALL_SAMPLES)
def test_dry_run(cast, store, folder):
    spell_id = f"samples/{folder}"
    flags, params = DRY_RUNS[folder]
    done = cast(
        spell_id, "--dry-run", *flags, params=params, CONNECTOR_GITHUB_TOKEN=TOKEN
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("=== Execution Summary ===\n")
    assert f"id@version: {spell_id}@1.0.0\n" in done.stdout
    log = cast_log(done)
    assert (log["id"], log["success"], log["steps"]) == (spell_id, True, [])
    assert log["input"] == params
    assert log["summary"]["risk"] == _manifest(folder)["risk"]
    assert not (installed_dir(store, spell_id) / "artifacts").exists()


def test_publish_site_needs_yes(cast):
    done = cast("samples/publish-site", "--dry-run", params={"site_name": "x"})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "risk high requires --yes\n"


def test_repo_ops_needs_the_github_token(cast):
    done = cast("samples/repo-ops", "--dry-run", params={"branch": "main"})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "missing connector token CONNECTOR_GITHUB_TOKEN\n"


def test_call_webhook_refuses_a_payload_that_is_not_an_object(cast):
    params = {**WEBHOOK_INPUT, "payload": "web"}
    done = cast("samples/call-webhook", "--dry-run", params=params)
    assert done.returncode == 1
    assert done.stderr == "input does not match schema: /payload must be object\n"


# Real casts: call-webhook #####################################################


def test_call_webhook_posts_the_event_and_its_checks_pass(cast, tmp_path):
    receiver = _load_receiver().Receiver(("127.0.0.1", 0))
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    payload = {"service": "web", "replicas": 2, "tags": ["blue", "green"]}
    given = {
        "webhook_url": receiver.base_url + "/hooks/deploy",
        "event": "deploy",
        "source": "ci",
        "payload": payload,
    }
    (tmp_path / "input.json").write_text(json.dumps(given))
    try:
        done = cast("samples/call-webhook", "--input", tmp_path / "input.json")
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert done.returncode == 0, done.stderr

    (request,) = receiver.received
    assert request["path"] == "/hooks/deploy"
    assert request["body"] == {"event": "deploy", "source": "ci", "payload": payload}
    assert request["headers"]["content-type"] == "application/json"
    assert request["headers"]["x-spell-source"] == "ci"
    assert request["headers"]["x-spell-event"] == "deploy"

    log = cast_log(done)
    assert log["success"] is True
    assert [(c["type"], c["success"], c["message"]) for c in log["checks"]] == [
        ("http_status", True, "http status matched: 200"),
        ("jsonpath_equals", True, "jsonpath matched: data.accepted"),
    ]
    (step,) = log["steps"]
    assert (step["stepName"], step["success"]) == ("notify", True)
    assert step["message"] == f"http POST {given['webhook_url']} -> 200"
    reply = log["outputs"]["step.notify.json"]
    assert reply["data"]["accepted"] is True
    assert reply["health_url"] == receiver.base_url + "/health"


def test_call_webhook_fails_when_the_receiver_refuses(cast, store):
    with FakeServer({}) as server:
        refusal = {"data": {"accepted": False}, "health_url": server.base_url + "/ok"}
        server.routes = {("POST", "/hook"): (422, refusal), ("GET", "/ok"): (200, {})}
        params = {**WEBHOOK_INPUT, "webhook_url": server.base_url + "/hook"}
        done = cast("samples/call-webhook", params=params)
    assert done.returncode == 1 and "execution_id:" not in done.stdout
    assert done.stderr == (
        "check failed: jsonpath mismatch at data.accepted: expected true, got false\n"
    )
    log = latest_log(store)
    assert log["success"] is False
    assert [check["success"] for check in log["checks"]] == [True, False]
    assert [request["path"] for request in server.requests] == ["/hook", "/ok"]


# Real casts: publish-site #####################################################


def test_publish_site_builds_and_publishes(cast, store, tmp_path):
    live = tmp_path / "www" / "api-demo"
    live.mkdir(parents=True)
    (live / "old.html").write_text("the previous release")
    params = {
        "site_name": "api-demo",
        "title": "Notes <& more>",
        "target_dir": str(live.parent),
    }
    done = cast("samples/publish-site", "--yes", params=params)
    assert done.returncode == 0, done.stderr

    built = installed_dir(store, "samples/publish-site") / "artifacts"
    page = (built / "site" / "index.html").read_text(encoding="utf-8")
    assert "<title>Notes &lt;&amp; more&gt;</title>" in page
    assert os.listdir(live) == ["index.html"], "the old copy is replaced whole"
    assert (live / "index.html").read_text(encoding="utf-8") == page
    assert os.listdir(live.parent) == ["api-demo"], "no temporary folder is left"

    record = json.loads((built / "publish.json").read_text(encoding="utf-8"))
    assert record["published_to"] == str(live)
    data = page.encode("utf-8")
    assert record["files"] == [
        {
            "path": "index.html",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    ]

    log = cast_log(done)
    assert log["success"] is True
    assert [(s["stepName"], s["success"]) for s in log["steps"]] == [
        ("build", True),
        ("publish", True),
    ]
    assert [(c["type"], c["success"], c["message"]) for c in log["checks"]] == [
        ("exit_code", True, "all steps succeeded"),
        ("file_exists", True, f"file exists: {built / 'site' / 'index.html'}"),
    ]


def test_publish_site_without_a_target_only_builds(cast, store):
    done = cast("samples/publish-site", "--yes", params={"site_name": "demo"})
    assert done.returncode == 0, done.stderr
    built = installed_dir(store, "samples/publish-site") / "artifacts"
    record = json.loads((built / "publish.json").read_text(encoding="utf-8"))
    assert (record["site_name"], record["published_to"]) == ("demo", None)


# Real casts: repo-ops #########################################################


def _git(*args, cwd) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@pytest.fixture
def clone(tmp_path) -> Path:
    path = tmp_path / "clone"
    path.mkdir()
    _git("init", "-q", "-b", "main", cwd=path)
    who = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    _git(*who, "commit", "-q", "--allow-empty", "-m", "first", cwd=path)
    return path


def _assert_token_hidden(done, store):
    assert TOKEN not in done.stdout and TOKEN not in done.stderr
    for log in (store / "logs").glob("*.json"):
        assert TOKEN not in log.read_text(encoding="utf-8")


def test_repo_ops_tags_a_local_clone(cast, store, clone):
    head = _git("rev-parse", "main", cwd=clone)
    params = {"branch": "main", "tag": "v1.4.0", "path": str(clone)}
    done = cast("samples/repo-ops", params=params, CONNECTOR_GITHUB_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert _git("rev-parse", "v1.4.0^{commit}", cwd=clone) == head
    printed = cast_log(done)["outputs"]["step.tag.stdout"]
    assert printed == f"tagged main at {head} as v1.4.0 in {clone}\n"
    _assert_token_hidden(done, store)

    again = cast("samples/repo-ops", params=params, CONNECTOR_GITHUB_TOKEN=TOKEN)
    assert again.returncode == 1
    assert again.stderr == "step failed: tag (exit code 1)\n"
    (step,) = latest_log(store)["steps"]
    assert "tag 'v1.4.0' already exists" in step["stderr_head"]


def test_repo_ops_creates_the_tag_through_the_github_api(cast, store):
    sha = "3f" * 20
    routes = {
        ("GET", "/repos/acme/web/git/ref/heads/main"): (200, {"object": {"sha": sha}}),
        ("POST", "/repos/acme/web/git/refs"): (201, {"ref": "refs/tags/v2.0.0"}),
    }
    params = {"branch": "main", "tag": "v2.0.0", "repository": "acme/web", "push": True}
    with FakeServer(routes) as github:
        done = cast(
            "samples/repo-ops",
            params=params,
            CONNECTOR_GITHUB_TOKEN=TOKEN,
            GITHUB_API_URL=github.base_url,
        )
    assert done.returncode == 0, done.stderr
    get, post = github.requests
    assert (get["method"], get["path"]) == ("GET", "/repos/acme/web/git/ref/heads/main")
    assert (post["method"], post["path"]) == ("POST", "/repos/acme/web/git/refs")
    assert post["body"] == {"ref": "refs/tags/v2.0.0", "sha": sha}
    for request in (get, post):
        assert request["headers"]["authorization"] == f"Bearer {TOKEN}"
        assert request["headers"]["accept"] == "application/vnd.github+json"
    printed = cast_log(done)["outputs"]["step.tag.stdout"]
    assert printed == f"created refs/tags/v2.0.0 on acme/web at {sha}\n"
    _assert_token_hidden(done, store)


def test_repo_ops_reports_github_refusals_and_follows_no_redirect(cast, store):
    sha = "3f" * 20
    params = {"branch": "main", "tag": "v2.0.0", "repository": "acme/web", "push": True}
    with FakeServer({}) as github:
        elsewhere = {"location": github.base_url + "/elsewhere"}
        github.routes = {
            ("GET", "/repos/acme/web/git/ref/heads/main"): (
                200,
                {"object": {"sha": sha}},
            ),
            ("POST", "/repos/acme/web/git/refs"): (
                422,
                {"message": "Reference already exists"},
            ),
        }
        refused = cast(
            "samples/repo-ops",
            params=params,
            CONNECTOR_GITHUB_TOKEN=TOKEN,
            GITHUB_API_URL=github.base_url,
        )
        (step,) = latest_log(store)["steps"]
        github.routes = {
            ("GET", "/repos/acme/web/git/ref/heads/main"): (301, {}, elsewhere),
        }
        moved = cast(
            "samples/repo-ops",
            params=params,
            CONNECTOR_GITHUB_TOKEN=TOKEN,
            GITHUB_API_URL=github.base_url,
        )
    assert refused.returncode == 1
    assert (
        f"github answered 422 to POST {github.base_url}/repos/acme/web/git/refs: "
        "Reference already exists" in step["stderr_head"]
    )
    assert moved.returncode == 1
    assert "github answered 301 to GET" in latest_log(store)["steps"][0]["stderr_head"]
    assert "/elsewhere" not in [request["path"] for request in github.requests]
    _assert_token_hidden(moved, store)


def test_repo_ops_without_push_only_prints_the_requests(cast, store):
    params = {"branch": "main", "tag": "v3", "repository": "acme/web"}
    with FakeServer({}) as github:
        done = cast(
            "samples/repo-ops",
            params=params,
            CONNECTOR_GITHUB_TOKEN=TOKEN,
            GITHUB_API_URL=github.base_url,
        )
    assert done.returncode == 0, done.stderr
    assert github.requests == []
    printed = cast_log(done)["outputs"]["step.tag.stdout"]
    assert f"would send: POST {github.base_url}/repos/acme/web/git/refs" in printed
    assert "(authenticated by CONNECTOR_GITHUB_TOKEN)" in printed
    _assert_token_hidden(done, store)


def test_repo_ops_never_sends_the_token_over_plain_http(cast, store):
    done = cast(
        "samples/repo-ops",
        params={"branch": "main", "repository": "acme/web", "push": True},
        CONNECTOR_GITHUB_TOKEN=TOKEN,
        GITHUB_API_URL="http://github.example.invalid",
    )
    assert done.returncode == 1
    (step,) = latest_log(store)["steps"]
    assert "GITHUB_API_URL must be https" in step["stderr_head"]


def test_repo_ops_with_nothing_to_do_fails(cast, store):
    done = cast(
        "samples/repo-ops", params={"branch": "main"}, CONNECTOR_GITHUB_TOKEN=TOKEN
    )
    assert done.returncode == 1
    (step,) = latest_log(store)["steps"]
    assert "nothing to do" in step["stderr_head"]


# The button registry ##########################################################


def _registry() -> dict:
    return json.loads(REGISTRY.read_text(encoding="utf-8"))


def _registry_validator():
    schema = json.loads(REGISTRY_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _buttons() -> dict:
    return {button["button_id"]: button for button in _registry()["buttons"]}


def test_registry_matches_its_schema():
    assert list(_registry_validator().iter_errors(_registry())) == []


def test_registry_button_ids_are_unique():
    ids = [button["button_id"] for button in _registry()["buttons"]]
    assert len(ids) == len(set(ids))


def test_registry_wires_the_samples():
    buttons = _buttons()
    hello = buttons["say_hello"]
    assert (hello["spell_id"], hello["version"]) == ("samples/hello", "1.0.0")
    assert hello["defaults"] == {"name": "world"}
    assert hello["required_confirmations"] == {"risk": False, "billing": False}
    assert {"anonymous", "operator", "admin"} <= set(hello["allowed_roles"])
    assert buttons["call_webhook_demo"]["spell_id"] == "samples/call-webhook"
    assert buttons["repo_ops_guarded"]["spell_id"] == "samples/repo-ops"
    assert buttons["repo_ops_guarded"]["require_signature"] is False
    site = buttons["publish_site_high_risk"]
    assert site["spell_id"] == "samples/publish-site"
    assert site["required_confirmations"] == {"risk": True, "billing": False}


def _merge(defaults: dict, given: dict) -> dict:
    """The API's deep merge: objects merge, anything else replaces."""
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@pytest.mark.parametrize("button_id", sorted(_buttons()))
def test_each_button_fits_its_spell(button_id):
    """The version exists, defaults pass the schema, confirmations fit the risk."""
    button = _buttons()[button_id]
    folder = _sample_for(button["spell_id"])
    manifest = _manifest(folder)
    assert button["version"] == manifest["version"]
    jsonschema.Draft202012Validator(_schema(folder)).validate(button["defaults"])
    # A high-risk spell fails without --yes, and only a risk confirmation adds it.
    confirmations = button["required_confirmations"]
    assert confirmations["risk"] is (manifest["risk"] in ("high", "critical"))
    assert confirmations["billing"] is manifest["billing"]["enabled"]


def test_the_demo_request_passes_the_hello_schema():
    """examples/demo.sh posts {"button_id":"say_hello","input":{"name":"api"}}."""
    merged = _merge(_buttons()["say_hello"]["defaults"], {"name": "api"})
    jsonschema.Draft202012Validator(_schema("hello")).validate(merged)


def _with(**changes) -> dict:
    """A registry of one button: say_hello with ``changes`` (None deletes a key)."""
    button = copy.deepcopy(_buttons()["say_hello"])
    for key, value in changes.items():
        if value is None:
            del button[key]
        else:
            button[key] = value
    return {"version": "v1", "buttons": [button]}


NO_CONFIRMATIONS = {"risk": False, "billing": False}
VALID_REGISTRIES = {
    "optional keys left out": _with(
        label=None, description=None, require_signature=None
    ),
    "owners": _with(owners=["platform-team"]),
    "empty label and description": _with(label="", description=""),
    "whitespace button_id": _with(button_id=" "),
    "duplicate roles": _with(allowed_roles=["admin", "admin"]),
}
INVALID_REGISTRIES = {
    "not an object": [],
    "version v2": {**_with(), "version": "v2"},
    "no version": {"buttons": _with()["buttons"]},
    "no buttons": {"version": "v1", "buttons": []},
    "extra root key": {**_with(), "x": 1},
    "missing spell_id": _with(spell_id=None),
    "only button_id": {"version": "v1", "buttons": [{"button_id": "b"}]},
    "extra button key": _with(spell="samples/hello"),
    "empty button_id": _with(button_id=""),
    "empty version": _with(version=""),
    "defaults array": _with(defaults=[]),
    "no roles": _with(allowed_roles=[]),
    "empty role": _with(allowed_roles=[""]),
    "risk not boolean": _with(required_confirmations={"risk": "yes", "billing": False}),
    "billing missing": _with(required_confirmations={"risk": False}),
    "extra confirmation": _with(required_confirmations={**NO_CONFIRMATIONS, "x": True}),
    "signature not boolean": _with(require_signature="false"),
    "label not string": _with(label=1),
    "empty owner": _with(owners=[""]),
}


@pytest.mark.parametrize("name", sorted(VALID_REGISTRIES))
def test_registry_schema_accepts(name):
    assert list(_registry_validator().iter_errors(VALID_REGISTRIES[name])) == []


@pytest.mark.parametrize("name", sorted(INVALID_REGISTRIES))
def test_registry_schema_refuses(name):
    assert list(_registry_validator().iter_errors(INVALID_REGISTRIES[name])) != []


def _api_function(name: str):
    import spell

    function = getattr(spell, name, None)
    if function is None:
        pytest.skip(f"spell.{name} is not in spell.py yet")
    return function


def test_the_api_loads_the_example_registry():
    registry = _api_function("load_button_registry")(str(REGISTRY))
    assert registry.version == "v1"
    assert [button.button_id for button in registry.buttons] == list(_buttons())
    for button_id, raw in _buttons().items():
        public = registry.by_id[button_id].public()
        assert public == {
            "button_id": button_id,
            "label": raw.get("label", button_id),
            "description": raw.get("description", ""),
            "spell_id": raw["spell_id"],
            "version": raw["version"],
            "defaults": raw["defaults"],
            "required_confirmations": raw["required_confirmations"],
            "require_signature": raw.get("require_signature", False),
            "allowed_roles": raw["allowed_roles"],
        }


# The registry through the Execution API #######################################


@pytest.fixture
def api(installed, monkeypatch):
    """The Execution API on 127.0.0.1 with the example registry and the samples."""
    start = _api_function("start_execution_api_server")
    for name in list(os.environ):
        if name.startswith(_STEERING + ("SPELL_BUTTON_",)):
            monkeypatch.delenv(name)
    server = start(registryPath=str(REGISTRY), quiet=True)
    yield server
    server.close(cancel=True)


def _call(server, method: str, path: str, body=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        data = None if body is None else json.dumps(body)
        headers = {"content-type": "application/json"} if data else {}
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _press(server, body: dict) -> dict:
    """POST an execution, wait until it ends, return its detail."""
    status, accepted = _call(server, "POST", "/api/spell-executions", body)
    assert (status, accepted["status"]) == (202, "queued"), accepted
    deadline = time.monotonic() + 60
    while True:
        path = f"/api/spell-executions/{accepted['execution_id']}"
        status, detail = _call(server, "GET", path)
        assert status == 200, detail
        if detail["execution"]["status"] not in ("queued", "running"):
            return detail
        if time.monotonic() > deadline:
            pytest.fail(f"execution did not end: {detail}")
        time.sleep(0.05)


def test_api_lists_the_example_buttons(api):
    status, body = _call(api, "GET", "/api/buttons")
    assert status == 200
    assert [button["button_id"] for button in body["buttons"]] == list(_buttons())


def test_api_says_hello_to_anyone(api):
    """What examples/demo.sh does: no auth, no role, the hello button."""
    detail = _press(api, {"button_id": "say_hello", "input": {"name": "api"}})
    execution, receipt = detail["execution"], detail["receipt"]
    assert (execution["status"], execution["actor_role"]) == ("succeeded", "anonymous")
    assert receipt["id"] == "samples/hello" and receipt["success"] is True
    assert [step["stepName"] for step in receipt["steps"]] == ["hello"]


def test_api_publishes_the_site_only_with_a_risk_confirmation(api, store):
    press = {"button_id": "publish_site_high_risk", "actor_role": "admin"}
    status, body = _call(api, "POST", "/api/spell-executions", press)
    assert (status, body["error_code"]) == (400, "RISK_CONFIRMATION_REQUIRED")

    confirmed = {
        **press,
        "input": {"site_name": "api-demo"},
        "confirmation": {"risk_acknowledged": True},
    }
    detail = _press(api, confirmed)
    assert detail["execution"]["status"] == "succeeded", detail
    receipt = detail["receipt"]
    assert "stdout_head" not in json.dumps(receipt)
    page = installed_dir(store, "samples/publish-site") / "artifacts/site/index.html"
    assert "api-demo" in page.read_text(encoding="utf-8")
    assert [check["type"] for check in receipt["checks"]] == [
        "exit_code",
        "file_exists",
    ]


def test_api_repo_ops_fails_without_the_token(api):
    detail = _press(api, {"button_id": "repo_ops_guarded", "actor_role": "admin"})
    execution = detail["execution"]
    assert (execution["status"], execution["error_code"]) == (
        "failed",
        "CONNECTOR_TOKEN_MISSING",
    )


def test_api_calls_the_webhook_with_merged_defaults(api):
    receiver = _load_receiver().Receiver(("127.0.0.1", 0))
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        given = {"webhook_url": receiver.base_url + "/hook", "payload": {"build": 7}}
        press = {"button_id": "call_webhook_demo", "actor_role": "operator"}
        detail = _press(api, {**press, "input": given})
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert detail["execution"]["status"] == "succeeded", detail
    (request,) = receiver.received
    assert request["body"] == {
        "event": "deploy",
        "source": "manual",
        "payload": {"service": "web", "build": 7},
    }
