"""Manifest loading: YAML semantics, validation order and messages, hostile input.

The messages are a contract: each is pinned here exactly as the original words it.
"""

from __future__ import annotations

import math
import os
import time

import pytest

import spell

DELETE = object()


class Raw(str):
    """A YAML fragment written verbatim in place of a value."""


def _set(data, path, value):
    *parents, last = path
    for key in parents:
        data = data[key]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


def _yaml_with(make_bundle, changes):
    """The base manifest as YAML with ``changes`` ((path, value), ...) applied."""
    import yaml

    data = make_bundle.manifest()
    raws = {}
    for path, value in changes:
        if isinstance(value, Raw):
            marker = f"RAW_VALUE_{len(raws)}"
            raws[marker] = str(value)
            value = marker
        _set(data, path, value)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    for marker, raw in raws.items():
        text = text.replace(marker, raw)
    return text


def load_error(make_bundle, *changes, files=None) -> str:
    root = make_bundle(yaml_text=_yaml_with(make_bundle, changes), files=files)
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    return info.value.message


def test_base_bundle_loads(make_bundle):
    root = make_bundle()
    manifest = spell.load_manifest(str(root))
    assert manifest["id"] == "test/demo"
    assert manifest["steps"] == [{"uses": "shell", "name": "run", "run": "steps/run.sh"}]
    assert manifest["checks"] == [{"type": "exit_code", "params": {}}]


def test_hello_host_fixture_loads(fixtures_dir):
    manifest = spell.load_manifest(str(fixtures_dir / "hello-host"))
    assert manifest["id"] == "fixtures/hello-host"
    assert len(manifest["steps"]) == 1


# Section 4.4: every message, in the order the rules run ######################

REQUIRED = ("id", "version", "name", "summary", "inputs_schema")

VALIDATION_CASES = [
    # 1. the five required strings, in order
    *[
        case
        for key in REQUIRED
        for case in (
            ([((key,), DELETE)], f"missing or invalid string field: {key}"),
            ([((key,), 12)], f"missing or invalid string field: {key}"),
            ([((key,), None)], f"missing or invalid string field: {key}"),
            ([((key,), " \t ")], f"field must not be empty: {key}"),
        )
    ],
    ([(("version",), Raw("1.0"))], "missing or invalid string field: version"),
    ([(("version",), Raw("2024-01-01"))], "missing or invalid string field: version"),
    ([(("id",), Raw("[a]"))], "missing or invalid string field: id"),
    # 2. id
    ([(("id",), "x" * 201)], "id must be <= 200 characters"),
    ([(("id",), "\U0001f600" * 101)], "id must be <= 200 characters"),
    ([(("id",), "a\u0007b")], "id must not contain control characters"),
    ([(("id",), "a\u007fb")], "id must not contain control characters"),
    # 3. version
    ([(("version",), "1" * 51)], "version must be <= 50 characters"),
    ([(("version",), "1.0\n")], "version must not contain control characters"),
    # 4. risk
    ([(("risk",), DELETE)], "missing or invalid string field: risk"),
    ([(("risk",), "")], "field must not be empty: risk"),
    ([(("risk",), "extreme")], "invalid risk: extreme"),
    ([(("risk",), "Low")], "invalid risk: Low"),
    # 5. permissions
    ([(("permissions",), DELETE)], "missing or invalid array field: permissions"),
    ([(("permissions",), {"a": 1})], "missing or invalid array field: permissions"),
    ([(("permissions",), ["x"])], "permissions[0] must be an object"),
    ([(("permissions",), [{"scopes": ["a"]}])], "missing or invalid string field: connector"),
    (
        [(("permissions",), [{"connector": " ", "scopes": ["a"]}])],
        "field must not be empty: connector",
    ),
    ([(("permissions",), [{"connector": "gh"}])], "missing or invalid array field: scopes"),
    (
        [(("permissions",), [{"connector": "gh", "scopes": ["a", " "]}])],
        "permissions[0].scopes[1] must be a non-empty string",
    ),
    (
        [(("permissions",), [{"connector": "gh", "scopes": ["a"]}, {"connector": "x",
                                                                   "scopes": [3]}])],
        "permissions[1].scopes[0] must be a non-empty string",
    ),
    (
        [(("permissions",), [{"connector": "gh", "scopes": []}])],
        "permissions[0].scopes must not be empty",
    ),
    # 6. effects
    ([(("effects",), DELETE)], "missing or invalid array field: effects"),
    ([(("effects",), [[1]])], "effects[0] must be an object"),
    ([(("effects", 0, "type"), DELETE)], "missing or invalid string field: type"),
    ([(("effects", 0, "target"), "")], "field must not be empty: target"),
    ([(("effects", 0, "mutates"), DELETE)], "missing or invalid boolean field: mutates"),
    ([(("effects", 0, "mutates"), Raw("yes"))], "missing or invalid boolean field: mutates"),
    ([(("effects", 0, "mutates"), Raw("on"))], "missing or invalid boolean field: mutates"),
    # 7. billing
    ([(("billing",), DELETE)], "missing or invalid object field: billing"),
    ([(("billing",), [1])], "missing or invalid object field: billing"),
    ([(("billing", "enabled"), "false")], "missing or invalid boolean field: enabled"),
    ([(("billing", "mode"), DELETE)], "missing or invalid string field: mode"),
    ([(("billing", "currency"), "")], "field must not be empty: currency"),
    ([(("billing", "max_amount"), DELETE)], "missing or invalid number field: max_amount"),
    ([(("billing", "max_amount"), "5")], "missing or invalid number field: max_amount"),
    ([(("billing", "max_amount"), Raw(".nan"))], "missing or invalid number field: max_amount"),
    ([(("billing", "max_amount"), Raw("true"))], "missing or invalid number field: max_amount"),
    ([(("billing", "mode"), "weekly")], "invalid billing.mode: weekly"),
    # the number check runs before the mode check
    (
        [(("billing", "mode"), "weekly"), (("billing", "max_amount"), "x")],
        "missing or invalid number field: max_amount",
    ),
    # 8. runtime
    ([(("runtime",), DELETE)], "missing or invalid object field: runtime"),
    ([(("runtime", "execution"), DELETE)], "missing or invalid string field: execution"),
    ([(("runtime", "execution"), "vm")], "invalid runtime.execution: vm"),
    ([(("runtime", "platforms"), DELETE)], "missing or invalid array field: platforms"),
    ([(("runtime", "platforms"), "linux/amd64")], "missing or invalid array field: platforms"),
    (
        [(("runtime", "platforms"), ["linux/amd64", ""])],
        "runtime.platforms[1] must be a non-empty string",
    ),
    (
        [(("runtime", "execution"), "docker")],
        "runtime.docker_image is required when runtime.execution=docker",
    ),
    (
        [(("runtime", "execution"), "docker"), (("runtime", "docker_image"), "  ")],
        "runtime.docker_image is required when runtime.execution=docker",
    ),
    # 9. steps
    ([(("steps",), DELETE)], "missing or invalid array field: steps"),
    ([(("steps",), [])], "steps must not be empty"),
    ([(("steps",), ["run"])], "steps[0] must be an object"),
    ([(("steps", 0, "uses"), DELETE)], "missing or invalid string field: uses"),
    ([(("steps", 0, "uses"), "python")], "invalid steps[0].uses: python"),
    ([(("steps", 0, "name"), DELETE)], "missing or invalid string field: name"),
    (
        [(("steps",), [{"uses": "shell", "name": "a", "run": "steps/run.sh"},
                       {"uses": "http", "name": "a", "run": "steps/run.sh"}])],
        "duplicate step name: a",
    ),
    ([(("steps", 0, "run"), DELETE)], "missing or invalid string field: run"),
    ([(("steps", 0, "run"), "")], "field must not be empty: run"),
    # 10. checks
    ([(("checks",), DELETE)], "missing or invalid array field: checks"),
    ([(("checks",), [])], "checks must not be empty"),
    ([(("checks",), [None])], "checks[0] must be an object"),
    ([(("checks", 0, "type"), DELETE)], "missing or invalid string field: type"),
    ([(("checks", 0, "type"), "exit")], "invalid checks[0].type: exit"),
    # 11. inputs_schema path
    ([(("inputs_schema",), "../schema.json")], "inputs_schema escapes bundle root"),
    ([(("inputs_schema",), "/etc/schema.json")], "inputs_schema escapes bundle root"),
    ([(("inputs_schema",), "./other.json")], "inputs_schema must point to schema.json in v1"),
    # 14. step run paths
    ([(("steps", 0, "run"), "../run.sh")], "step 'run' run path escapes bundle root"),
    ([(("steps", 0, "run"), "/bin/sh")], "step 'run' run path escapes bundle root"),
]


@pytest.mark.parametrize(
    "changes, message",
    VALIDATION_CASES,
    ids=[f"{i:02d}-{m}" for i, (_, m) in enumerate(VALIDATION_CASES)],
)
def test_validation_message(make_bundle, changes, message):
    assert load_error(make_bundle, *changes) == message


def test_validation_order_first_failure_wins(make_bundle):
    """Fix one fault at a time: the messages come in the order of the spec."""
    faults = [
        (("id",), DELETE, "missing or invalid string field: id"),
        (("version",), "", "field must not be empty: version"),
        (("name",), 1, "missing or invalid string field: name"),
        (("summary",), None, "missing or invalid string field: summary"),
        (("inputs_schema",), DELETE, "missing or invalid string field: inputs_schema"),
        (("risk",), "x", "invalid risk: x"),
        (("permissions",), [1], "permissions[0] must be an object"),
        (("effects",), "x", "missing or invalid array field: effects"),
        (("billing",), None, "missing or invalid object field: billing"),
        (("runtime",), {"execution": "vm"}, "invalid runtime.execution: vm"),
        (("steps",), [], "steps must not be empty"),
        (("checks",), [{"type": "x"}], "invalid checks[0].type: x"),
    ]
    for i, (_, _, message) in enumerate(faults):
        remaining = [(path, value) for path, value, _ in faults[i:]]
        assert load_error(make_bundle, *remaining) == message


def test_missing_schema_files_raw_enoent(make_bundle):
    root = make_bundle(files={"schema.json": None})
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    assert info.value.message == (
        f"ENOENT: no such file or directory, access '{root}/schema.json'"
    )
    # inputs_schema elsewhere still needs the root schema.json (rule 12)
    root = make_bundle(inputs_schema="sub/schema.json",
                       files={"sub/schema.json": "{}", "schema.json": None})
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    assert info.value.message == (
        f"ENOENT: no such file or directory, access '{root}/schema.json'"
    )
    root = make_bundle(inputs_schema="sub/schema.json")
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    assert info.value.message == (
        f"ENOENT: no such file or directory, access '{root}/sub/schema.json'"
    )


def test_steps_folder_rules(make_bundle, tmp_path):
    root = make_bundle()
    for child in (root / "steps").iterdir():
        child.unlink()
    (root / "steps").rmdir()
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    assert info.value.message == f"ENOENT: no such file or directory, stat '{root}/steps'"
    (root / "steps").write_text("not a folder")
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    assert info.value.message == "steps/ must be a directory"


def test_missing_step_file_raw_enoent(make_bundle):
    root = make_bundle(files={"steps/run.sh": None})
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    assert info.value.message == (
        f"ENOENT: no such file or directory, access '{root}/steps/run.sh'"
    )


def test_root_level_name_starting_with_dots_is_inside(make_bundle):
    """The original's string-prefix test wrongly refused `..x`; a real path test does not."""
    root = make_bundle(steps=[{"uses": "shell", "name": "run", "run": "..run.sh"}],
                       files={"..run.sh": "#!/bin/sh\n"})
    assert spell.load_manifest(str(root))["steps"][0]["run"] == "..run.sh"


@pytest.mark.parametrize("version", ["../../../x", "a/b", "a\\b", "..", "."])
def test_version_cannot_name_another_folder(make_bundle, version):
    message = load_error(make_bundle, (("version",), version))
    assert message == f"version must not contain '/' or '\\' or be '.' or '..': {version}"


def test_strings_keep_their_untrimmed_value(make_bundle):
    root = make_bundle(name="  Demo  ", runtime={"execution": "host", "platforms": [],
                                                  "docker_image": " "})
    manifest = spell.load_manifest(str(root))
    assert manifest["name"] == "  Demo  "
    assert "docker_image" not in manifest["runtime"]


def test_params_kept_only_when_a_mapping(make_bundle):
    root = make_bundle(checks=[{"type": "exit_code", "params": [1]},
                               {"type": "file_exists", "params": {"path": "x"}}])
    checks = spell.load_manifest(str(root))["checks"]
    assert [c["params"] for c in checks] == [{}, {"path": "x"}]


def test_unknown_keys_ignored(make_bundle):
    root = make_bundle(extra={"anything": [1, 2]}, steps=[
        {"uses": "shell", "name": "run", "run": "steps/run.sh", "timeout": 5}])
    assert "extra" not in spell.load_manifest(str(root))


# Section 4.2: YAML semantics ##################################################


def parse(text: str):
    return spell.parse_manifest_yaml(text.encode("utf-8"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a: yes", "yes"),
        ("a: no", "no"),
        ("a: on", "on"),
        ("a: off", "off"),
        ("a: y", "y"),
        ("a: true", True),
        ("a: True", True),
        ("a: FALSE", False),
        ("a: tRUE", "tRUE"),
        ("a: 010", 10),
        ("a: 0o10", 8),
        ("a: 0x10", 16),
        ("a: -0x10", -16),
        ("a: 0b101", 5),
        ("a: 1_000", 1000),
        ("a: +12", 12),
        ("a: 1_000_", "1_000_"),
        ("a: 1:20", "1:20"),
        ("a: 1.0", 1.0),
        ("a: 1.0.0", "1.0.0"),
        ("a: 1e3", 1000.0),
        ("a: .5", 0.5),
        ("a: ~", None),
        ("a: null", None),
        ("a: NULL", None),
        ("a:", None),
        ("a: 2024-01-01", "2024-01-01T00:00:00.000Z"),
        ("a: 2024-01-01T10:20:30.5+02:00", "2024-01-01T08:20:30.500Z"),
        ("a: 2024-01-01 10:20:30", "2024-01-01T10:20:30.000Z"),
        ("a: 2024-02-30", "2024-03-01T00:00:00.000Z"),
        ("a: 2024-1-1", "2024-1-1"),
        ("a: '010'", "010"),
        ("a: !!str 10", "10"),
    ],
)
def test_yaml_scalars(text, expected):
    value = parse(text)["a"]
    assert value == expected
    assert type(value) is type(expected) or isinstance(expected, str)


def test_yaml_infinity_and_nan():
    assert parse("a: .inf")["a"] == math.inf
    assert parse("a: -.Inf")["a"] == -math.inf
    assert math.isnan(parse("a: .NaN")["a"])


def test_timestamp_is_not_a_string():
    assert not spell._is_str(parse("a: 2024-01-01")["a"])


def test_duplicate_keys_are_a_parse_error():
    with pytest.raises(spell.ManifestError) as info:
        parse("a: 1\nb: 2\na: 3\n")
    assert info.value.message.startswith("failed to parse spell.yaml: duplicated mapping key")
    # keys are strings as in JavaScript, so 1 and "1" collide
    with pytest.raises(spell.ManifestError):
        parse("1: a\n'1': b\n")


def test_merge_keys_follow_the_original():
    assert parse("x: &x {k: 1, j: 1}\ny: {<<: *x, k: 2}")["y"] == {"k": 2, "j": 1}


def test_non_string_keys_become_strings():
    assert parse("true: 1\n~: 2\n3: 3\n")  == {"true": 1, "null": 2, "3": 3}


def test_sets_binary_and_pairs_are_json_friendly():
    value = parse("a: !!set {x}\nb: !!binary aGk=\nc: !!pairs [{k: 1}]")
    assert value == {"a": {"x": None}, "b": {"0": 104, "1": 105}, "c": [["k", 1]]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "spell.yaml must be a mapping object"),
        ("# only a comment\n", "spell.yaml must be a mapping object"),
        ("- a\n- b\n", "spell.yaml must be a mapping object"),
        ("just text\n", "spell.yaml must be a mapping object"),
        ("42\n", "spell.yaml must be a mapping object"),
    ],
)
def test_top_level_must_be_a_mapping(make_bundle, text, message):
    root = make_bundle(yaml_text=text)
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    assert info.value.message == message


def test_spell_yaml_not_found(make_bundle):
    root = make_bundle(files={"spell.yaml": None})
    with pytest.raises(spell.SpellError) as info:
        spell.load_manifest(str(root))
    assert info.value.message == f"spell.yaml not found: {root}/spell.yaml"


@pytest.mark.parametrize(
    "text",
    [
        "a: [1, 2",
        "a: b: c",
        "\tid: x",
        "a: *missing",
        "a: !!python/object:os.system x",
        "a: !!int nope",
        "a: !!timestamp nope",
        "[[1]]: x",
        "a: 1\n---\nb: 2\n",
    ],
)
def test_parse_errors_keep_the_prefix(text):
    with pytest.raises(spell.ManifestError) as info:
        parse(text)
    assert info.value.message.startswith("failed to parse spell.yaml: ")
    assert "\n" not in info.value.message


def test_bom_is_ignored():
    assert parse("\ufeffa: 1") == {"a": 1}


def test_version_number_fails_through_load(make_bundle):
    root = make_bundle(yaml_text=_yaml_with(make_bundle, [(("version",), Raw("1.0"))]))
    with pytest.raises(spell.ManifestError, match="^missing or invalid string field: version$"):
        spell.load_manifest(str(root))


def test_infinite_max_amount_is_accepted(make_bundle):
    root = make_bundle(yaml_text=_yaml_with(make_bundle, [
        (("billing", "max_amount"), Raw(".inf"))]))
    assert spell.load_manifest(str(root))["billing"]["max_amount"] == math.inf


# Hostile input ##################################################################

BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *[
            f"{c}: &{c} [{', '.join('*' + p for _ in range(9))}]"
            for p, c in zip("abcdefgh", "bcdefghi")
        ],
    ]
)


def _hostile_bundles(make_bundle, tmp_path):
    """(name, folder, message prefix) of bundles whose spell.yaml is hostile."""
    cases = []

    def add(name, data, prefix):
        cases.append((name, make_bundle(yaml_text=data, dirname=name), prefix))

    add("billion-laughs", BILLION_LAUGHS, "failed to parse spell.yaml: ")
    add("deep-brackets", "[" * 10_000, "failed to parse spell.yaml: ")
    add("deep-braces", "{" * 10_000, "failed to parse spell.yaml: ")
    add("deep-closed", "a: " + "[" * 10_000 + "]" * 10_000, "failed to parse spell.yaml: ")
    add("deep-block", "".join(" " * i + "- \n" for i in range(0, 2000, 2)),
        "failed to parse spell.yaml: ")
    add("binary-junk", bytes(range(256)) * 64, "failed to parse spell.yaml: ")
    add("invalid-utf8", b"id: \xc3\x28\n", "failed to parse spell.yaml: invalid UTF-8")
    add("nul-byte", b"id: a\x00b\n", "failed to parse spell.yaml: ")
    add("control-char", b"id: \x1b[31mred\n", "failed to parse spell.yaml: ")
    add("many-aliases", "a: &a x\nb: [" + ", ".join(["*a"] * 500) + "]\n",
        "failed to parse spell.yaml: ")
    big = make_bundle(dirname="huge", yaml_text="")
    with open(big / "spell.yaml", "wb") as handle:
        handle.truncate(100 * 1024 * 1024)  # sparse: costs no disk
    cases.append(("huge", big, "spell.yaml is larger than 1048576 bytes: "))
    fifo = make_bundle(dirname="fifo", files={"spell.yaml": None})
    os.mkfifo(fifo / "spell.yaml")
    cases.append(("fifo", fifo, "spell.yaml is not a regular file: "))
    zero = make_bundle(dirname="dev-zero", files={"spell.yaml": None})
    os.symlink("/dev/zero", zero / "spell.yaml")
    cases.append(("dev-zero", zero, "spell.yaml must not be a symlink: "))
    folder = make_bundle(dirname="folder", files={"spell.yaml": None})
    (folder / "spell.yaml").mkdir()
    cases.append(("folder", folder, "spell.yaml is not a regular file: "))
    return cases


def test_hostile_yaml_through_main(make_bundle, tmp_path, run_cli, store):
    for name, root, prefix in _hostile_bundles(make_bundle, tmp_path):
        start = time.monotonic()
        code, out, err = run_cli("install", root)
        elapsed = time.monotonic() - start
        assert code == 1, name
        assert out == "", name
        assert err.startswith(prefix), (name, err[:300])
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err[:300])
        assert elapsed < 5, (name, elapsed)
    assert not (store / "spells").exists() or not any((store / "spells").iterdir())


def test_hostile_yaml_through_pyz(make_bundle, tmp_path, run_pyz):
    for name, root, prefix in _hostile_bundles(make_bundle, tmp_path):
        proc = run_pyz("install", root, timeout=20)
        assert proc.returncode == 1, name
        assert proc.stderr.startswith(prefix), (name, proc.stderr[:300])
        assert proc.stderr.count("\n") == 1, (name, proc.stderr[:300])


def test_deep_json_schema_is_refused_cleanly(make_bundle, run_cli):
    root = make_bundle(files={"schema.json": "[" * 100_000 + "]" * 100_000})
    code, out, err = run_cli("install", root)
    assert code == 0, err  # install copies the schema; inspect reads it
    code, out, err = run_cli("inspect", "test/demo")
    assert code == 1
    assert err.startswith("failed to parse schema.json: ")
    assert err.count("\n") == 1
