#!/usr/bin/env python3
"""Overhead of a docker cast over a bare ``docker run`` of the same container.

Method: the runner image is built from this tree's ``spell_runner.pyz``
(tests/support/images.py, offline). A one-step docker spell
(``fixtures/spells/docker`` with its image rewritten) is installed in a fresh
temporary ``HOME``. Three commands are then timed as fresh processes, first
once to warm up and then ``--runs`` times in turn (round robin):

* ``docker run true``: the same hardened flags, image and mounts as spell
  uses, running ``true`` (the engine's own cost of a container);
* ``docker run runner``: the same ``docker run`` argument list spell builds,
  running ``spell-runner`` on the same plan (the container doing the same work);
* ``spell cast``: ``python3 spell.pyz cast fixtures/hello-docker --allow-unsigned``.

The argument list and the plan come from spell's own functions, so the bare
runs differ from the cast only by what spell does on the host: start-up,
guards, writing the plan, reading the result, cleaning up and the log.
Printed: median and 90th percentile wall time, and the ratio of each median
to the median of ``docker run runner`` (target for ``spell cast``: 1.5x).

    DOCKER_HOST=... python3 bench/docker.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TARGET = 1.5


def timed(cmd: list[str], env: dict) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(
            f"bench: {' '.join(cmd[:4])} ... failed: {proc.stderr.decode().strip()}"
        )
    return elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)

    from support import images

    import spell
    import spell_runner

    engine = images.engine_env()
    if not images.docker_available():
        sys.exit(
            "bench: no docker engine answers (bash tests/support/docker-engine.sh start)"
        )
    work = Path(tempfile.mkdtemp(prefix="spell-bench-docker-"))
    try:
        subprocess.run(
            [PY, str(ROOT / "build_zipapp.py"), "--out-dir", str(work / "dist")],
            check=True,
            capture_output=True,
        )
        pyz = work / "dist" / "spell.pyz"
        image = images.ensure_runner_image(
            work / "dist" / "spell_runner.pyz", latest=False
        )

        bundle = work / "bundle"
        shutil.copytree(ROOT / "fixtures/spells/docker", bundle)
        manifest_path = bundle / "spell.yaml"
        manifest_path.write_text(
            manifest_path.read_text().replace("spell-runner-test:latest", image)
        )
        home = work / "home"
        home.mkdir()
        env = {
            k: v
            for k, v in engine.items()
            if not k.startswith(("SPELL_", "CONNECTOR_"))
        }
        env.update(HOME=str(home), SPELL_HOME=str(home / ".spell"))
        subprocess.run(
            [PY, str(pyz), "install", str(bundle)],
            env=env,
            check=True,
            capture_output=True,
        )

        # The same argument list and plan as spell builds (see run_in_docker).
        os.environ.update(HOME=env["HOME"], SPELL_HOME=env["SPELL_HOME"])
        bundle_dir, manifest = spell.resolve_installed("fixtures/hello-docker", None)
        settings = spell.docker_settings({}, image)
        share = work / "share"
        share.mkdir(mode=0o755)
        share.chmod(0o755)
        plan = {
            "bundle_dir": spell.CONTAINER_BUNDLE,
            "workdir_copy_to": spell.CONTAINER_WORKDIR,
            "steps": manifest["steps"],
            "checks": manifest["checks"],
            "input": {},
            "input_path": f"{spell.CONTAINER_INPUT_DIR}/input.json",
            "env": {},
            "step_timeout_ms": spell.DEFAULT_STEP_TIMEOUT_MS,
            "execution_timeout_ms": None,
        }
        for name, value in (("input.json", {}), ("plan.json", plan)):
            (share / name).write_text(spell_runner.dumps_js(value))
            (share / name).chmod(0o644)

        def run_args(name: str) -> list[str]:
            return spell.docker_run_args(
                settings, bundle_dir, str(share), name, [], events=False
            )

        counter = iter(range(10**6))

        def runner_cmd() -> list[str]:
            return ["docker", *run_args(f"spell-bench-{os.getpid()}-{next(counter)}")]

        def true_cmd() -> list[str]:
            argv = runner_cmd()
            return argv[: argv.index("--") + 2] + ["true"]

        def cast_cmd() -> list[str]:
            return [PY, str(pyz), "cast", "fixtures/hello-docker", "--allow-unsigned"]

        commands = {
            "docker run true": true_cmd,
            "docker run runner": runner_cmd,
            "spell cast": cast_cmd,
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for make in commands.values():
            timed(make(), env)
        for _ in range(args.runs):
            for name, make in commands.items():
                samples[name].append(timed(make(), env))

        base = statistics.median(samples["docker run runner"])
        print(
            f"docker cast overhead, {args.runs} runs each, image {image}, "
            f"{os.cpu_count()} CPUs"
        )
        print(
            f"{'command':<18} {'median ms':>10} {'p90 ms':>8} {'ratio':>6} {'target':>7}"
        )
        for name, values in samples.items():
            median = statistics.median(values)
            verdict = ""
            if name == "spell cast":
                verdict = f"{TARGET:.1f}x " + (
                    "ok" if median / base <= TARGET else "MISSED"
                )
            print(
                f"{name:<18} {median * 1000:>10.1f} {percentile(values, 0.9) * 1000:>8.1f} "
                f"{median / base:>5.2f}x {verdict:>7}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
