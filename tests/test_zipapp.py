"""The built zipapps, driven as a user would, and the package metadata."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import spell
from conftest import REPO_ROOT

MISSING_YAML = (
    "missing dependency: the Python package 'PyYAML' is not installed "
    "(install it with: python3 -m pip install PyYAML)\n"
)


def build(out_dir, root=REPO_ROOT):
    subprocess.run([sys.executable, str(root / "build_zipapp.py"), "--out-dir", str(out_dir)],
                   check=True, capture_output=True, timeout=120)
    return out_dir / "spell.pyz", out_dir / "spell_runner.pyz"


# Building ##########################################################################


def test_contents(pyz):
    with zipfile.ZipFile(pyz.spell) as archive:
        assert archive.namelist() == ["__main__.py", "spell.py", "spell.pyc",
                                      "spell_runner.py", "spell_runner.pyc"]
        assert archive.read("spell.py") == (REPO_ROOT / "spell.py").read_bytes()
        assert b"spell.main()" in archive.read("__main__.py")
    with zipfile.ZipFile(pyz.runner) as archive:
        assert archive.namelist() == ["__main__.py", "spell_runner.py", "spell_runner.pyc"]
    assert pyz.spell.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(pyz.spell, os.X_OK) and os.access(pyz.runner, os.X_OK)


def test_builds_are_reproducible(pyz, tmp_path):
    """Two builds, one from a copy with other file times, give the same bytes."""
    copy = tmp_path / "tree"
    copy.mkdir()
    for name in ("spell.py", "spell_runner.py", "build_zipapp.py"):
        shutil.copyfile(REPO_ROOT / name, copy / name)
        os.utime(copy / name, (1_000_000_000, 1_000_000_000))
    os.chmod(copy / "spell.py", 0o600)
    again = build(tmp_path / "again")
    other = build(tmp_path / "other", root=copy)
    for first, second, third in zip(pyz, again, other):
        assert first.read_bytes() == second.read_bytes() == third.read_bytes()


def test_default_out_dir_is_dist(tmp_path):
    copy = tmp_path / "tree"
    copy.mkdir()
    for name in ("spell.py", "spell_runner.py", "build_zipapp.py"):
        shutil.copyfile(REPO_ROOT / name, copy / name)
    subprocess.run([sys.executable, str(copy / "build_zipapp.py")], check=True,
                   capture_output=True, timeout=120, cwd=tmp_path)
    assert sorted(p.name for p in (copy / "dist").iterdir()) == [
        "spell.pyz", "spell_runner.pyz"]


# Running ###########################################################################


def test_exit_status_is_the_clis(run_pyz):
    proc = run_pyz("inspect", "x/y")
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "spell not installed: x/y\n")
    proc = run_pyz("--help")
    assert proc.returncode == 0 and "Minimal runtime for SpellBundle v1" in proc.stdout
    assert run_pyz().returncode == 1
    assert run_pyz("bogus").returncode == 1


def test_runner_pyz_runs_alone(run_pyz, pyz):
    proc = run_pyz("--help", pyz_path=pyz.runner)
    assert "usage: spell-runner" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["cast", "--help"], ["list"]])
def test_help_imports_no_heavy_dependency(run_pyz, argv):
    proc = run_pyz(*argv, python_flags=("-X", "importtime"))
    assert proc.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert not {"yaml", "jsonschema", "cryptography"} & imported


def test_closed_stdout_is_quiet(pyz, store):
    proc = subprocess.Popen([sys.executable, str(pyz.spell), "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=30) == 1
    assert b"Traceback" not in proc.stderr.read()
    proc.stderr.close()


# Without the dependencies ##########################################################


@pytest.fixture
def bare_python(tmp_path):
    """Flags for a Python that sees only the standard library."""
    flags = ("-S", "-I")
    probe = subprocess.run([sys.executable, *flags, "-c", "import yaml"],
                           capture_output=True, timeout=30)
    if probe.returncode == 0:
        pytest.skip("PyYAML is importable even without site-packages")
    return flags


def test_missing_dependency_is_one_line(run_pyz, bare_python, make_bundle):
    proc = run_pyz("install", make_bundle(), python_flags=bare_python)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", MISSING_YAML)


def test_missing_cryptography_is_named(run_pyz, bare_python, tmp_path):
    proc = run_pyz("sign", "keygen", "pub", "--out-dir", tmp_path / "keys",
                   python_flags=bare_python)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        "missing dependency: the Python package 'cryptography' is not installed "
        "(install it with: python3 -m pip install cryptography)\n")


def test_help_and_empty_list_work_without_dependencies(run_pyz, bare_python):
    proc = run_pyz("--help", python_flags=bare_python)
    assert (proc.returncode, proc.stderr) == (0, "")
    proc = run_pyz("list", python_flags=bare_python)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "No spells installed\n", "")
    proc = run_pyz("log", "nothing", python_flags=bare_python)
    assert (proc.returncode, proc.stderr) == (1, "log not found: nothing\n")


def test_list_of_installed_spells_names_the_missing_dependency(run_pyz, bare_python,
                                                               make_bundle):
    assert run_pyz("install", make_bundle()).returncode == 0
    for argv in (["list"], ["inspect", "test/demo"]):
        proc = run_pyz(*argv, python_flags=bare_python)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", MISSING_YAML)


# Integration: list, inspect, --json and log through the zipapp ###################


def test_list_inspect_and_json_through_the_zipapp(run_pyz, run_cli, fixtures_dir, store):
    proc = run_pyz("install", fixtures_dir / "hello-host")
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, "fixtures/hello-host@1.0.0\n", "")
    proc = run_pyz("list")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        "id@version\tname\trisk\tbilling.enabled\truntime.execution\n"
        "fixtures/hello-host@1.0.0\tHello Host\tlow\tfalse\thost\n")
    proc = run_pyz("inspect", "fixtures/hello-host")
    assert proc.returncode == 0
    assert proc.stdout.startswith("識別\n  id@version: fixtures/hello-host@1.0.0\n"
                                  "  name: Hello Host\n  summary: host 実行の最小成功ケース\n")
    assert proc.stdout == run_cli("inspect", "fixtures/hello-host")[1]
    proc = run_pyz("inspect", "fixtures/hello-host", "--version", "1.0.0", "--json")
    assert json.loads(proc.stdout)["name"] == "Hello Host"
    proc = run_pyz("list", "--json")
    assert [item["id"] for item in json.loads(proc.stdout)] == ["fixtures/hello-host"]


def test_log_through_the_zipapp(run_pyz, store):
    logs = store / "logs"
    logs.mkdir(parents=True)
    name = "20260101T000000000Z_a_b_1.0.0_0a0b.json"
    (logs / name).write_text('{"execution_id": "x", "ok": "日本"}')
    proc = run_pyz("log", name[:-5])
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, '{"execution_id": "x", "ok": "日本"}\n', "")
    proc = run_pyz("log", "../../etc/passwd")
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1, "", "log not found: ../../etc/passwd\n")


def test_output_is_utf8_whatever_the_locale(run_pyz, fixtures_dir, store):
    assert run_pyz("install", fixtures_dir / "hello-host").returncode == 0
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONIOENCODING="")
    proc = subprocess.run([sys.executable, "-X", "utf8=0", str(spell.__file__),
                           "inspect", "fixtures/hello-host"],
                          env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "識別".encode() in proc.stdout


# Packaging #########################################################################


def test_pyproject_declares_the_package():
    import tomllib

    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project = data["project"]
    assert project["requires-python"] == ">=3.10"
    deps = {d.split(">")[0].split("=")[0].strip().lower() for d in project["dependencies"]}
    assert deps == {"jsonschema", "cryptography", "pyyaml"}
    test_extra = {d.split(">")[0].strip() for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "pytest-cov"} <= test_extra
    assert project["scripts"] == {"spell": "spell:main", "spell-runner": "spell_runner:main"}
    assert data["tool"]["setuptools"]["py-modules"] == ["spell", "spell_runner"]
    if "readme" in project:
        assert (REPO_ROOT / project["readme"]).is_file()


def _can_build_offline() -> bool:
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except Exception:
        return False
    return (major, minor) >= (70, 1)


@pytest.mark.skipif(not _can_build_offline(),
                    reason="needs wheel or setuptools>=70.1 to build without isolation")
def test_pip_install(tmp_path, store):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("spell.py", "spell_runner.py", "pyproject.toml", "README.md"):
        if (REPO_ROOT / name).exists():
            shutil.copyfile(REPO_ROOT / name, src / name)
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(src)],
                   check=True, capture_output=True, timeout=300)
    assert {"spell.py", "spell_runner.py"} <= {p.name for p in target.iterdir()}
    env = dict(os.environ, PYTHONPATH=str(target))
    for script in ("spell", "spell-runner"):
        assert (target / "bin" / script).exists()
    proc = subprocess.run([str(target / "bin" / "spell"), "list"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "No spells installed\n")
    proc = subprocess.run([str(target / "bin" / "spell"), "inspect", "x/y"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (1, "spell not installed: x/y\n")
    proc = subprocess.run([str(target / "bin" / "spell"), "--version"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"spell {spell.__version__}\n")
    proc = subprocess.run([str(target / "bin" / "spell-runner")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("usage: spell-runner")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_prerendered_help_is_what_the_cli_prints(run_pyz, flag):
    # The zipapp answers a bare --help from text rendered at build time; it
    # must be exactly what the parser prints at the same width.
    env = dict(os.environ, COLUMNS="80")
    done = run_pyz(flag, env=env)
    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        assert spell.main([flag], stdout=out, stderr=io.StringIO()) == 0
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    assert done.returncode == 0
    assert done.stdout == out.getvalue()


def test_help_of_a_command_still_goes_through_the_parser(run_pyz):
    done = run_pyz("cast", "--help")
    assert done.returncode == 0
    assert "--allow-unsigned" in done.stdout


def test_install_into_its_own_venv_as_pipx_does(tmp_path, store):
    # pipx creates a venv per application, installs the project there and
    # exposes its console scripts. The same here, offline: the venv sees the
    # machine's packages (the dependencies and the build backend) instead of
    # downloading them.
    import venv

    src = tmp_path / "src"
    src.mkdir()
    for name in ("spell.py", "spell_runner.py", "pyproject.toml", "README.md"):
        shutil.copyfile(REPO_ROOT / name, src / name)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", str(src)],
                   check=True, capture_output=True, timeout=300)
    bin_dir = env_dir / "bin"
    proc = subprocess.run([str(bin_dir / "spell"), "--version"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, f"spell {spell.__version__}\n")
    proc = subprocess.run([str(bin_dir / "spell"), "install",
                           str(REPO_ROOT / "examples" / "spells" / "hello")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, SPELL_HOME=str(store)))
    assert (proc.returncode, proc.stdout) == (0, "samples/hello@1.0.0\n"), proc.stderr
    proc = subprocess.run([str(bin_dir / "spell-runner")], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("usage: spell-runner")
