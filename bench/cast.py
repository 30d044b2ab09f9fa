#!/usr/bin/env python3
"""Start-up and cast overhead of ``spell.pyz``, as ratios to a bare interpreter.

Method: every command runs as a fresh process (``subprocess.run``, output
captured), first once to warm the page cache, then ``--runs`` times in turn
(round robin, so a slow moment of the machine is shared out). For each, the
median and the 90th percentile of the wall time are printed, with the median
as a ratio to the median of ``python3 -c pass``. The store is a fresh
temporary ``HOME`` with ``fixtures/spells/hello-host`` installed; casts use
``--allow-unsigned -p name=bench``.

    python3 bench/cast.py [--runs 20] [--pyz PATH] [--importtime]

``--pyz`` measures a given zipapp instead of building one from this tree.
``--importtime`` adds the imports that cost most (``python3 -X importtime``,
cumulative microseconds) for ``--help`` and for ``cast --dry-run``.

Targets: ``--help`` at most 1.3x, ``cast --dry-run`` at most 2.5x.
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
TARGETS = {"--help": 1.3, "cast --dry-run": 2.5}


def build_pyz(out_dir: Path) -> Path:
    subprocess.run(
        [PY, str(ROOT / "build_zipapp.py"), "--out-dir", str(out_dir)],
        check=True,
        capture_output=True,
    )
    return out_dir / "spell.pyz"


def bench_env(home: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPELL_", "CONNECTOR_"))
    }
    env.update(HOME=str(home), SPELL_HOME=str(home / ".spell"))
    return env


def timed(cmd: list[str], env: dict) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd[1:])} failed: {proc.stderr.decode().strip()}")
    return elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def import_costs(cmd: list[str], env: dict, top: int = 14, rounds: int = 7) -> list:
    """The costliest imports up to depth 1 (``spell`` and what it imports).

    ``-X importtime`` of ``rounds`` runs; each module's smallest cumulative
    time in microseconds, so a busy moment of the machine does not count.
    """
    best: dict[str, int] = {}
    for _ in range(rounds):
        proc = subprocess.run(
            [PY, "-X", "importtime", *cmd[1:]],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:"):
                continue
            parts = line[len("import time:") :].split("|")
            if len(parts) != 3 or not parts[1].strip().isdigit():
                continue  # the header line
            name = parts[2]
            depth = (len(name) - len(name.lstrip()) - 1) // 2
            if depth <= 1:
                key = "  " * depth + name.strip()
                best[key] = min(best.get(key, 1 << 62), int(parts[1]))
    return sorted(((us, name) for name, us in best.items()), reverse=True)[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--pyz", type=Path, help="zipapp to measure (default: build one)"
    )
    parser.add_argument(
        "--importtime", action="store_true", help="also show the costliest imports"
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="spell-bench-"))
    try:
        pyz = args.pyz.resolve() if args.pyz else build_pyz(work / "dist")
        home = work / "home"
        home.mkdir()
        env = bench_env(home)
        subprocess.run(
            [PY, str(pyz), "install", str(ROOT / "fixtures/spells/hello-host")],
            env=env,
            check=True,
            capture_output=True,
        )
        cast = [
            PY,
            str(pyz),
            "cast",
            "fixtures/hello-host",
            "--allow-unsigned",
            "-p",
            "name=bench",
        ]
        commands = {
            "python3 -c pass": [PY, "-c", "pass"],
            "--help": [PY, str(pyz), "--help"],
            "cast --dry-run": cast + ["--dry-run"],
            "cast (hello-host)": cast,
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for cmd in commands.values():
            timed(cmd, env)  # warm-up
        for _ in range(args.runs):
            for name, cmd in commands.items():
                samples[name].append(timed(cmd, env))

        base = statistics.median(samples["python3 -c pass"])
        print(
            f"spell.pyz start-up and cast, {args.runs} runs each, "
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
        )
        print(
            f"{'command':<20} {'median ms':>10} {'p90 ms':>8} {'ratio':>6} {'target':>7}"
        )
        for name, values in samples.items():
            median = statistics.median(values)
            target = TARGETS.get(name)
            verdict = (
                ""
                if target is None
                else (
                    f"{target:.1f}x " + ("ok" if median / base <= target else "MISSED")
                )
            )
            print(
                f"{name:<20} {median * 1000:>10.1f} {percentile(values, 0.9) * 1000:>8.1f} "
                f"{median / base:>5.2f}x {verdict:>7}"
            )
        if args.importtime:
            for name in ("--help", "cast --dry-run"):
                print(f"\ncostliest top-level imports for {name} (cumulative ms):")
                for micros, module in import_costs(commands[name], env):
                    print(f"  {micros / 1000:>7.1f}  {module}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
