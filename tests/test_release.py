"""The release machinery: the tag check, the single version source, the workflows."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_release_version.py")
WORKFLOWS = os.path.join(ROOT, ".github", "workflows")


def _load_tool():
    spec = importlib.util.spec_from_file_location("check_release_version", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _source(tmp_path, text: str) -> str:
    path = tmp_path / "spell.py"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _run(tmp_path, capsys, tag: str, text: str = '__version__ = "1.2.3"\n'):
    status = tool.main([tag, "--source", _source(tmp_path, text)])
    out, err = capsys.readouterr()
    return status, out, err


# The check ####################################################################


def test_matching_tag_prints_one_line_and_exits_0(tmp_path, capsys):
    status, out, err = _run(tmp_path, capsys, "v1.2.3")
    assert (status, out, err) == (0, "tag v1.2.3 matches spell.__version__ 1.2.3\n", "")


def test_mismatching_tag_names_both_versions(tmp_path, capsys):
    status, out, err = _run(tmp_path, capsys, "v1.2.4")
    assert status == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("check_release_version: error: tag v1.2.4 does not match")
    assert "'1.2.3'" in err and 'set __version__ = "1.2.4" or tag v1.2.3' in err


@pytest.mark.parametrize(
    "tag",
    [
        "1.2.3",
        "v1.2",
        "v1.2.3.4",
        "v01.2.3",
        "v1.2.3-rc1",
        "V1.2.3",
        "",
        " v1.2.3",
        "refs/tags/v1.2.3",
        "vX.Y.Z",
    ],
)
def test_malformed_tag_is_refused_before_reading_the_source(tmp_path, capsys, tag):
    missing = str(tmp_path / "nowhere.py")
    status = tool.main([tag, "--source", missing])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err == (
        f"check_release_version: error: malformed tag {tag!r}: "
        "expected v<major>.<minor>.<patch>, e.g. v1.2.3\n"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("__version__ = '2.0.0'\n", "2.0.0"),
        ('__version__="2.0.0"  # bumped by hand\n', "2.0.0"),
        ('"""doc"""\n\nimport os\n\n__version__ = "2.0.0"\n\nX = 1\n', "2.0.0"),
    ],
)
def test_version_line_forms(tmp_path, text, expected):
    assert tool.declared_version(_source(tmp_path, text)) == expected


@pytest.mark.parametrize(
    "text, detail",
    [
        ("VERSION = '1.2.3'\n", "has no __version__"),
        ('__version__ = "1.2.3"\n__version__ = "1.2.4"\n', "has 2 __version__"),
    ],
)
def test_source_without_exactly_one_version_line(tmp_path, capsys, text, detail):
    status, out, err = _run(tmp_path, capsys, "v1.2.3", text)
    assert status == 1 and out == ""
    assert detail in err and err.count("\n") == 1


def test_unreadable_source(tmp_path, capsys):
    status = tool.main(["v1.2.3", "--source", str(tmp_path / "missing.py")])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.startswith("check_release_version: error: cannot read ")


def test_the_script_checks_this_checkout_without_importing_spell():
    """Run as the release workflow does, where spell cannot be imported."""
    version = tool.declared_version(os.path.join(ROOT, "spell.py"))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run(
        [sys.executable, "-S", "-I", TOOL, f"v{version}"],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"tag v{version} matches spell.__version__ {version}\n"
    done = subprocess.run(
        [sys.executable, "-I", TOOL, "v0.0.0-not-a-release"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "malformed tag" in done.stderr


# The version's single source ##################################################


def test_the_version_read_as_text_is_the_one_spell_reports():
    import spell

    assert tool.declared_version(os.path.join(ROOT, "spell.py")) == spell.__version__
    assert tool.TAG_RE.fullmatch(f"v{spell.__version__}"), "a release needs X.Y.Z"


def test_pyproject_takes_its_version_from_spell():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    assert "version" not in project["project"], "written once, in spell.py"
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "spell.__version__"}


# The workflows ################################################################


def _workflow(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    # YAML 1.1 reads the key `on` as the boolean true.
    document["on"] = document.pop(True, document.get("on"))
    return document


def _steps(job: dict) -> list[str]:
    return [step.get("run", "") + step.get("uses", "") for step in job["steps"]]


def test_ci_runs_the_suite_on_pushes_and_pull_requests():
    ci = _workflow("ci.yml")
    assert "push" in ci["on"] and "pull_request" in ci["on"]
    (job,) = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert any("bash .ci/run" in step for step in _steps(job))


def test_release_checks_builds_publishes_and_attaches():
    release = _workflow("release.yml")
    assert release["on"] == {"push": {"tags": ["v*"]}}
    jobs = release["jobs"]
    build = "\n".join(_steps(jobs["build"]))
    assert 'python3 tools/check_release_version.py "$GITHUB_REF_NAME"' in build
    assert build.index("check_release_version") < build.index("python -m build")
    assert "python3 build_zipapp.py" in build

    pypi = jobs["pypi"]
    assert pypi["needs"] == "build"
    assert pypi["permissions"] == {"id-token": "write"}
    assert any(step.startswith("pypa/gh-action-pypi-publish@") for step in _steps(pypi))
    assert "id-token" not in str(jobs["build"].get("permissions", {}))

    attach = "\n".join(_steps(jobs["github-release"]))
    assert "dist/spell.pyz" in attach and "dist/spell_runner.pyz" in attach
    assert jobs["github-release"]["permissions"] == {"contents": "write"}
    assert release["permissions"] == {"contents": "read"}
