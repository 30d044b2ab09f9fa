"""The store: SPELL_HOME, list, inspect, version resolution and spell log."""

from __future__ import annotations

import json
import os

import pytest

import spell

HELLO_HOST = {
    "id": "fixtures/hello-host",
    "version": "1.0.0",
    "name": "Hello Host",
    "summary": "host 実行の最小成功ケース",
    "inputs_schema": "./schema.json",
    "risk": "low",
    "permissions": [],
    "effects": [{"type": "notify", "target": "stdout", "mutates": False}],
    "billing": {"enabled": False, "mode": "none", "currency": "USD", "max_amount": 0},
    "runtime": {
        "execution": "host",
        "platforms": ["darwin/arm64", "darwin/x64", "linux/amd64", "linux/arm64", "win32/x64"],
    },
    "steps": [{"uses": "shell", "name": "hello", "run": "steps/run.sh"}],
    "checks": [{"type": "exit_code"}],
}
HELLO_SCHEMA = json.dumps({
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
    "properties": {"name": {"type": "string"}}, "required": ["name"],
    "additionalProperties": True,
})
HELLO_INSPECT = """\
識別
  id@version: fixtures/hello-host@1.0.0
  name: Hello Host
  summary: host 実行の最小成功ケース
供物
  required: name
  key types: name: string
鍵穴
  (none)
作用
  type=notify target=stdout mutates=false
代償
  enabled=false mode=none max_amount=0 currency=USD
実行
  execution=host docker_image=- platforms=darwin/arm64,darwin/x64,linux/amd64,linux/arm64,win32/x64
封印
  type=exit_code params={}
"""
LIST_HEADER = "id@version\tname\trisk\tbilling.enabled\truntime.execution"


def install(run_cli, root):
    code, out, err = run_cli("install", root)
    assert code == 0, err
    return out


# SPELL_HOME ########################################################################


def test_spell_home_relocates_the_whole_store(make_bundle, run_cli, store, tmp_path):
    install(run_cli, make_bundle())
    assert (store / "spells" / spell.id_key("test/demo") / "1.0.0").is_dir()
    assert not (tmp_path / "home" / ".spell" / "x").exists()
    assert sorted(p.name for p in store.iterdir()) == [
        "licenses", "logs", "spells", "tmp", "trust"]


def test_home_is_the_default(make_bundle, run_cli, store, monkeypatch, tmp_path):
    home = tmp_path / "other-home"
    home.mkdir()
    monkeypatch.delenv("SPELL_HOME")
    monkeypatch.setenv("HOME", str(home))
    install(run_cli, make_bundle())
    assert (home / ".spell" / "spells").is_dir()
    monkeypatch.setenv("SPELL_HOME", "")
    assert run_cli("list")[1].startswith(LIST_HEADER)


def test_read_only_commands_create_nothing(run_cli, store):
    assert run_cli("list") == (0, "No spells installed\n", "")
    assert run_cli("list", "--json") == (0, "[]\n", "")
    assert run_cli("inspect", "a/b") == (1, "", "spell not installed: a/b\n")
    assert run_cli("log", "x") == (1, "", "log not found: x\n")
    assert not store.exists()


# list ##############################################################################


def test_list_prints_the_original_table(make_bundle, run_cli, store):
    install(run_cli, make_bundle())
    install(run_cli, make_bundle(id="pay/bill", name="Bill", risk="high",
                                 billing={"enabled": True, "mode": "upfront",
                                          "currency": "USD", "max_amount": 5},
                                 runtime={"execution": "docker", "platforms": [],
                                          "docker_image": "img:1"}))
    assert run_cli("list") == (0, "\n".join([
        LIST_HEADER,
        "pay/bill@1.0.0\tBill\thigh\ttrue\tdocker",
        "test/demo@1.0.0\tDemo\tlow\tfalse\thost",
    ]) + "\n", "")


def test_list_orders_versions_descending_in_locale_order(make_bundle, run_cli, store):
    for version in ("1.9.0", "1.10.0", "2.0.0-beta", "0.0.1", "abc", "1.0.0"):
        install(run_cli, make_bundle(version=version))
    code, out, _ = run_cli("list")
    assert [line.split("\t")[0] for line in out.splitlines()[1:]] == [
        "test/demo@abc", "test/demo@2.0.0-beta", "test/demo@1.9.0", "test/demo@1.10.0",
        "test/demo@1.0.0", "test/demo@0.0.1"]


def test_list_orders_ids_in_locale_order(make_bundle, run_cli, store):
    for spell_id in ("b/x", "A/x", "a-b/x", "a_b/x"):
        install(run_cli, make_bundle(id=spell_id))
    out = run_cli("list")[1]
    assert [line.split("@")[0] for line in out.splitlines()[1:]] == [
        "a_b/x", "a-b/x", "A/x", "b/x"]


def test_list_prints_the_manifest_version_not_the_folder(make_bundle, run_cli, store):
    install(run_cli, make_bundle())
    vdir = store / "spells" / spell.id_key("test/demo")
    os.rename(vdir / "1.0.0", vdir / "renamed")
    assert run_cli("list")[1].splitlines()[1].startswith("test/demo@1.0.0\t")


def test_stray_entries_do_not_break_list(make_bundle, run_cli, store):
    install(run_cli, make_bundle())
    spells = store / "spells"
    (spells / ".DS_Store").write_bytes(b"\0\0junk")
    (spells / "junk.txt").write_text("x")
    (spells / "no-id-file").mkdir()
    broken = spells / spell.id_key("test/demo") / "9.9.9"
    broken.mkdir()
    (broken / "spell.yaml").write_text("id: [")
    (spells / spell.id_key("test/demo") / "stray.txt").write_text("x")
    code, out, err = run_cli("list")
    assert code == 0
    assert out == LIST_HEADER + "\ntest/demo@1.0.0\tDemo\tlow\tfalse\thost\n"
    assert "no-id-file" in err and "9.9.9" in err
    assert all(line.startswith("warning: ") for line in err.splitlines())


def test_special_id_files_are_skipped_not_read(make_bundle, run_cli, store):
    install(run_cli, make_bundle())
    id_file = store / "spells" / spell.id_key("test/demo") / "spell.id.txt"
    id_file.unlink()
    os.mkfifo(id_file)
    code, out, err = run_cli("list")
    assert (code, out) == (0, "No spells installed\n")
    assert f"spell.id.txt is not a regular file: {id_file}" in err
    assert run_cli("inspect", "test/demo") == (
        1, "", f"spell.id.txt is not a regular file: {id_file}\n")


def test_list_skips_an_id_mismatch(make_bundle, run_cli, store):
    install(run_cli, make_bundle())
    (store / "spells" / spell.id_key("test/demo") / "spell.id.txt").write_text("x/y\n")
    code, out, err = run_cli("list")
    assert (code, out) == (0, "No spells installed\n")
    assert "id mismatch under" in err and "spell.id.txt='x/y', spell.yaml.id='test/demo'" in err


def test_list_json(make_bundle, run_cli, store):
    install(run_cli, make_bundle())
    code, out, err = run_cli("list", "--json")
    assert code == 0
    [item] = json.loads(out)
    assert item["id"] == "test/demo" and item["version"] == "1.0.0"
    assert item["risk"] == "low" and item["billing"]["enabled"] is False
    assert item["runtime"]["execution"] == "host"
    assert item["path"] == str(store / "spells" / spell.id_key("test/demo") / "1.0.0")


def test_list_escapes_control_characters(make_bundle, run_cli, store):
    install(run_cli, make_bundle(name="evil\x1b[2J\nname"))
    out = run_cli("list")[1]
    assert out.splitlines()[1] == "test/demo@1.0.0\tevil\\x1b[2J\\nname\tlow\tfalse\thost"


# inspect ###########################################################################


def test_inspect_prints_the_hello_host_example(make_bundle, run_cli, store):
    install(run_cli, make_bundle(HELLO_HOST, files={"schema.json": HELLO_SCHEMA}))
    assert run_cli("inspect", "fixtures/hello-host") == (0, HELLO_INSPECT, "")


def test_inspect_the_shared_fixture(fixtures_dir, run_cli, store):
    install(run_cli, fixtures_dir / "hello-host")
    code, out, err = run_cli("inspect", "fixtures/hello-host")
    assert code == 0
    assert out.splitlines()[:7] == HELLO_INSPECT.splitlines()[:7]


def test_inspect_every_section(make_bundle, run_cli, store):
    yaml_text = """\
id: full/spell
version: 2.1.0
name: Full
summary: Everything
inputs_schema: ./schema.json
risk: critical
permissions:
  - connector: github
    scopes: [repo:read, repo:write]
  - connector: slack
    scopes: [chat]
effects: []
billing: {enabled: true, mode: on_success, currency: usd, max_amount: 10.50}
runtime:
  execution: docker
  docker_image: ghcr.io/x/y:1
  platforms: [linux/amd64]
steps:
  - {uses: shell, name: a, run: steps/run.sh}
checks:
  - type: http_status
    params: {expect: 200.0, url: "https://例え.jp", at: 2024-01-01, big: 1e21, inf: .inf}
  - type: jsonpath_equals
    params: [not, a, mapping]
  - type: file_exists
    params: {path: out.txt, nested: {list: [1, 2.5, null, true]}}
"""
    schema = json.dumps({"type": "object", "required": ["a", 3, "b"], "properties": {
        "a": {"type": ["string", "null"]}, "b": {"type": "integer"}, "c": True,
        "d": {"type": 5}}})
    install(run_cli, make_bundle(yaml_text=yaml_text, files={"schema.json": schema}))
    code, out, err = run_cli("inspect", "full/spell")
    assert (code, err) == (0, "")
    assert out == """\
識別
  id@version: full/spell@2.1.0
  name: Full
  summary: Everything
供物
  required: a,b
  key types: a: string|null,b: integer,c: unknown,d: unknown
鍵穴
  connector=github scopes=repo:read,repo:write
  connector=slack scopes=chat
作用
代償
  enabled=true mode=on_success max_amount=10.5 currency=usd
実行
  execution=docker docker_image=ghcr.io/x/y:1 platforms=linux/amd64
封印
  type=http_status params={"expect":200,"url":"https://例え.jp","at":"2024-01-01T00:00:00.000Z","big":1e+21,"inf":null}
  type=jsonpath_equals params={}
  type=file_exists params={"path":"out.txt","nested":{"list":[1,2.5,null,true]}}
"""


@pytest.mark.parametrize("schema", ['[1, 2]', '"text"', '{"required": "a", "properties": []}'])
def test_inspect_non_object_schemas_summarise_as_none(make_bundle, run_cli, store, schema):
    install(run_cli, make_bundle(files={"schema.json": schema}))
    out = run_cli("inspect", "test/demo")[1]
    assert "  required: (none)\n  key types: (none)\n" in out


def test_inspect_infinite_max_amount(make_bundle, run_cli, store):
    text = make_bundle.manifest()
    root = make_bundle(billing={**text["billing"], "max_amount": float("inf")})
    install(run_cli, root)
    assert "max_amount=Infinity currency=USD" in run_cli("inspect", "test/demo")[1]


def test_inspect_resolves_latest(make_bundle, run_cli, store):
    for version in ("1.9.0", "1.10.0", "2.0.0-beta", "0.0.1", "abc", "1.0.0"):
        install(run_cli, make_bundle(version=version))
    assert "id@version: test/demo@1.10.0\n" in run_cli("inspect", "test/demo")[1]
    out = run_cli("inspect", "test/demo", "--version", "2.0.0-beta")[1]
    assert "id@version: test/demo@2.0.0-beta\n" in out
    assert run_cli("inspect", "test/demo", "--version=abc")[0] == 0
    assert run_cli("inspect", "test/demo", "--version", "3.0.0") == (
        1, "", "version not installed for test/demo: 3.0.0\n")
    assert run_cli("inspect", "test/demo", "--version", "") == (
        1, "", "version not installed for test/demo: \n")


def test_inspect_latest_without_plain_versions(make_bundle, run_cli, store):
    for version in ("2.0.0-beta", "abc"):
        install(run_cli, make_bundle(version=version))
    assert "id@version: test/demo@abc\n" in run_cli("inspect", "test/demo")[1]


@pytest.mark.parametrize(
    "versions, latest",
    [
        (["1.9.0", "1.10.0", "2.0.0-beta", "0.0.1", "abc", "1.0.0"], "1.10.0"),
        (["2.0.0-beta", "abc"], "abc"),
        (["01.0.0", "1.0.0"], "1.0.0"),
        (["v2.0.0", "1.0.0"], "1.0.0"),
        (["B", "a", "_"], "B"),
        (["10.0.0", "9.99.99"], "10.0.0"),
    ],
)
def test_pick_latest(versions, latest):
    assert spell.pick_latest(versions) == latest


def test_inspect_resolution_errors(make_bundle, run_cli, store):
    install(run_cli, make_bundle())
    id_dir = store / "spells" / spell.id_key("test/demo")
    assert run_cli("inspect", "nope/x") == (1, "", "spell not installed: nope/x\n")
    assert run_cli("inspect", " test/demo") == (1, "", "spell not installed:  test/demo\n")
    (id_dir / "spell.id.txt").write_text("other/id\n")
    assert run_cli("inspect", "test/demo") == (
        1, "", "id mismatch in spell.id.txt: expected 'test/demo', found 'other/id'\n")
    (id_dir / "spell.id.txt").unlink()
    assert run_cli("inspect", "test/demo") == (1, "", "missing spell.id.txt for test/demo\n")
    (id_dir / "spell.id.txt").write_text("test/demo\n")
    os.rename(id_dir / "1.0.0", store / "moved")
    assert run_cli("inspect", "test/demo") == (
        1, "", "no versions installed for: test/demo\n")
    os.rename(store / "moved", id_dir / "1.0.0")
    yaml_path = id_dir / "1.0.0" / "spell.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("id: test/demo", "id: test/other"))
    assert run_cli("inspect", "test/demo") == (
        1, "", "manifest id mismatch: expected 'test/demo', found 'test/other'\n")


def test_inspect_json(make_bundle, run_cli, store):
    install(run_cli, make_bundle())
    code, out, err = run_cli("inspect", "test/demo", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["id"] == "test/demo" and data["version"] == "1.0.0"
    assert data["inputs"] == {"required": [], "key_types": ["name: string"]}
    assert data["steps"] == [{"uses": "shell", "name": "run", "run": "steps/run.sh"}]
    assert data["source"]["type"] == "local"


def test_inspect_escapes_control_characters(make_bundle, run_cli, store):
    install(run_cli, make_bundle(summary="line1\nid@version: forged"))
    out = run_cli("inspect", "test/demo")[1]
    assert "  summary: line1\\nid@version: forged\n" in out
    assert [line for line in out.splitlines() if line.startswith("id@version")] == []


# spell log #########################################################################


def test_log_prints_the_file(run_cli, store):
    logs = store / "logs"
    logs.mkdir(parents=True)
    name = "20260218T103000123Z_test_demo_1.0.0_ab12.json"
    (logs / name).write_text('{\n  "ok": true\n}')
    assert run_cli("log", name) == (0, '{\n  "ok": true\n}\n', "")
    assert run_cli("log", name[:-5]) == (0, '{\n  "ok": true\n}\n', "")
    (logs / name).write_text("{}\n")
    assert run_cli("log", name) == (0, "{}\n", "")


@pytest.mark.parametrize(
    "execution_id",
    ["missing", "../secret", "../secret.json", "/etc/passwd", "a/../../secret",
     "a\nb", "a\x00b", "..", ".json", "", "x" * 300],
)
def test_log_ids_that_could_escape_are_refused(run_cli, store, execution_id):
    (store / "logs").mkdir(parents=True)
    (store / "secret.json").write_text("{}")
    code, out, err = run_cli("log", execution_id)
    assert (code, out) == (1, "")
    assert err == "log not found: " + spell.escape_text(execution_id) + "\n"


def test_log_refuses_folders_and_links(run_cli, store, tmp_path):
    logs = store / "logs"
    logs.mkdir(parents=True)
    (logs / "adir.json").mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.symlink(outside, logs / "link.json")
    os.mkfifo(logs / "fifo.json")
    for name in ("adir", "link", "fifo"):
        assert run_cli("log", name) == (1, "", f"log not found: {name}\n")
