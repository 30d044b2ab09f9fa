"""The command line: every command of the original, help, argument errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import spell
from conftest import REPO_ROOT

# Every command of the original with a minimal valid argument list, and the
# handler it must reach.
COMMANDS = [
    (["install", "src"], "cmd_install"),
    (["list"], "cmd_list"),
    (["inspect", "a/b"], "cmd_inspect"),
    (["cast", "a/b"], "cmd_cast"),
    (["sign", "keygen", "pub"], "cmd_sign_keygen"),
    (["sign", "bundle", "dir", "--private-key", "k.pem"], "cmd_sign_bundle"),
    (["license", "add", "name", "token"], "cmd_license_add"),
    (["license", "list"], "cmd_license_list"),
    (["license", "remove", "name"], "cmd_license_remove"),
    (["trust", "add", "pub", "key"], "cmd_trust_add"),
    (["trust", "list"], "cmd_trust_list"),
    (["trust", "remove", "pub"], "cmd_trust_remove"),
    (["log", "id"], "cmd_log"),
]


def parse(*argv):
    return spell.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, handler", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_every_command_reaches_its_handler(argv, handler):
    assert parse(*argv).func.__name__ == handler


def test_cast_options_and_defaults():
    args = parse("cast", "a/b")
    assert (args.version, args.param, args.input, args.dry_run, args.yes,
            args.allow_billing, args.require_signature, args.allow_unsigned,
            args.verbose, args.profile) == (
        None, [], None, False, False, False, False, False, False, None)
    args = parse("cast", "--dry-run", "-p", "a=1", "a/b", "--param=b=2", "--param", "c=3",
                 "--version=2.0.0", "--input", "in.json", "--yes", "--allow-billing",
                 "--require-signature", "--allow-unsigned", "--verbose", "--profile", "p")
    assert args.id == "a/b" and args.param == ["a=1", "b=2", "c=3"]
    assert (args.version, args.input, args.profile) == ("2.0.0", "in.json", "p")
    assert args.dry_run and args.yes and args.allow_billing and args.allow_unsigned
    assert args.require_signature and args.verbose


def test_option_defaults_of_sign_and_trust():
    args = parse("sign", "keygen", "pub")
    assert (args.publisher, args.key_id, args.out_dir) == ("pub", "default", ".spell-keys")
    args = parse("sign", "bundle", "dir", "--private-key=k.pem", "--key-id", "k1",
                 "--publisher", "me")
    assert (args.local_path, args.private_key, args.key_id, args.publisher) == (
        "dir", "k.pem", "k1", "me")
    assert parse("sign", "bundle", "dir", "--private-key", "k").key_id == "default"
    args = parse("trust", "add", "--key-id", "k9", "pub", "KEY")
    assert (args.publisher, args.public_key, args.key_id) == ("pub", "KEY", "k9")
    assert parse("trust", "add", "pub", "KEY").key_id == "default"
    assert parse("inspect", "a/b", "--version", "1.0.0").version == "1.0.0"


def test_help_goes_to_stdout_and_exits_0(run_cli):
    code, out, err = run_cli("--help")
    assert (code, err) == (0, "")
    assert "Minimal runtime for SpellBundle v1" in out
    for name in ("install", "list", "inspect", "cast", "sign", "license", "trust", "log",
                 "help"):
        assert f"    {name} " in out
    code, out, err = run_cli("-h")
    assert code == 0 and "Minimal runtime" in out


@pytest.mark.parametrize("argv", [c[0][:2] if c[0][0] in ("sign", "license", "trust")
                                  else c[0][:1] for c in COMMANDS])
def test_each_command_has_help(run_cli, argv):
    code, out, err = run_cli(*argv, "--help")
    assert (code, err) == (0, "")
    assert out.startswith(f"usage: spell {' '.join(argv)}")


def test_help_command(run_cli):
    assert run_cli("help")[0] == 0
    assert run_cli("help")[1] == run_cli("--help")[1]
    code, out, err = run_cli("help", "install")
    assert (code, err) == (0, "")
    assert out.startswith("usage: spell install") and "git requires #<ref>" in out
    code, out, err = run_cli("help", "trust")
    assert code == 0 and out.startswith("usage: spell trust")
    code, out, err = run_cli("help", "trust", "add")
    assert code == 0 and out.startswith("usage: spell trust add")
    code, out, err = run_cli("help", "list", "x")
    assert (code, out) == (1, "")
    assert err.startswith("error: unknown command 'list x'\n")
    code, out, err = run_cli("help", "nope")
    assert (code, out) == (1, "")
    assert err.startswith("error: unknown command 'nope'\n")


@pytest.mark.parametrize("argv", [[], ["sign"], ["license"], ["trust"]])
def test_bare_program_and_groups_print_help_on_stderr(run_cli, argv):
    code, out, err = run_cli(*argv)
    assert (code, out) == (1, "")
    assert err.startswith("usage: spell" + "".join(" " + a for a in argv))


@pytest.mark.parametrize(
    "argv, usage",
    [
        (["bogus"], "usage: spell "),
        (["--bogus"], "usage: spell "),
        (["list", "--bogus"], "usage: spell list"),
        (["list", "extra"], "usage: spell list"),
        (["install"], "usage: spell install"),
        (["install", "a", "b"], "usage: spell install"),
        (["inspect"], "usage: spell inspect"),
        (["inspect", "x", "--version"], "usage: spell inspect"),
        (["cast"], "usage: spell cast"),
        (["cast", "x", "--input"], "usage: spell cast"),
        (["sign", "keygen"], "usage: spell sign keygen"),
        (["sign", "bundle", "dir"], "usage: spell sign bundle"),
        (["license", "add", "name"], "usage: spell license add"),
        (["license", "remove"], "usage: spell license remove"),
        (["trust", "add", "pub"], "usage: spell trust add"),
        (["trust", "remove"], "usage: spell trust remove"),
        (["trust", "bogus"], "usage: spell trust"),
        (["log"], "usage: spell log"),
        (["list", "--js"], "usage: spell list"),
    ],
)
def test_bad_arguments_exit_1_with_the_usage(run_cli, argv, usage):
    code, out, err = run_cli(*argv)
    assert (code, out) == (1, "")
    first, blank, rest = err.split("\n", 2)
    assert first.startswith("error: ")
    assert blank == ""
    assert rest.startswith(usage)
    assert "Traceback" not in err


def test_failures_are_one_line_on_stderr(run_cli):
    assert run_cli("inspect", "nobody/x") == (1, "", "spell not installed: nobody/x\n")
    assert run_cli("install", "a\x00b") == (1, "", "source must not contain NUL characters\n")
    assert run_cli("inspect", "a\nb") == (1, "", "spell not installed: a\\nb\n")


def test_main_without_streams_uses_sys_streams(store, capsys):
    assert spell.main(["list"]) == 0
    assert capsys.readouterr().out == "No spells installed\n"
    assert spell.main(["--help"]) == 0
    assert "Minimal runtime" in capsys.readouterr().out


def _modules_after(argv, env):
    code = (
        "import sys, io, spell\n"
        f"rc = spell.main({argv!r}, stdout=io.StringIO(), stderr=io.StringIO())\n"
        "heavy = sorted(m for m in ('yaml', 'jsonschema', 'cryptography') "
        "if m in sys.modules)\n"
        "print(rc, ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["log", "x"], ["trust", "--help"],
                                  ["inspect", "a/b"], ["trust", "list"], ["license", "list"],
                                  ["cast", "a/b", "--allow-unsigned"]])
def test_light_commands_import_no_heavy_dependency(store, argv):
    import os

    result = _modules_after(argv, dict(os.environ))
    assert result[1:] == [], f"{argv} imported {result[1:]}"


def test_install_imports_yaml_only_when_it_runs(store, make_bundle):
    import os

    rc, *heavy = _modules_after(["install", str(make_bundle())], dict(os.environ))
    assert rc == "0" and heavy == ["yaml"]


def test_script_exit_status(store):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "spell.py"), "inspect", "x/y"],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "spell not installed: x/y\n")


@pytest.mark.parametrize("argv", [
    ["install", "./b"],
    ["list", "--json"],
    ["inspect", "a/b", "--version", "1.0.0"],
    ["cast", "a/b", "-p", "x=1", "--dry-run", "--allow-unsigned", "--input", "f.json"],
    ["sign", "keygen", "pub", "--key-id", "k1"],
    ["sign", "bundle", "./b", "--private-key", "k.pem"],
    ["license", "add", "dev", "ent1.x.y"],
    ["trust", "remove", "pub"],
    ["verify", "a/b", "--json"],
    ["policy", "validate", "--file", "p.json"],
    ["log", "x.json"],
    ["api", "--port", "0"],
])
def test_parsing_one_command_matches_the_full_parser(argv):
    # main() builds only the parser of the command named; the result must be
    # the one the whole parser gives.
    def parsed(parser):
        values = vars(parser.parse_args(argv))
        values.pop("parser", None)
        return values

    assert spell._command_of(argv) == argv[0]
    assert parsed(spell.build_parser(only=argv[0])) == parsed(spell.build_parser())


@pytest.mark.parametrize("argv", [[], ["--version"], ["help", "cast"], ["bogus"],
                                  ["-h", "cast"]])
def test_other_argument_lists_use_the_full_parser(argv):
    assert spell._command_of(argv) is None
