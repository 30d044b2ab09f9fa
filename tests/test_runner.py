"""Tests of spell_runner, the step engine: real processes, real local HTTP servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import spell_runner  # noqa: E402
from spell_runner import UNDEFINED, StepError, dumps_js, js_string  # noqa: E402

PY = sys.executable

# Helpers ##############################################################################


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """An empty bundle directory with a steps/ folder."""
    root = tmp_path / "bundle"
    (root / "steps").mkdir(parents=True)
    (root / "spell.yaml").write_text("id: test/runner\n")
    return root


def write_step(bundle: Path, name: str, text: str, mode: int = 0o755) -> str:
    """Write steps/<name> with ``text`` (dedented) and return its run path."""
    path = bundle / "steps" / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    path.chmod(mode)
    return f"steps/{name}"


def shell(name: str, run: str) -> dict:
    return {"name": name, "uses": "shell", "run": run}


def make_plan(bundle: Path, steps: list, checks: list | None = None, **extra) -> dict:
    input_path = bundle.parent / "input.json"
    input_obj = extra.pop("input", {})
    input_path.write_text(json.dumps(input_obj))
    plan = {
        "bundle_dir": str(bundle),
        "steps": steps,
        "checks": checks or [],
        "input": input_obj,
        "input_path": str(input_path),
        "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        "step_timeout_ms": 60000,
        "execution_timeout_ms": None,
    }
    plan.update(extra)
    return plan


def write_daemon(bundle: Path, pids: Path) -> str:
    """A helper that leaves the step's session with setsid() and records its pid."""
    path = bundle.parent / "daemon.py"
    path.write_text(
        "import os, sys, time\n"
        "os.setsid()\n"
        f"with open({str(pids)!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "time.sleep(60)\n"
    )
    return f"{PY} {path}"


def alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] != b"Z"


def wait_for_pids(path: Path, count: int, timeout: float = 5.0) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) >= count:
                return pids
        time.sleep(0.01)
    raise AssertionError(f"step did not write {count} pids to {path}")


# A local HTTP server ##################################################################


class _Handler(BaseHTTPRequestHandler):
    """Routes: /json, /echo..., /status/<code>, /text, /slow; records each request."""

    def log_message(self, format, *args):  # quiet in tests
        pass

    def _answer(
        self, status: int, body: bytes, ctype: str = "application/json"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except BrokenPipeError:  # the client gave up (timeout tests)
                pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
            }
        )
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/json":
            payload = {
                "data": {"id": "abc123", "n": 1, "list": [1, 2]},
                "health_url": base + "/status/200",
            }
            self._answer(200, json.dumps(payload).encode())
        elif self.path.startswith("/status/"):
            self._answer(int(self.path.rsplit("/", 1)[1]), b"nope", "text/plain")
        elif self.path == "/text":
            self._answer(200, "plain é text".encode(), "text/plain")
        elif self.path == "/slow":
            time.sleep(1.5)
            self._answer(200, b"{}")
        else:
            self._answer(201, json.dumps({"ok": True, "path": self.path}).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests = []
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_port}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_step(bundle: Path, name: str, definition) -> dict:
    path = bundle / "steps" / f"{name}.json"
    path.write_text(
        definition if isinstance(definition, str) else json.dumps(definition)
    )
    return {"name": name, "uses": "http", "run": f"steps/{name}.json"}


# Shell steps ##########################################################################


def test_success_plan_shape_and_outputs(bundle: Path) -> None:
    run = write_step(
        bundle,
        "hello.sh",
        """
        #!/bin/sh
        echo "hello $(cat "$INPUT_JSON") cwd=$(pwd)"
        echo warn >&2
    """,
    )
    plan = make_plan(
        bundle,
        [shell("hello", run)],
        [{"type": "exit_code", "params": {}}],
        input={"name": "world"},
    )
    result = spell_runner.run_plan(plan)
    assert list(result) == ["success", "stepResults", "outputs", "checks"]
    assert result["success"] is True
    [record] = result["stepResults"]
    assert list(record) == [
        "stepName",
        "uses",
        "started_at",
        "finished_at",
        "success",
        "exitCode",
        "stdout_head",
        "stderr_head",
        "message",
    ]
    expected = f'hello {{"name": "world"}} cwd={bundle}\n'
    assert record["stdout_head"] == expected
    assert record["stderr_head"] == "warn\n"
    assert record["exitCode"] == 0 and record["message"] == "ok"
    assert result["outputs"] == {"step.hello.stdout": expected}
    assert result["checks"] == [
        {"type": "exit_code", "success": True, "message": "all steps succeeded"}
    ]


def test_failing_step_keeps_earlier_steps_and_its_own_record(bundle: Path) -> None:
    a = write_step(bundle, "a.sh", "#!/bin/sh\necho first\n")
    b = write_step(bundle, "b.sh", "#!/bin/sh\necho out-b\necho boom >&2\nexit 3\n")
    c = write_step(bundle, "c.sh", "#!/bin/sh\necho never\n")
    plan = make_plan(
        bundle, [shell("a", a), shell("b", b), shell("c", c)], [{"type": "exit_code"}]
    )
    result = spell_runner.run_plan(plan)
    assert list(result) == ["success", "error", "stepResults", "outputs", "checks"]
    assert result["success"] is False
    assert result["error"] == "step failed: b (exit code 3)"
    assert [r["stepName"] for r in result["stepResults"]] == ["a", "b"]
    failed = result["stepResults"][1]
    assert failed["success"] is False and failed["exitCode"] == 3
    assert failed["stderr_head"] == "boom\n"
    assert failed["message"] == "non-zero exit code: 3"
    assert result["outputs"]["step.a.stdout"] == "first\n"
    assert result["checks"] == []


def test_step_killed_by_signal_has_null_exit_code(bundle: Path) -> None:
    run = write_step(bundle, "sig.sh", "#!/bin/sh\nkill -9 $$\n")
    result = spell_runner.run_plan(make_plan(bundle, [shell("sig", run)]))
    assert result["error"] == "step failed: sig (exit code null)"
    assert result["stepResults"][0]["exitCode"] is None
    assert result["stepResults"][0]["message"] == "non-zero exit code: null"


def test_step_reading_stdin_gets_eof(bundle: Path) -> None:
    run = write_step(bundle, "cat.sh", "#!/bin/sh\ncat\necho done\n")
    plan = make_plan(bundle, [shell("cat", run)], step_timeout_ms=5000)
    started = time.monotonic()
    result = spell_runner.run_plan(plan)
    assert result["success"] is True
    assert result["outputs"]["step.cat.stdout"] == "done\n"
    assert time.monotonic() - started < 2


def test_script_without_shebang_runs_with_sh(bundle: Path) -> None:
    run = write_step(bundle, "plain.sh", "echo noshebang $((1 + 2))\n")
    result = spell_runner.run_plan(make_plan(bundle, [shell("plain", run)]))
    assert result["success"] is True
    assert result["outputs"]["step.plain.stdout"] == "noshebang 3\n"


def test_spawn_error_message(bundle: Path) -> None:
    run = write_step(bundle, "noexec.sh", "#!/bin/sh\necho hi\n", mode=0o644)
    result = spell_runner.run_plan(make_plan(bundle, [shell("x", run)]))
    assert result["error"] == "failed to execute shell step 'x': Permission denied"
    assert result["stepResults"][0]["success"] is False
    missing = spell_runner.run_plan(make_plan(bundle, [shell("y", "steps/nope.sh")]))
    assert (
        missing["error"]
        == "failed to execute shell step 'y': No such file or directory"
    )


def test_step_env_is_plan_env_plus_input_json(bundle: Path) -> None:
    run = write_step(
        bundle, "env.sh", '#!/bin/sh\necho "$ONLY_IN_PLAN|$INPUT_JSON|$HOME"\n'
    )
    plan = make_plan(bundle, [shell("env", run)])
    plan["env"]["ONLY_IN_PLAN"] = "yes"
    result = spell_runner.run_plan(plan)
    assert result["outputs"]["step.env.stdout"] == f"yes|{plan['input_path']}|\n"


def test_step_timeout_is_reported_on_time(bundle: Path) -> None:
    run = write_step(bundle, "slow.sh", "#!/bin/sh\necho started\nsleep 10\n")
    plan = make_plan(bundle, [shell("slow", run)], step_timeout_ms=300)
    started = time.monotonic()
    result = spell_runner.run_plan(plan)
    elapsed = time.monotonic() - started
    assert result["error"] == "shell step 'slow' timed out after 300ms"
    assert 0.29 < elapsed < 1.5
    record = result["stepResults"][0]
    assert record["message"] == "timed out" and record["exitCode"] is None
    assert record["stdout_head"] == "started\n"


def test_execution_timeout_caps_the_step(bundle: Path) -> None:
    fast = write_step(bundle, "fast.sh", "#!/bin/sh\necho ok\n")
    slow = write_step(bundle, "slow.sh", "#!/bin/sh\nsleep 10\n")
    plan = make_plan(
        bundle,
        [shell("fast", fast), shell("slow", slow)],
        step_timeout_ms=5000,
        execution_timeout_ms=400,
    )
    started = time.monotonic()
    result = spell_runner.run_plan(plan)
    assert (
        result["error"]
        == "cast execution timed out after 400ms while running step 'slow'"
    )
    assert time.monotonic() - started < 1.5
    assert [r["success"] for r in result["stepResults"]] == [True, False]


def test_zero_execution_timeout_means_none(bundle: Path) -> None:
    run = write_step(bundle, "a.sh", "#!/bin/sh\nsleep 0.05\n")
    result = spell_runner.run_plan(
        make_plan(bundle, [shell("a", run)], execution_timeout_ms=0)
    )
    assert result["success"] is True


def test_timeout_kills_grandchildren_ignoring_sigterm_and_setsid(bundle: Path) -> None:
    pids = bundle.parent / "pids"
    run = write_step(
        bundle,
        "spawn.sh",
        f"""
        #!/bin/sh
        sh -c 'trap "" TERM HUP; echo $$ >> "{pids}"; exec sleep 60' &
        {write_daemon(bundle, pids)} &
        ( sleep 60 & echo $! >> "{pids}" )
        sleep 60
    """,
    )
    plan = make_plan(bundle, [shell("spawn", run)], step_timeout_ms=800)
    result = spell_runner.run_plan(plan)
    assert result["error"] == "shell step 'spawn' timed out after 800ms"
    found = wait_for_pids(pids, 3)
    assert [pid for pid in found if alive(pid)] == []


def test_background_children_are_killed_when_step_succeeds(bundle: Path) -> None:
    pids = bundle.parent / "pids"
    run = write_step(
        bundle,
        "daemon.sh",
        f"""
        #!/bin/sh
        {write_daemon(bundle, pids)} &
        while [ ! -s "{pids}" ]; do sleep 0.01; done
        echo main done
    """,
    )
    result = spell_runner.run_plan(make_plan(bundle, [shell("daemon", run)]))
    assert result["success"] is True
    [pid] = wait_for_pids(pids, 1)
    assert not alive(pid)


def test_background_child_holding_stdout_does_not_block(bundle: Path) -> None:
    run = write_step(bundle, "bg.sh", "#!/bin/sh\nsleep 5 &\necho main\n")
    started = time.monotonic()
    result = spell_runner.run_plan(make_plan(bundle, [shell("bg", run)]))
    assert result["success"] is True
    assert result["outputs"]["step.bg.stdout"] == "main\n"
    assert time.monotonic() - started < 2


def test_multibyte_characters_split_across_writes_are_kept(bundle: Path) -> None:
    run = write_step(
        bundle,
        "utf8.py",
        f"""
        #!{PY}
        import sys, time
        data = "é€😀".encode()
        for i in range(len(data)):
            sys.stdout.buffer.write(data[i:i + 1])
            sys.stdout.buffer.flush()
            time.sleep(0.01)
    """,
    )
    events = []
    result = spell_runner.run_plan(
        make_plan(bundle, [shell("u", run)]), on_event=events.append
    )
    assert result["outputs"]["step.u.stdout"] == "é€😀"
    streamed = "".join(e["text"] for e in events if e["event"] == "output")
    assert streamed == "é€😀"


def test_large_output_is_capped_with_small_memory(bundle: Path) -> None:
    size = 64 * 1024 * 1024
    run = write_step(
        bundle,
        "big.sh",
        f"""
        #!/bin/sh
        printf START
        head -c {size} /dev/zero | tr '\\0' 'x'
        printf END
    """,
    )
    plan = make_plan(bundle, [shell("big", run)])
    plan_path = bundle.parent / "plan.json"
    plan_path.write_text(json.dumps(plan))
    # VmHWM (peak resident memory of this process image) rather than ru_maxrss,
    # which Linux carries over from the forking parent across exec.
    code = textwrap.dedent(f"""
        import json, re, sys
        sys.path.insert(0, {str(ROOT)!r})
        import spell_runner

        def peak_kib():
            status = open("/proc/self/status").read()
            return int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1))

        plan = json.load(open({str(plan_path)!r}))
        before = peak_kib()
        result = spell_runner.run_plan(plan)
        out = result["outputs"]["step.big.stdout"]
        print(json.dumps({{
            "before_kib": before, "after_kib": peak_kib(), "len": len(out),
            "start": out[:5], "end": out[-3:], "success": result["success"],
            "marker": out.count("bytes of output cut]"),
        }}))
    """)
    # Coverage tracing in the child would count against the budget: keep it out.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COV_CORE_") and k != "COVERAGE_PROCESS_START"}
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["success"] is True
    assert report["start"] == "START" and report["end"] == "END"
    assert report["marker"] == 1
    # 64 MiB went through; the peak grew by a few MiB at most.
    assert report["after_kib"] - report["before_kib"] < 12 * 1024, report
    kept = spell_runner.OUTPUT_HEAD_BYTES + spell_runner.OUTPUT_TAIL_BYTES
    dropped = size + len("STARTEND") - kept
    assert report["len"] == kept + len(f"\n[spell: {dropped} bytes of output cut]\n")


def test_capped_buffer_marks_the_cut() -> None:
    buffer = spell_runner._CappedBuffer(head_bytes=4, tail_bytes=3)
    for chunk in (b"ab", b"cdefg", b"hij"):
        buffer.add(chunk)
    assert buffer.text() == "abcd\n[spell: 3 bytes of output cut]\nhij"
    whole = spell_runner._CappedBuffer(head_bytes=1, tail_bytes=10)
    whole.add("é".encode())
    assert whole.text() == "é"


def test_events_and_a_failing_listener(bundle: Path) -> None:
    run = write_step(bundle, "e.sh", "#!/bin/sh\necho out\necho err >&2\n")
    seen = []

    def listener(event: dict) -> None:
        seen.append(event)
        raise RuntimeError("listener bug")

    result = spell_runner.run_plan(
        make_plan(bundle, [shell("e", run)]), on_event=listener
    )
    assert result["success"] is True
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "step_start" and kinds[-1] == "step_end"
    assert seen[0] == {"event": "step_start", "step": "e", "uses": "shell"}
    end = seen[-1]
    assert end["success"] is True and end["exit_code"] == 0
    assert isinstance(end["duration_ms"], int)
    outputs = {(e["stream"], e["text"]) for e in seen if e["event"] == "output"}
    assert outputs == {("stdout", "out\n"), ("stderr", "err\n")}


def test_plan_errors() -> None:
    with pytest.raises(spell_runner.PlanError):
        spell_runner.run_plan({"steps": []})
    with pytest.raises(spell_runner.PlanError):
        spell_runner.run_plan({"bundle_dir": "/x", "step_timeout_ms": 0})


# HTTP steps and checks ################################################################


def test_http_step_with_templates_and_checks(bundle: Path, server) -> None:
    step = http_step(
        bundle,
        "request",
        {
            "method": "{{INPUT.method}}",
            "url": server.base + "/deploy/{{INPUT.project}}?n={{INPUT.n}}",
            "headers": {
                "X-Test-Header": "{{ENV.TEST_HEADER}}",
                "X-Source": "spell {{INPUT.project}}",
            },
            "body": {"project": "{{INPUT.project}}", "payload": "{{INPUT.payload}}"},
        },
    )
    fetch = http_step(bundle, "fetch", {"method": "get", "url": server.base + "/json"})
    checks = [
        {
            "type": "http_status",
            "params": {"url_from_output": "step.fetch.json.health_url", "expect": 200},
        },
        {
            "type": "jsonpath_equals",
            "params": {
                "from_output": "step.fetch.json",
                "path": "data.id",
                "expected": "abc123",
            },
        },
        {
            "type": "jsonpath_equals",
            "params": {
                "from_output": "step.fetch.json.data",
                "path": "list",
                "expected": [1, 2.0],
            },
        },
    ]
    plan = make_plan(
        bundle,
        [step, fetch],
        checks,
        input={
            "method": "post",
            "project": "demo",
            "n": 5,
            "payload": {"service": "web", "replicas": 2},
        },
    )
    plan["env"]["TEST_HEADER"] = "header-value"
    result = spell_runner.run_plan(plan)
    assert result["success"] is True, result
    first, second = result["stepResults"]
    assert list(first) == [
        "stepName",
        "uses",
        "started_at",
        "finished_at",
        "success",
        "message",
    ]
    assert first["message"] == f"http POST {server.base}/deploy/demo?n=5 -> 201"
    assert second["message"] == f"http GET {server.base}/json -> 200"
    received = server.requests[0]
    assert received["method"] == "POST" and received["path"] == "/deploy/demo?n=5"
    assert received["headers"]["x-test-header"] == "header-value"
    assert received["headers"]["x-source"] == "spell demo"
    assert received["headers"]["content-type"] == "application/json"
    assert json.loads(received["body"]) == {
        "project": "demo",
        "payload": {"service": "web", "replicas": 2},
    }
    assert result["outputs"]["step.request.json"] == {
        "ok": True,
        "path": "/deploy/demo?n=5",
    }
    assert result["outputs"]["step.fetch.json"]["data"]["id"] == "abc123"
    assert [c["message"] for c in result["checks"]] == [
        "http status matched: 200",
        "jsonpath matched: data.id",
        "jsonpath matched: list",
    ]


def test_http_string_body_and_text_response(bundle: Path, server) -> None:
    step = http_step(
        bundle,
        "t",
        {"method": "PUT", "url": server.base + "/text", "body": "raw {{INPUT.s}}"},
    )
    result = spell_runner.run_plan(make_plan(bundle, [step], input={"s": "$&"}))
    assert result["outputs"]["step.t.json"] == "plain é text"
    received = server.requests[0]
    assert received["body"] == b"raw $&"
    assert received["headers"]["content-type"] == "text/plain;charset=UTF-8"


def test_http_4xx_is_success(bundle: Path, server) -> None:
    step = http_step(
        bundle, "nf", {"method": "GET", "url": server.base + "/status/404"}
    )
    checks = [
        {
            "type": "http_status",
            "params": {"url": server.base + "/status/503", "expect": 200},
        }
    ]
    result = spell_runner.run_plan(make_plan(bundle, [step], checks))
    assert result["stepResults"][0]["success"] is True
    assert (
        result["stepResults"][0]["message"]
        == f"http GET {server.base}/status/404 -> 404"
    )
    assert result["outputs"]["step.nf.json"] == "nope"
    assert (
        result["error"] == "check failed: http status mismatch: got 503, expected 200"
    )


def test_http_connection_refused(bundle: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/x"
    step = http_step(bundle, "down", {"method": "GET", "url": url})
    result = spell_runner.run_plan(make_plan(bundle, [step]))
    assert result["error"] == "http step 'down' request failed: Connection refused"
    assert result["stepResults"][0]["success"] is False
    check = [{"type": "http_status", "params": {"url": url, "expect": 200}}]
    result = spell_runner.run_plan(make_plan(bundle, [], check))
    assert result["error"] == "Connection refused"


def test_http_timeouts(bundle: Path, server) -> None:
    step = http_step(bundle, "slow", {"method": "GET", "url": server.base + "/slow"})
    started = time.monotonic()
    result = spell_runner.run_plan(make_plan(bundle, [step], http_timeout_ms=300))
    assert result["error"] == "http step 'slow' request failed: timed out after 300ms"
    result = spell_runner.run_plan(
        make_plan(bundle, [step], http_timeout_ms=5000, execution_timeout_ms=300)
    )
    assert (
        result["error"]
        == "cast execution timed out after 300ms while running step 'slow'"
    )
    check = [
        {"type": "http_status", "params": {"url": server.base + "/slow", "expect": 200}}
    ]
    result = spell_runner.run_plan(make_plan(bundle, [], check, http_timeout_ms=300))
    assert result["error"] == "timed out after 300ms"
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(
    "definition, message",
    [
        ("{not json", "failed to parse http step 'h' JSON: "),
        ("[1]", "http step 'h' definition must be an object"),
        ({"url": "http://x"}, "http step definition missing 'method' string"),
        (
            {"method": " ", "url": "http://x"},
            "http step definition missing 'method' string",
        ),
        ({"method": "GET", "url": 5}, "http step definition missing 'url' string"),
        (
            {"method": "GET", "url": "{{INPUT.n}}"},
            "http step 'h' url must resolve to string",
        ),
        (
            {"method": "GET", "url": "http://x", "headers": ["a"]},
            "http step headers must resolve to an object",
        ),
        (
            {"method": "GET", "url": "http://x", "headers": {"X-N": "{{INPUT.n}}"}},
            "http step header 'X-N' must be string",
        ),
        (
            {"method": "GET", "url": "http://x", "body": {}},
            "http step 'h' request failed: Request with GET/HEAD method cannot have body.",
        ),
        (
            {"method": "GET", "url": "not a url"},
            "http step 'h' request failed: unknown url type",
        ),
        (
            {"method": "GET", "url": "http://x/{{INPUT.missing}}"},
            "unresolved template: {{INPUT.missing}}",
        ),
    ],
)
def test_http_definition_errors(bundle: Path, definition, message: str) -> None:
    step = http_step(bundle, "h", definition)
    result = spell_runner.run_plan(make_plan(bundle, [step], input={"n": 3}))
    assert result["error"].startswith(message), result["error"]
    assert result["stepResults"][0]["message"] == result["error"]


def test_http_step_file_must_be_regular(bundle: Path) -> None:
    os.mkfifo(bundle / "steps" / "fifo.json")
    step = {"name": "f", "uses": "http", "run": "steps/fifo.json"}
    result = spell_runner.run_plan(make_plan(bundle, [step]))
    assert result["error"].startswith("http step 'f' file is not a regular file")


def test_headers_lowercased_last_wins_and_whole_value(bundle: Path, server) -> None:
    step = http_step(
        bundle,
        "h",
        {
            "method": "POST",
            "url": server.base + "/echo",
            "headers": "{{INPUT.h}}",
            "body": None,
        },
    )
    plan = make_plan(
        bundle, [step], input={"h": {"X-A": "1", "x-a": "2", "Content-Type": "text/x"}}
    )
    assert spell_runner.run_plan(plan)["success"] is True
    received = server.requests[0]
    assert received["headers"]["x-a"] == "2"
    assert received["headers"]["content-type"] == "text/x"
    assert received["body"] == b"null"


# Templating ###########################################################################


INPUT = {
    "s": "str",
    "n": 5,
    "f": 1.0,
    "obj": {"b": [1, 2], "c": "x"},
    "nil": None,
    "flag": True,
    "dollar": "$&$$$'",
    "tmpl": "{{ENV.SECRET}}",
    "arr": [{"id": "zero"}, "one"],
    "__proto__": "own",
}
ENV = {"SECRET": "hunter2", "TEST_TOKEN": "tok"}


@pytest.mark.parametrize(
    "template, expected",
    [
        ("https://api.test/{{INPUT.s}}", "https://api.test/str"),
        ("{{ENV.TEST_TOKEN}}", "tok"),
        ("{{INPUT.obj}}", {"b": [1, 2], "c": "x"}),
        ("{{ INPUT.n }}", 5),
        ("{{INPUT.nil}}", None),
        ("{{INPUT.flag}}", True),
        ("v={{INPUT.n}}", "v=5"),
        ("v={{INPUT.f}}", "v=1"),
        ("v={{INPUT.obj}}", 'v={"b":[1,2],"c":"x"}'),
        ("v={{INPUT.nil}}", "v=null"),
        ("x{{INPUT.dollar}}", "x$&$$$'"),
        ("{{INPUT.s}}-{{INPUT.s}}-{{ INPUT.s}}", "str-str-str"),
        ("a {{INPUT.tmpl}} b", "a {{ENV.SECRET}} b"),
        ("{{INPUT.tmpl}}", "{{ENV.SECRET}}"),
        ("{{INPUT.arr.0.id}}/{{INPUT.arr.1}}", "zero/one"),
        ("{{INPUT.__proto__}}", "own"),
        ("no tokens {here", "no tokens {here"),
        (
            ["{{INPUT.n}}", {"{{INPUT.s}}": "{{INPUT.s}}"}, 7, None],
            [5, {"{{INPUT.s}}": "str"}, 7, None],
        ),
    ],
)
def test_render_template(template, expected) -> None:
    assert spell_runner.render_template(template, INPUT, ENV) == expected


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{INPUT.missing}}", "unresolved template: {{INPUT.missing}}"),
        ("a {{ INPUT.missing }} b", "unresolved template: {{INPUT.missing}}"),
        ("{{ENV.NOPE}}", "unresolved template: {{ENV.NOPE}}"),
        ("{{input.s}}", "unresolved template: {{input.s}}"),
        ("{{OTHER.x}}", "unresolved template: {{OTHER.x}}"),
        ("{{INPUT.a b}}", "unresolved template: {{INPUT.a b}}"),
        ("{{INPUT.}}", "unresolved template: {{INPUT.}}"),
        ("{{INPUT.s}} and {{other}}", "unresolved template: str and {{other}}"),
        ("{{INPUT.s.length}}", "unresolved template: {{INPUT.s.length}}"),
        ("{{INPUT.arr.01}}", "unresolved template: {{INPUT.arr.01}}"),
        ("{{INPUT.arr.2}}", "unresolved template: {{INPUT.arr.2}}"),
        ("{{INPUT.obj.keys}}", "unresolved template: {{INPUT.obj.keys}}"),
        ("{{INPUT.constructor}}", "unresolved template: {{INPUT.constructor}}"),
        (
            {"a": ["ok", {"b": "{{INPUT.first}}"}], "c": "{{INPUT.second}}"},
            "unresolved template: {{INPUT.first}}",
        ),
    ],
)
def test_render_template_errors(template, message: str) -> None:
    with pytest.raises(StepError) as caught:
        spell_runner.render_template(template, INPUT, ENV)
    assert caught.value.message == message


def test_render_template_deep_nesting() -> None:
    value: object = "{{INPUT.n}}"
    for _ in range(3000):
        value = {"k": [value]}
    rendered = spell_runner.render_template(value, INPUT, ENV)
    for _ in range(3000):
        rendered = rendered["k"][0]
    assert rendered == 5


# Output references and checks #########################################################

OUTPUTS = {
    "step.echo.stdout": "hello\n",
    "step.deploy.json": {
        "data": {
            "id": "abc",
            "n": 1,
            "obj": {"a": [1, {"b": None}]},
            "flag": True,
            "arr": [1, None, [2, 3]],
        }
    },
}


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("step.echo.stdout", "hello\n"),
        ("step.deploy.json.data.id", "abc"),
        ("step.deploy.json.data.arr.2.0", 2),
        ("step.deploy.json.data.missing", UNDEFINED),
        ("step.deploy.json.data.id.length", UNDEFINED),
    ],
)
def test_resolve_output_ref(ref: str, expected) -> None:
    assert spell_runner.resolve_output_ref(ref, OUTPUTS) == expected


@pytest.mark.parametrize(
    "ref, message",
    [
        ("bad", "invalid output reference: bad"),
        ("step.x.y.json", "invalid output reference: step.x.y.json"),
        ("step..json", "invalid output reference: step..json"),
        ("step.a.other", "invalid output reference: step.a.other"),
        ("step.nope.json", "output reference not found: step.nope.json"),
        (
            "step.echo.stdout.x",
            "stdout reference does not support nested path: step.echo.stdout.x",
        ),
    ],
)
def test_resolve_output_ref_errors(ref: str, message: str) -> None:
    with pytest.raises(StepError) as caught:
        spell_runner.resolve_output_ref(ref, OUTPUTS)
    assert caught.value.message == message


def jsonpath(path: str, expected=UNDEFINED, source: str = "step.deploy.json") -> dict:
    params = {"from_output": source, "path": path}
    if expected is not UNDEFINED:
        params["expected"] = expected
    return {"type": "jsonpath_equals", "params": params}


@pytest.mark.parametrize(
    "check, success, message",
    [
        (jsonpath("data.id", "abc"), True, "jsonpath matched: data.id"),
        (jsonpath("data.n", 1.0), True, "jsonpath matched: data.n"),
        (
            jsonpath("data.obj", {"a": [1, {"b": None}]}),
            True,
            "jsonpath matched: data.obj",
        ),
        (
            jsonpath("a.1.b", None, "step.deploy.json.data.obj"),
            True,
            "jsonpath matched: a.1.b",
        ),
        (jsonpath("data.missing"), True, "jsonpath matched: data.missing"),
        (
            jsonpath("data.n", "1"),
            False,
            "jsonpath mismatch at data.n: expected 1, got 1",
        ),
        (
            jsonpath("data.flag", 1),
            False,
            "jsonpath mismatch at data.flag: expected 1, got true",
        ),
        (
            jsonpath("data.n", True),
            False,
            "jsonpath mismatch at data.n: expected true, got 1",
        ),
        (
            jsonpath("data.obj", {"a": [1]}),
            False,
            "jsonpath mismatch at data.obj: expected [object Object], got [object Object]",
        ),
        (
            jsonpath("data.arr", [1, None, [2, 4]]),
            False,
            "jsonpath mismatch at data.arr: expected 1,,2,4, got 1,,2,3",
        ),
        (
            jsonpath("$.data.id", "abc"),
            False,
            "jsonpath mismatch at $.data.id: expected abc, got undefined",
        ),
        (
            jsonpath("data.id", None),
            False,
            "jsonpath mismatch at data.id: expected null, got abc",
        ),
    ],
)
def test_jsonpath_equals(check: dict, success: bool, message: str) -> None:
    [result] = spell_runner.evaluate_checks([check], OUTPUTS, "/", http_timeout_s=1)
    assert result == {"type": "jsonpath_equals", "success": success, "message": message}


def test_file_exists(tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "index.html").write_text("x")
    checks = [
        {"type": "file_exists", "params": {"path": "artifacts/index.html"}},
        {"type": "file_exists", "params": {"path": str(tmp_path / "artifacts")}},
        {"type": "file_exists", "params": {"path": "./nope/../missing.txt"}},
    ]
    results = spell_runner.evaluate_checks(checks, {}, str(tmp_path), http_timeout_s=1)
    assert [r["message"] for r in results] == [
        f"file exists: {tmp_path}/artifacts/index.html",
        f"file exists: {tmp_path}/artifacts",
        f"file missing: {tmp_path}/missing.txt",
    ]
    assert [r["success"] for r in results] == [True, True, False]


@pytest.mark.parametrize(
    "check, message",
    [
        (
            {"type": "file_exists", "params": {}},
            "missing required string: file_exists.params.path",
        ),
        (
            {"type": "file_exists", "params": {"path": "  "}},
            "missing required string: file_exists.params.path",
        ),
        (
            {"type": "http_status", "params": {"url": "http://x"}},
            "missing required number: http_status.params.expect",
        ),
        (
            {"type": "http_status", "params": {"expect": "200", "url": "http://x"}},
            "missing required number: http_status.params.expect",
        ),
        (
            {"type": "http_status", "params": {"expect": True, "url": "http://x"}},
            "missing required number: http_status.params.expect",
        ),
        (
            {"type": "http_status", "params": {"expect": 200, "url": ""}},
            "invalid string for url",
        ),
        (
            {"type": "http_status", "params": {"expect": 200, "url_from_output": 3}},
            "invalid string for url_from_output",
        ),
        (
            {"type": "http_status", "params": {"expect": 200}},
            "http_status check needs params.url or params.url_from_output",
        ),
        (
            {
                "type": "http_status",
                "params": {"expect": 200, "url_from_output": "step.deploy.json.data.n"},
            },
            "http_status url_from_output must resolve to string: step.deploy.json.data.n",
        ),
        (
            {
                "type": "http_status",
                "params": {"expect": 200, "url_from_output": "step.x.json"},
            },
            "output reference not found: step.x.json",
        ),
        (
            {"type": "jsonpath_equals", "params": {"path": "a"}},
            "missing required string: jsonpath_equals.params.from_output",
        ),
        (
            {"type": "jsonpath_equals", "params": {"from_output": "step.deploy.json"}},
            "missing required string: jsonpath_equals.params.path",
        ),
        ({"type": "nope", "params": {}}, "unsupported check type: nope"),
    ],
)
def test_check_errors(check: dict, message: str) -> None:
    with pytest.raises(StepError) as caught:
        spell_runner.evaluate_checks([check], OUTPUTS, "/", http_timeout_s=1)
    assert caught.value.message == message


def test_thrown_check_keeps_earlier_checks_and_failed_check_prefix(
    bundle: Path,
) -> None:
    run = write_step(bundle, "a.sh", "#!/bin/sh\necho hi\n")
    checks = [
        {"type": "exit_code", "params": {}},
        {"type": "file_exists", "params": {"path": "missing"}},
        {
            "type": "jsonpath_equals",
            "params": {"from_output": "step.a.stdout.x", "path": "p"},
        },
        {"type": "exit_code", "params": {}},
    ]
    result = spell_runner.run_plan(make_plan(bundle, [shell("a", run)], checks))
    assert (
        result["error"]
        == "stdout reference does not support nested path: step.a.stdout.x"
    )
    assert [c["type"] for c in result["checks"]] == ["exit_code", "file_exists"]
    del checks[2]
    result = spell_runner.run_plan(make_plan(bundle, [shell("a", run)], checks))
    assert result["error"] == f"check failed: file missing: {bundle}/missing"
    assert len(result["checks"]) == 3


# JSON and JavaScript formatting #######################################################


@pytest.mark.parametrize(
    "value, text",
    [
        (1.0, "1"),
        (-0.0, "0"),
        (0.5, "0.5"),
        (123.456, "123.456"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (1.5e-7, "1.5e-7"),
        (1e-7, "1e-7"),
        (0.00001, "0.00001"),
        (0.000001, "0.000001"),
        (2.0**64, "18446744073709552000"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (5e-324, "5e-324"),
        (-1.25e-10, "-1.25e-10"),
        (12345678901234567890, "12345678901234567890"),
        (10**21, "1e+21"),
        (float("nan"), "null"),
        (float("inf"), "null"),
        (True, "true"),
        (None, "null"),
    ],
)
def test_dumps_js_numbers(value, text: str) -> None:
    assert dumps_js(value) == text


def test_dumps_js_structures() -> None:
    value = {
        "a": 1,
        "b": [1, 2.0],
        "c": {},
        "d": [],
        "e": 'é\n"\x01\u2028',
        "u": UNDEFINED,
        "l": [UNDEFINED],
        "t": (1,),
    }
    assert (
        dumps_js(value) == '{"a":1,"b":[1,2],"c":{},"d":[],"e":"é\\n\\"\\u0001\u2028",'
        '"l":[null],"t":[1]}'
    )
    assert dumps_js({"a": {"b": [1, {}], "c": []}, "d": "x"}, indent=2) == (
        '{\n  "a": {\n    "b": [\n      1,\n      {}\n    ],\n    "c": []\n  },\n'
        '  "d": "x"\n}'
    )
    assert dumps_js({}, indent=2) == "{}"
    assert dumps_js({"u": UNDEFINED}) == "{}"
    assert dumps_js("\ud800x") == '"\\ud800x"'
    assert dumps_js({1: "a", True: "b"}) == '{"1":"b"}'
    with pytest.raises(TypeError):
        dumps_js({"s": {1, 2}})


def test_dumps_js_matches_json_for_ordinary_values() -> None:
    value = {"k": [1, "two", None, True, {"x": [[]]}], "ü": "ö"}
    assert dumps_js(value) == json.dumps(
        value, ensure_ascii=False, separators=(",", ":")
    )
    assert dumps_js(value, indent=2) == json.dumps(value, ensure_ascii=False, indent=2)


def test_dumps_js_deep_nesting() -> None:
    value: object = 1
    for _ in range(5000):
        value = [value]
    assert dumps_js(value) == "[" * 5000 + "1" + "]" * 5000


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "null"),
        (UNDEFINED, "undefined"),
        (True, "true"),
        (1.0, "1"),
        (2.5, "2.5"),
        ("s", "s"),
        ({"a": 1}, "[object Object]"),
        ([1, None, UNDEFINED, "x", [2, [3]], {}], "1,,,x,2,3,[object Object]"),
        ([], ""),
    ],
)
def test_js_string(value, text: str) -> None:
    assert js_string(value) == text


def test_iso_now_format() -> None:
    import re

    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", spell_runner.iso_now()
    )


# Working copy #########################################################################


def test_workdir_copy(bundle: Path, tmp_path: Path) -> None:
    run = write_step(bundle, "w.sh", "#!/bin/sh\npwd\ntouch made-here\n")
    (bundle / "steps" / "sub").mkdir()
    (bundle / "steps" / "sub" / "data.txt").write_text("d")
    (bundle / "steps" / "sub" / "data.txt").chmod(0o640)
    (bundle / "schema.json").write_text("{}")
    work = tmp_path / "work"
    checks = [{"type": "file_exists", "params": {"path": "made-here"}}]
    result = spell_runner.run_plan(
        make_plan(bundle, [shell("w", run)], checks, workdir_copy_to=str(work))
    )
    assert result["success"] is True, result
    assert result["outputs"]["step.w.stdout"] == f"{work}\n"
    assert (work / "spell.yaml").read_text() == "id: test/runner\n"
    assert (work / "schema.json").exists()
    assert stat.S_IMODE((work / "steps" / "w.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((work / "steps" / "sub" / "data.txt").stat().st_mode) == 0o640
    assert not (bundle / "made-here").exists()


def test_workdir_copy_refuses_symlinks_and_special_files(
    bundle: Path, tmp_path: Path
) -> None:
    link = bundle / "steps" / "link.sh"
    link.symlink_to("/bin/true")
    result = spell_runner.run_plan(
        make_plan(bundle, [], workdir_copy_to=str(tmp_path / "w1"))
    )
    assert result["error"] == f"symlink is not allowed in steps/: {link}"
    link.unlink()
    fifo = bundle / "steps" / "pipe"
    os.mkfifo(fifo)
    result = spell_runner.run_plan(
        make_plan(bundle, [], workdir_copy_to=str(tmp_path / "w2"))
    )
    assert result["error"] == f"unsupported file type in steps/: {fifo}"


# Command line #########################################################################


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, str(ROOT / "spell_runner.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_cli_success_and_failure(bundle: Path) -> None:
    run = write_step(bundle, "a.sh", '#!/bin/sh\necho "$FROM_HOST/$BOTH"\n')
    plan = make_plan(bundle, [shell("a", run)], [{"type": "exit_code", "params": {}}])
    plan["env"] = {"BOTH": "plan"}
    plan_path = bundle.parent / "plan.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ, FROM_HOST="host", BOTH="host")
    done = run_cli("--plan", str(plan_path), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    result = json.loads(done.stdout)
    assert result["success"] is True
    assert result["outputs"] == {"step.a.stdout": "host/plan\n"}
    assert done.stderr == ""

    events = run_cli(f"--plan={plan_path}", "--events", env=env)
    assert events.returncode == 0
    kinds = [json.loads(line)["event"] for line in events.stderr.splitlines()]
    assert kinds == ["step_start", "output", "step_end"]

    write_step(bundle, "a.sh", "#!/bin/sh\nexit 4\n")
    failed = run_cli("--plan", str(plan_path))
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"] == "step failed: a (exit code 4)"


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--plan",),
        ("/spell/spell.yaml", "/tmp/spell-input/input.json"),
        ("--bogus",),
    ],
)
def test_cli_usage_errors(args) -> None:
    done = run_cli(*args)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "usage: spell-runner --plan <plan.json>\n"


def test_cli_bad_plan(tmp_path: Path) -> None:
    missing = run_cli("--plan", str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("spell-runner: cannot read plan:")
    assert missing.stderr.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    done = run_cli("--plan", str(bad))
    assert done.returncode == 1
    assert done.stderr == "spell-runner: plan must be a JSON object\n"
    done = run_cli("--plan", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("spell-runner: plan is not a regular file")


def test_cli_main_in_process_usage(capsys) -> None:
    assert spell_runner.main(["--events"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "usage: spell-runner --plan <plan.json>\n"


def test_evaluate_checks_hands_back_earlier_results() -> None:
    checks = [{"type": "exit_code"}, {"type": "jsonpath_equals", "params": {}}]
    with pytest.raises(StepError) as caught:
        spell_runner.evaluate_checks(checks, OUTPUTS, "/", http_timeout_s=1)
    assert [r["type"] for r in caught.value.results] == ["exit_code"]


def test_workdir_copy_needs_spell_yaml(bundle: Path, tmp_path: Path) -> None:
    (bundle / "spell.yaml").unlink()
    plan = make_plan(bundle, [], workdir_copy_to=str(tmp_path / "w"))
    result = spell_runner.run_plan(plan)
    expected = f"failed to copy bundle: No such file or directory: {bundle}/spell.yaml"
    assert result["error"] == expected


def test_huge_timeouts_do_not_overflow(bundle: Path, server) -> None:
    run = write_step(bundle, "a.sh", "#!/bin/sh\necho ok\n")
    step = http_step(bundle, "h", {"method": "GET", "url": server.base + "/json"})
    huge = 10**15
    plan = make_plan(
        bundle,
        [shell("a", run), step],
        step_timeout_ms=huge,
        http_timeout_ms=huge,
        execution_timeout_ms=huge,
    )
    assert spell_runner.run_plan(plan)["success"] is True
