"""Benchmark of the Execution API on loopback (not a test).

Measures, against a real server on 127.0.0.1 with a private temporary store:

1. ``GET /api/buttons``: requests per second and p99 (keep-alive clients);
2. POST accept latency (p50/p99) while 8 slow executions run;
3. executions per second of ``fixtures/hello-host`` (8 at a time);
4. list latency with 100,000 executions in the index;
5. POST accept latency with 100,000 executions in history vs an empty history.

Every loop is bounded in count and in time.  Run: ``python bench/api.py``
(``--quick`` for a smaller run).  Prints one line per result.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import spell  # noqa: E402

SPELLS = ROOT / "fixtures" / "spells"
#: No single phase may run longer than this many seconds.
PHASE_LIMIT_S = 60.0


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


class Connection:
    """One keep-alive connection that sends JSON and returns (status, body)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data else {}
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def close(self):
        self.conn.close()


def registry(folder: Path) -> Path:
    def button(button_id, spell_id, defaults):
        return {
            "button_id": button_id,
            "spell_id": spell_id,
            "version": "1.0.0",
            "defaults": defaults,
            "allowed_roles": ["admin"],
            "required_confirmations": {"risk": False, "billing": False},
        }

    path = folder / "registry.json"
    path.write_text(
        json.dumps(
            {
                "version": "v1",
                "buttons": [
                    button("hello", "fixtures/hello-host", {"name": "bench"}),
                    button("slow", "fixtures/slow", {"ms": 4000}),
                ],
            }
        )
    )
    return path


def start(reg: Path, **options):
    settings = dict(
        registryPath=str(reg),
        quiet=True,
        maxConcurrentExecutions=64,
        rateLimitMaxRequests=10**9,
        logRetentionDays=0,
        logMaxFiles=0,
    )
    settings.update(options)
    return spell.start_execution_api_server(**settings)


def wait_all(port: int, ids, limit_s: float = PHASE_LIMIT_S) -> None:
    conn = Connection(port)
    give_up = time.monotonic() + limit_s
    pending = set(ids)
    try:
        while pending and time.monotonic() < give_up:
            for execution_id in list(pending):
                _, body = conn.call("GET", f"/api/spell-executions/{execution_id}")
                if body["execution"]["status"] not in spell.IN_FLIGHT_STATES:
                    pending.discard(execution_id)
            time.sleep(0.05)
    finally:
        conn.close()
    if pending:
        raise SystemExit(f"{len(pending)} executions did not finish in {limit_s}s")


def bench_buttons(port: int, total: int, clients: int) -> None:
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + PHASE_LIMIT_S

    def worker(count: int):
        conn = Connection(port)
        mine = []
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            status, _ = conn.call("GET", "/api/buttons")
            mine.append(time.perf_counter() - t0)
            assert status == 200
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [
        threading.Thread(target=worker, args=(total // clients,))
        for _ in range(clients)
    ]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    print(
        f"GET /api/buttons: {len(latencies) / elapsed:.0f} req/s over {len(latencies)} "
        f"requests, {clients} keep-alive clients; p50 {percentile(latencies, 50) * 1000:.2f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.2f} ms"
    )


def post_latencies(port: int, count: int, pause_s: float = 0.02) -> tuple[list, list]:
    conn = Connection(port)
    latencies, ids = [], []
    deadline = time.monotonic() + PHASE_LIMIT_S
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            status, body = conn.call(
                "POST",
                "/api/spell-executions",
                {"button_id": "hello", "actor_role": "admin", "dry_run": True},
            )
            latencies.append(time.perf_counter() - t0)
            assert status == 202, body
            ids.append(body["execution_id"])
            time.sleep(pause_s)
    finally:
        conn.close()
    return latencies, ids


def report_posts(label: str, latencies: list) -> None:
    print(
        f"POST accept {label}: p50 {percentile(latencies, 50) * 1000:.2f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.2f} ms over {len(latencies)} requests"
    )


def bench_post_under_load(port: int, count: int) -> None:
    conn = Connection(port)
    slow = [
        conn.call(
            "POST",
            "/api/spell-executions",
            {"button_id": "slow", "actor_role": "admin"},
        )[1]["execution_id"]
        for _ in range(8)
    ]
    conn.close()
    time.sleep(0.5)
    latencies, ids = post_latencies(port, count)
    report_posts("while 8 executions run", latencies)
    wait_all(port, slow + ids)


def bench_throughput(port: int, total: int, parallel: int = 8) -> None:
    conn = Connection(port)
    running: list[str] = []
    done = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + PHASE_LIMIT_S
    launched = 0
    while done < total and time.monotonic() < deadline:
        while launched < total and len(running) < parallel:
            status, body = conn.call(
                "POST",
                "/api/spell-executions",
                {"button_id": "hello", "actor_role": "admin"},
            )
            assert status == 202, body
            running.append(body["execution_id"])
            launched += 1
        for execution_id in list(running):
            _, body = conn.call("GET", f"/api/spell-executions/{execution_id}")
            status = body["execution"]["status"]
            if status not in spell.IN_FLIGHT_STATES:
                assert status == "succeeded", body
                running.remove(execution_id)
                done += 1
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    conn.close()
    print(
        f"executions of hello-host: {done / elapsed:.1f} per second "
        f"({done} casts, {parallel} at a time, {elapsed:.1f} s)"
    )


def fill_index(store: Path, rows: int) -> None:
    """Insert ``rows`` finished executions straight into the SQLite index."""
    db = sqlite3.connect(store / "logs" / "index.sqlite3")
    base = int(time.time() * 1000) - rows * 1000
    statuses = ("succeeded", "failed", "timeout")

    def row(i):
        created = time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime((base + i * 1000) / 1000)
        )
        return (
            f"exec_{base + i}_{i:08x}",
            "hello" if i % 2 else "slow",
            "fixtures/hello-host",
            "1.0.0",
            0,
            statuses[i % 3],
            f"tenant_{i % 10}",
            "admin",
            created + ".000Z",
            created + ".100Z",
            created + ".900Z",
            "completed",
        )

    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO executions (execution_id, button_id, spell_id, version, "
        "require_signature, status, tenant_id, actor_role, created_at, started_at, "
        "finished_at, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (row(i) for i in range(rows)),
    )
    db.execute("COMMIT")
    db.close()


def bench_list(port: int, count: int) -> None:
    conn = Connection(port)
    for query in (
        "",
        "?status=succeeded&limit=500",
        "?button_id=hello&tenant_id=tenant_3",
        "?status=queued",
    ):
        latencies = []
        for _ in range(count):
            t0 = time.perf_counter()
            status, body = conn.call("GET", f"/api/spell-executions{query}")
            latencies.append(time.perf_counter() - t0)
            assert status == 200
        print(
            f"GET /api/spell-executions{query or ' (limit 100)'} with 100,000 in the "
            f"index: p50 {percentile(latencies, 50) * 1000:.2f} ms, "
            f"p99 {percentile(latencies, 99) * 1000:.2f} ms "
            f"({len(body['executions'])} rows per answer)"
        )
    conn.close()


def install(*names: str) -> None:
    for name in names:
        code = spell.main(
            ["install", str(SPELLS / name)], stdout=io.StringIO(), stderr=io.StringIO()
        )
        assert code == 0, name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0
    history = 100_000
    with tempfile.TemporaryDirectory(prefix="spell-bench-") as tmp:
        folder = Path(tmp)
        os.environ["HOME"] = str(folder)
        os.environ["SPELL_HOME"] = str(folder / ".spell")
        for name in list(os.environ):
            if name.startswith(("SPELL_API_", "SPELL_RUNTIME_")):
                del os.environ[name]
        install("hello-host", "slow")
        reg = registry(folder)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, loopback only")

        server = start(reg)
        try:
            bench_buttons(server.port, int(4000 * scale), clients=4)
            latencies, ids = post_latencies(server.port, int(200 * scale))
            report_posts("with an empty history", latencies)
            wait_all(server.port, ids)
            bench_post_under_load(server.port, int(200 * scale))
            bench_throughput(server.port, int(100 * scale))
        finally:
            server.close()

        fill_index(folder / ".spell", history)
        server = start(reg)
        try:
            bench_list(server.port, int(200 * scale))
            latencies, ids = post_latencies(server.port, int(200 * scale))
            report_posts(f"with {history:,} executions in history", latencies)
            wait_all(server.port, ids)
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
