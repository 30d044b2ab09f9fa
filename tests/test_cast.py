"""``spell cast`` on the host, driven through the built ``spell.pyz`` as a user would.

Covers the success output, dry run, verbose progress, input assembly and its
size limit, schema errors, an http step against a real local server, failures,
timeouts that really stop a process tree, and concurrent casts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from cast_helpers import (
    SUMMARY_HELLO,
    SPELLS,
    Recorder,
    clean_env,
    latest_log,
    log_files,
    make_bundle,
    pid_alive,
    stdout_fields,
    wait_for,
)

EXECUTION_ID_RE = re.compile(
    r"^\d{8}T\d{6}\d{3}Z_fixtures_hello-host_1\.0\.0_[0-9a-f]{4}\.json$"
)


@pytest.fixture
def cast(run_pyz, store):
    """``cast(*args, env=None, **extra_env)``: run ``spell cast`` with a clean environment."""

    def run(*args, env=None, timeout=60, **extra_env):
        return run_pyz(
            "cast", *args, env=env or clean_env(**extra_env), timeout=timeout
        )

    return run


@pytest.fixture
def install(run_pyz, store):
    def run(source) -> None:
        proc = run_pyz("install", source, env=clean_env())
        assert proc.returncode == 0, proc.stderr

    return run


# Success, dry run, verbose ##################################################


def test_success_prints_summary_then_id_and_log(cast, install, store):
    install(SPELLS / "hello-host")
    proc = cast("fixtures/hello-host", "--allow-unsigned", "-p", "name=world")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    fields = stdout_fields(proc.stdout)
    assert EXECUTION_ID_RE.match(fields["execution_id"])
    log_path = store / "logs" / fields["execution_id"]
    assert fields["log"] == str(log_path)
    assert proc.stdout == (
        SUMMARY_HELLO + f"execution_id: {fields['execution_id']}\n" f"log: {log_path}\n"
    )

    log = json.loads(log_path.read_text(encoding="utf-8"))
    assert list(log) == [
        "execution_id",
        "started_at",
        "finished_at",
        "id",
        "version",
        "input",
        "summary",
        "steps",
        "outputs",
        "checks",
        "success",
        "signature",
    ]
    assert log["execution_id"] == fields["execution_id"]
    assert (log["id"], log["version"], log["input"]) == (
        "fixtures/hello-host",
        "1.0.0",
        {"name": "world"},
    )
    assert log["success"] is True and "error" not in log
    assert log["summary"]["license"] == {"licensed": False}
    [step] = log["steps"]
    assert {
        k: step[k]
        for k in (
            "stepName",
            "uses",
            "success",
            "exitCode",
            "stdout_head",
            "stderr_head",
            "message",
        )
    } == {
        "stepName": "hello",
        "uses": "shell",
        "success": True,
        "exitCode": 0,
        "stdout_head": "hello world\n",
        "stderr_head": "",
        "message": "ok",
    }
    assert log["outputs"] == {"step.hello.stdout": "hello world\n"}
    assert log["checks"] == [
        {"type": "exit_code", "success": True, "message": "all steps succeeded"}
    ]
    assert log["signature"]["required"] is False


def test_dry_run_stops_after_the_summary(cast, install, store):
    install(SPELLS / "multi-check")
    proc = cast("fixtures/multi-check", "--allow-unsigned", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "=== Execution Summary ==="
    assert [line.split(":")[0] for line in lines[-2:]] == ["execution_id", "log"]
    bundles = list((store / "spells").glob("*/1.0.0"))
    assert bundles and not (bundles[0] / "artifacts").exists(), "the step ran"
    log = latest_log(store)
    assert log["success"] is True
    assert (log["steps"], log["outputs"], log["checks"]) == ([], {}, [])


def test_verbose_shows_progress_on_stderr_only(cast, install):
    install(SPELLS / "hello-host")
    proc = cast("fixtures/hello-host", "--allow-unsigned", "--verbose", "-p", "name=vv")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(SUMMARY_HELLO)
    assert len(proc.stdout.splitlines()) == len(SUMMARY_HELLO.splitlines()) + 2
    assert "step hello (shell) started" in proc.stderr
    assert "[hello:stdout] hello vv" in proc.stderr
    assert re.search(r"step hello ok in \d+ms", proc.stderr)


# Input ######################################################################


def test_input_file_merged_with_params(cast, install, store, tmp_path):
    install(SPELLS / "hello-host")
    data = tmp_path / "in.json"
    data.write_text('{"name": "a", "extra": {"x": 1}}')
    proc = cast(
        "fixtures/hello-host",
        "--allow-unsigned",
        "--input",
        data,
        "-p",
        "extra.y=2",
        "-p",
        "name=b",
    )
    assert proc.returncode == 0, proc.stderr
    assert latest_log(store)["input"] == {"name": "b", "extra": {"x": 1, "y": 2}}


def test_every_param_example_of_the_spec(cast, install, store):
    install(SPELLS / "hello-host")
    pairs = [
        "x= 5 ",
        "y= abc ",
        "z=true",
        "n=null",
        "arr=[1,2]",
        'o={"k":1}',
        's="quoted"',
        "k=007",
        "e=1e3",
        "f=1.0",
        "eq=a=b",
        "sp=a b",
        "blank=  ",
        "a=1",
        "a.b=2",
        "c=[1]",
        "c.d=3",
        "m..n=4",
        "name=w",
    ]
    args = [arg for pair in pairs for arg in ("-p", pair)]
    proc = cast("fixtures/hello-host", "--allow-unsigned", *args)
    assert proc.returncode == 0, proc.stderr
    log_text = log_files(store)[-1].read_text(encoding="utf-8")
    assert json.loads(log_text)["input"] == {
        "x": 5,
        "y": " abc ",
        "z": True,
        "n": None,
        "arr": [1, 2],
        "o": {"k": 1},
        "s": "quoted",
        "k": "007",
        "e": 1000,
        "f": 1,
        "eq": "a=b",
        "sp": "a b",
        "blank": "",
        "a": {"b": 2},
        "c": {"d": 3},
        "m": {"n": 4},
        "name": "w",
    }
    # JavaScript number formatting: 1.0 and 1e3 are written as integers.
    assert '"f": 1,' in log_text and '"e": 1000,' in log_text


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "noequals"], "invalid -p argument: noequals"),
        (["-p", "=x"], "invalid -p argument: =x"),
        (["-p", " =x"], "invalid -p argument:  =x"),
        (["-p", ".=1"], "invalid -p key: empty key"),
    ],
)
def test_bad_params(cast, install, store, args, message):
    install(SPELLS / "hello-host")
    proc = cast("fixtures/hello-host", "--allow-unsigned", *args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", message + "\n")
    assert latest_log(store)["error"] == message


def test_bad_input_files(cast, install, tmp_path, pyz):
    install(SPELLS / "hello-host")
    missing = tmp_path / "missing.json"
    proc = cast("fixtures/hello-host", "--allow-unsigned", "--input", missing)
    assert proc.stderr == f"ENOENT: no such file or directory, open '{missing}'\n"
    for text in ("[1]", "null", "3", '"s"'):
        path = tmp_path / "in.json"
        path.write_text(text)
        proc = cast("fixtures/hello-host", "--allow-unsigned", "--input", path)
        assert (proc.returncode, proc.stderr) == (1, "--input must be a JSON object\n")
    path.write_text("{bad")
    proc = cast("fixtures/hello-host", "--allow-unsigned", "--input", path)
    assert proc.returncode == 1 and proc.stderr.strip() and proc.stdout == ""
    # A relative --input path is read from the current folder.
    (tmp_path / "rel.json").write_text('{"name": "rel"}')
    proc = subprocess.run(
        [
            sys.executable,
            str(pyz.spell),
            "cast",
            "fixtures/hello-host",
            "--allow-unsigned",
            "--input",
            "rel.json",
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_input_size_limit(cast, install, store):
    install(SPELLS / "hello-host")
    proc = cast(
        "fixtures/hello-host",
        "--allow-unsigned",
        "-p",
        "name=world",
        SPELL_RUNTIME_INPUT_MAX_BYTES="8",
    )
    assert (proc.returncode, proc.stdout) == (1, "")
    assert (
        proc.stderr
        == "merged input is 16 bytes, exceeds SPELL_RUNTIME_INPUT_MAX_BYTES=8\n"
    )
    assert latest_log(store)["input"] == {}
    # {"name":"worldworld"} is 21 bytes: allowed at 21, refused at 20.
    ok = cast(
        "fixtures/hello-host",
        "--allow-unsigned",
        "-p",
        "name=worldworld",
        SPELL_RUNTIME_INPUT_MAX_BYTES="21",
    )
    assert ok.returncode == 0, ok.stderr
    bad = cast(
        "fixtures/hello-host",
        "--allow-unsigned",
        "-p",
        "name=worldworld",
        SPELL_RUNTIME_INPUT_MAX_BYTES="20",
    )
    assert "merged input is 21 bytes" in bad.stderr
    # Multi-byte characters count in UTF-8 bytes: "é" is two.
    bad = cast(
        "fixtures/hello-host",
        "--allow-unsigned",
        "-p",
        "name=é",
        SPELL_RUNTIME_INPUT_MAX_BYTES="12",
    )
    assert (
        bad.stderr
        == "merged input is 13 bytes, exceeds SPELL_RUNTIME_INPUT_MAX_BYTES=12\n"
    )


# Schema #####################################################################

DRAFT7 = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 2},
        "tags": {
            "type": "array",
            "items": [{"type": "string"}],
            "additionalItems": False,
        },
        "n": {"type": "integer", "exclusiveMinimum": 0},
    },
}


def test_schema_errors_2020_12_by_default(cast, install, store):
    install(SPELLS / "hello-host")
    proc = cast("fixtures/hello-host", "--allow-unsigned", "-p", "name=5")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "input does not match schema: /name must be string\n"
    proc = cast("fixtures/hello-host", "--allow-unsigned")
    assert (
        proc.stderr
        == "input does not match schema: / must have required property 'name'\n"
    )
    log = latest_log(store)
    assert log["signature"] == {"required": False, "status": "skipped"}


def test_schema_declared_draft_07_is_validated_as_draft_07(
    cast, install, tmp_path, store
):
    bundle = make_bundle(
        tmp_path / "d7",
        "fixtures/draft7",
        {"hello": ("shell", "#!/bin/sh\necho hi\n")},
        schema=DRAFT7,
    )
    install(bundle)
    # draft-07 tuple items and numeric exclusiveMinimum would not even compile as 2020-12.
    ok = cast(
        "fixtures/draft7",
        "--allow-unsigned",
        "-p",
        "name=ab",
        "-p",
        'tags=["x"]',
        "-p",
        "n=1",
    )
    assert ok.returncode == 0, ok.stderr
    proc = cast(
        "fixtures/draft7",
        "--allow-unsigned",
        "-p",
        "name=a",
        "-p",
        "tags=[1,2]",
        "-p",
        "n=0",
    )
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert message.startswith("input does not match schema: ")
    for fragment in (
        "/name must NOT have fewer than 2 characters",
        "/tags/0 must be string",
        "/n must be > 0",
        "/tags must NOT have more than 1 items",
    ):
        assert fragment in message
    assert latest_log(store)["input"] == {"name": "a", "tags": [1, 2], "n": 0}


# HTTP step ##################################################################


def test_http_step_against_a_real_server(cast, install, store):
    install(SPELLS / "http")
    with Recorder() as server:
        server.routes["/v1/deploy/demo"] = (
            201,
            {"data": {"id": "abc123"}, "health_url": server.base + "/health"},
        )
        server.routes["/health"] = (200, {"ok": True})
        proc = cast(
            "fixtures/http",
            "--allow-unsigned",
            "-p",
            f"base_url={server.base}",
            "-p",
            "project=demo",
            TEST_HEADER="header-value",
        )
        assert proc.returncode == 0, proc.stderr
        post, health = server.requests
    assert (post["method"], post["path"]) == ("POST", "/v1/deploy/demo")
    assert post["headers"]["x-test-header"] == "header-value"
    assert post["headers"]["content-type"] == "application/json"
    assert json.loads(post["body"]) == {"project": "demo"}
    assert (health["method"], health["path"]) == ("GET", "/health")
    log = latest_log(store)
    assert log["outputs"]["step.request.json"]["data"] == {"id": "abc123"}
    assert (
        log["steps"][0]["message"] == f"http POST {server.base}/v1/deploy/demo -> 201"
    )
    assert log["checks"] == [
        {"type": "http_status", "success": True, "message": "http status matched: 200"},
        {
            "type": "jsonpath_equals",
            "success": True,
            "message": "jsonpath matched: data.id",
        },
    ]


def test_http_checks_that_fail(cast, install, store):
    install(SPELLS / "http")
    with Recorder() as server:
        server.routes["/v1/deploy/demo"] = (
            200,
            {"data": {"id": "zzz"}, "health_url": server.base + "/health"},
        )
        server.routes["/health"] = (503, {})
        proc = cast(
            "fixtures/http",
            "--allow-unsigned",
            "-p",
            f"base_url={server.base}",
            "-p",
            "project=demo",
            TEST_HEADER="h",
        )
    assert proc.returncode == 1
    assert proc.stderr == "check failed: http status mismatch: got 503, expected 200\n"
    assert "execution_id:" not in proc.stdout
    log = latest_log(store)
    assert [c["success"] for c in log["checks"]] == [False, False]
    assert (
        log["checks"][1]["message"]
        == "jsonpath mismatch at data.id: expected abc123, got zzz"
    )
    assert log["outputs"]["step.request.json"]["data"] == {"id": "zzz"}


def test_http_step_unresolved_env_template(cast, install, store):
    install(SPELLS / "http")
    proc = cast(
        "fixtures/http",
        "--allow-unsigned",
        "-p",
        "base_url=http://127.0.0.1:9",
        "-p",
        "project=demo",
    )
    assert proc.stderr == "unresolved template: {{ENV.TEST_HEADER}}\n"


# Failures ###################################################################


def test_failure_keeps_the_failing_step_and_prints_no_id(cast, install, store):
    install(SPELLS / "fail")
    proc = cast("fixtures/fail", "--allow-unsigned")
    assert proc.returncode == 1
    assert proc.stderr == "step failed: b (exit code 3)\n"
    # The summary was printed before execution started; nothing else is.
    assert proc.stdout.startswith("=== Execution Summary ===\n")
    assert "execution_id:" not in proc.stdout and "log:" not in proc.stdout
    [path] = log_files(store)
    log = json.loads(path.read_text(encoding="utf-8"))
    assert log["success"] is False and log["error"] == "step failed: b (exit code 3)"
    assert [s["stepName"] for s in log["steps"]] == ["a", "b"]
    failed = log["steps"][1]
    assert (
        failed["success"],
        failed["exitCode"],
        failed["stderr_head"],
        failed["message"],
    ) == (False, 3, "b failed on purpose\n", "non-zero exit code: 3")
    assert log["outputs"]["step.a.stdout"] == "a ok\n"
    assert log["checks"] == []
    assert path.name == log["execution_id"]


def test_guard_failure_prints_nothing_on_stdout(cast, install, store):
    proc = cast("nope/missing")
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1,
        "",
        "spell not installed: nope/missing\n",
    )
    log = latest_log(store)
    assert (log["id"], log["version"], log["input"]) == ("nope/missing", "latest", {})
    assert "signature" not in log
    assert re.match(
        r"^\d{8}T\d{9}Z_nope_missing_latest_[0-9a-f]{4}\.json$", log["execution_id"]
    )


# Timeouts and process hygiene ###############################################

ESCAPING_STEP = """#!/bin/sh
# Two grandchildren that ignore SIGTERM: one in the step's group, one in its own session.
sh -c 'trap "" TERM; exec sleep 30' &
echo $! > "$PIDS_DIR/grandchild"
setsid sh -c 'trap "" TERM; exec sleep 30' &
echo $! > "$PIDS_DIR/session"
echo $$ > "$PIDS_DIR/step"
wait
"""


def test_step_timeout_kills_the_whole_tree(cast, install, tmp_path):
    install(
        make_bundle(
            tmp_path / "b", "fixtures/escape", {"spawn": ("shell", ESCAPING_STEP)}
        )
    )
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    began = time.monotonic()
    proc = cast(
        "fixtures/escape",
        "--allow-unsigned",
        SPELL_RUNTIME_STEP_TIMEOUT_MS="400",
        PIDS_DIR=str(pids_dir),
        timeout=30,
    )
    elapsed = time.monotonic() - began
    assert proc.stderr == "shell step 'spawn' timed out after 400ms\n"
    assert elapsed < 10, "the cast waited for the grandchildren"
    pids = {p.name: int(p.read_text()) for p in pids_dir.iterdir()}
    assert set(pids) == {"grandchild", "session", "step"}
    for name, pid in pids.items():
        wait_for(lambda pid=pid: not pid_alive(pid), timeout=3)


def test_execution_timeout_names_the_running_step(cast, install, store):
    install(SPELLS / "slow")
    proc = cast(
        "fixtures/slow",
        "--allow-unsigned",
        "-p",
        "ms=5000",
        SPELL_RUNTIME_STEP_TIMEOUT_MS="10000",
        SPELL_RUNTIME_EXECUTION_TIMEOUT_MS="300",
    )
    assert (
        proc.stderr
        == "cast execution timed out after 300ms while running step 'slow'\n"
    )
    log = latest_log(store)
    assert log["steps"][0]["stepName"] == "slow" and log["steps"][0]["success"] is False


def test_a_step_reading_stdin_gets_eof(cast, install, tmp_path, store):
    install(
        make_bundle(
            tmp_path / "b",
            "fixtures/stdin",
            {"read": ("shell", "#!/bin/sh\ncat\necho after-eof\n")},
        )
    )
    began = time.monotonic()
    proc = cast(
        "fixtures/stdin", "--allow-unsigned", SPELL_RUNTIME_STEP_TIMEOUT_MS="20000"
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - began < 10
    assert latest_log(store)["outputs"]["step.read.stdout"] == "after-eof\n"


# Concurrency ################################################################


def test_two_casts_started_together_get_two_logs(run_pyz, install, store, pyz):
    install(SPELLS / "hello-host")
    env = clean_env()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(pyz.spell),
                "cast",
                "fixtures/hello-host",
                "--allow-unsigned",
                "-p",
                f"name=n{i}",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ids = [stdout_fields(out)["execution_id"] for out, _ in outs]
    assert ids[0] != ids[1]
    files = log_files(store)
    assert sorted(f.name for f in files) == sorted(ids)
    names = sorted(json.loads(f.read_text())["input"]["name"] for f in files)
    assert names == ["n0", "n1"]


def test_execution_ids_are_unique_within_one_millisecond():
    import spell

    now = 1_800_000_000.123
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "123Z"
    ids = {spell.execution_id_for("pub/x", "1.0.0", now) for _ in range(200)}
    assert (
        len(ids) > 150
    )  # 4 random hex digits; the log file is also created exclusively
    assert all(
        i.startswith(f"{stamp}_pub_x_1.0.0_") and i.endswith(".json") for i in ids
    )


# The schema fast path ########################################################


def _random_schema(rng, depth: int = 0) -> dict:
    """A random schema of the keywords spell checks without jsonschema."""
    scalars = [0, 1, 1.0, 2.5, -3, True, False, None, "", "a", "ab", "abc"]
    schema: dict = {}
    kinds = ["string", "integer", "number", "boolean", "null", "object", "array"]
    keys = [
        "type",
        "required",
        "properties",
        "additionalProperties",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "pattern",
        "items",
        "title",
        "default",
    ]
    for key in rng.sample(keys, rng.randint(1, 6)):
        if key == "type":
            schema[key] = (
                rng.choice(kinds) if rng.random() < 0.6 else rng.sample(kinds, 2)
            )
        elif key == "required":
            schema[key] = rng.sample(["a", "b", "c"], rng.randint(0, 3))
        elif key in ("properties", "items", "additionalProperties") and depth > 2:
            continue
        elif key == "properties":
            schema[key] = {
                name: _random_schema(rng, depth + 1)
                for name in rng.sample(["a", "b", "c"], rng.randint(1, 3))
            }
        elif key == "items":
            schema[key] = _random_schema(rng, depth + 1)
        elif key == "additionalProperties":
            schema[key] = rng.choice([True, False])
        elif key == "enum":
            schema[key] = rng.sample(scalars, rng.randint(0, 3)) + (
                [[1, True]] if rng.random() < 0.3 else []
            )
        elif key == "const":
            schema[key] = rng.choice(scalars + [[1], {"a": 1}, [True]])
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            schema[key] = rng.choice([0, 1, 1.5, -2, 10])
        elif key.startswith(("min", "max")):
            schema[key] = rng.choice([0, 1, 2, 3, 2.0])
        elif key == "pattern":
            schema[key] = rng.choice(["^a", "b$", "[0-9]", "^$"])
        else:
            schema[key] = "annotation"
    return schema


def _random_value(rng, depth: int = 0):
    pick = rng.random()
    if depth < 3 and pick < 0.3:
        return {
            name: _random_value(rng, depth + 1)
            for name in rng.sample(["a", "b", "c", "d"], rng.randint(0, 4))
        }
    if depth < 3 and pick < 0.45:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice(
        [
            0,
            1,
            1.0,
            2.5,
            -3,
            7,
            True,
            False,
            None,
            "",
            "a",
            "ab",
            "b1",
            "abc",
            [1, True],
            {"a": 1},
            [1],
            [True],
        ]
    )


def test_schema_fast_path_matches_jsonschema():
    import random

    import spell

    rng = random.Random(20261203)
    failing = 0
    for _ in range(500):
        schema = _random_schema(rng)
        if rng.random() < 0.3:
            schema["$schema"] = rng.choice(
                [
                    "http://json-schema.org/draft-07/schema#",
                    "https://json-schema.org/draft/2020-12/schema",
                ]
            )
        assert spell._fast_schema(schema, True), schema
        validator = spell._schema_validator(schema)
        for _ in range(6):
            value = _random_value(rng)
            expected = [
                f"{spell._pointer(e.absolute_path)} {m}"
                for e in validator.iter_errors(value)
                for m in spell._ajv_messages(e)
            ]
            assert spell._fast_errors(schema, value) == expected, (schema, value)
            failing += bool(expected)
    assert failing > 1000  # the comparison is about errors, not only about valid input


@pytest.mark.parametrize(
    "schema",
    [
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/x"}},
            "$defs": {"x": {}},
        },
        {"type": "strin"},
        {"required": ["a", "a"]},
        {"minLength": -1},
        {"minLength": True},
        {"pattern": "("},
        {"items": [{"type": "string"}]},
        {"properties": {"a": False}},
        {"$schema": "http://json-schema.org/draft-04/schema#"},
        {"anyOf": [{}]},
        {"properties": {"a": {"uniqueItems": True}}},
    ],
)
def test_schemas_outside_the_fast_path_go_to_jsonschema(schema):
    import spell

    assert not spell._fast_schema(schema, True)


def test_sigterm_stops_the_cast_and_its_steps(install, store, pyz, tmp_path):
    install(
        make_bundle(
            tmp_path / "b", "fixtures/term", {"spawn": ("shell", ESCAPING_STEP)}
        )
    )
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(pyz.spell), "cast", "fixtures/term", "--allow-unsigned"],
        env=clean_env(PIDS_DIR=str(pids_dir)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(list(pids_dir.iterdir())) == 3, timeout=20)
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert err == "cast interrupted\n"
    assert "execution_id:" not in out
    for path in pids_dir.iterdir():
        pid = int(path.read_text())
        wait_for(lambda pid=pid: not pid_alive(pid), timeout=3)
    assert latest_log(store)["error"] == "cast interrupted"


def test_an_internal_error_still_leaves_a_log(run_cli, store, monkeypatch):
    import spell

    assert run_cli("install", SPELLS / "hello-host")[0] == 0

    def broken(plan, on_event=None):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(spell.spell_runner, "run_plan", broken)
    code, out, err = run_cli(
        "cast", "fixtures/hello-host", "--allow-unsigned", "-p", "name=x"
    )
    assert code == 1
    assert err == "internal error: RuntimeError: engine exploded\n"
    log = latest_log(store)
    assert log["success"] is False
    assert log["error"] == "internal error: RuntimeError: engine exploded"


def test_sigterm_after_the_steps_is_delivered_once_the_log_is_written():
    import signal

    import spell

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        guard = spell._SigtermGuard()
        with pytest.raises(KeyboardInterrupt):  # during the steps: stop them
            signal.raise_signal(signal.SIGTERM)
        guard.defer()  # the steps are done: only note it while the log is written
        signal.raise_signal(signal.SIGTERM)
        assert seen == []
        guard.release()  # the log is written: now it is delivered
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
