"""Execution API under hostile input: every bad request gets a 4xx JSON answer.

These talk raw HTTP over sockets to a real server on 127.0.0.1 and check
after each case that the server still answers ``/health``.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from api_helpers import (  # noqa: F401  (fixtures)
    Client,
    api_env,
    installed,
    parse_responses,
    raw_exchange,
    registry,
    server_factory,
    write_registry,
)
import spell

#: The request timeout the hostile server uses, so slow-client tests stay short.
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    """One server for the module (no casts needed), with a short request timeout."""
    folder = tmp_path_factory.mktemp("hostile")
    server = spell.start_execution_api_server(
        registryPath=str(write_registry(folder)),
        store=str(folder / "store"),
        quiet=True,
        request_timeout_s=TIMEOUT_S,
        rateLimitMaxRequests=10**6,
    )
    yield server
    server.close(cancel=True)


@pytest.fixture
def hostile(hostile_server):
    """The shared server; after each test it must still answer."""
    yield hostile_server
    assert Client(hostile_server).get("/api/health") == (200, {"ok": True})


def post_raw(body: bytes, extra: str = "", length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    head = (
        f"POST /api/spell-executions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {length}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


def answers(server, data: bytes, **kw) -> list[tuple[int, dict, bytes]]:
    got = parse_responses(raw_exchange(server.port, data, **kw))
    for status, headers, body in got:
        assert headers["content-type"] == "application/json; charset=utf-8", body
        assert b"<html" not in body.lower()
        value = json.loads(body)
        assert list(value)[:1] == ["ok"]
        if status >= 400:
            assert list(value) == ["ok", "error_code", "message"]
    return got


def only(server, data: bytes, **kw) -> tuple[int, dict]:
    got = answers(server, data, **kw)
    assert len(got) == 1, got
    return got[0][0], json.loads(got[0][2])


@pytest.mark.parametrize(
    "body,fragment",
    ids=[
        "open",
        "trailing",
        "two-values",
        "nan",
        "infinity",
        "bom-bytes",
        "bad-utf8",
        "deep-array",
        "deep-input",
        "deep-unclosed",
    ],
    argvalues=[
        (b"{", ""),
        (b'{"button_id": "hello"} trailing', "Extra data"),
        (b'{"button_id": "hello"}{}', "Extra data"),
        (b"NaN", "NaN"),
        (b'{"button_id": "hello", "input": {"x": Infinity}}', "Infinity"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"button_id": "\xc3"}', "UTF-8"),
        (b"[" * 10000 + b"]" * 10000, "deeper than"),
        (
            b'{"button_id":"hello","input":' + b'{"a":' * 10000 + b"1" + b"}" * 10001,
            "deeper than",
        ),
        (b'{"a":' * 10000, ""),
    ],
)
def test_bad_json_is_400(hostile, body, fragment):
    status, value = only(hostile, post_raw(body))
    assert status == 400 and value["error_code"] == "BAD_REQUEST"
    assert fragment in value["message"]


@pytest.mark.parametrize(
    "body,message",
    [
        ({"button_id": ["hello"]}, "button_id is required"),
        ({"button_id": "hello", "dry_run": "true"}, "dry_run must be boolean"),
        ({"button_id": "hello", "input": "x"}, "input must be an object"),
        ({"button_id": "hello", "confirmation": []}, "confirmation must be an object"),
        (
            {"button_id": "hello", "actor_role": {"a": 1}},
            "actor_role must be a non-empty string",
        ),
        (
            {"button_id": "hello", "\u0000": 1},
            "unsupported field in request body: \u0000",
        ),
        (
            {"button_id": "hello", "\ud800": 1},
            "unsupported field in request body: \ud800",
        ),
    ],
)
def test_wrong_types_are_400(hostile, body, message):
    status, value = only(hostile, post_raw(json.dumps(body).encode()))
    assert (status, value["message"]) == (400, message)


def test_ten_megabyte_body_is_413_and_the_connection_survives_for_the_answer(hostile):
    body = b'{"button_id":"' + b"x" * (10 * 1024 * 1024) + b'"}'
    status, value = only(hostile, post_raw(body))
    assert (status, value["error_code"]) == (413, "INPUT_TOO_LARGE")


def test_huge_declared_length_is_refused_without_reading(hostile):
    status, value = only(hostile, post_raw(b"{}", length=10**12))
    assert (status, value["error_code"]) == (413, "INPUT_TOO_LARGE")
    status, value = only(
        hostile, post_raw(b"", "Expect: 100-continue\r\n", length=10**6)
    )
    assert status == 413


def test_content_length_that_lies_upwards_times_out(hostile):
    started = time.monotonic()
    status, value = only(
        hostile, post_raw(b'{"button_id":"hello"}', length=1000), read_timeout=10
    )
    assert status in (400, 408) and value["ok"] is False
    assert time.monotonic() - started < TIMEOUT_S + 3


def test_content_length_that_lies_upwards_then_closes_is_400(hostile):
    status, value = only(
        hostile, post_raw(b'{"button_id":"hello"}', length=1000), shutdown_write=True
    )
    assert (status, value["message"]) == (400, "request body is incomplete")


def test_content_length_that_lies_downwards_leaves_garbage_that_gets_json(hostile):
    body = b'{"button_id":"hello","actor_role":"admin"}'
    head = (
        f"POST /api/spell-executions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: 5\r\n\r\n"
    ).encode()
    got = answers(hostile, head + body + b"\r\n\r\n", shutdown_write=True)
    assert [status for status, _, _ in got] == [400, 400]


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: 1e3\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip\r\n",
    ],
)
def test_unclear_framing_is_400_and_closes(hostile, headers):
    data = (
        f"POST /api/spell-executions HTTP/1.1\r\nHost: x\r\n{headers}\r\n{{}}"
    ).encode()
    data = data.replace(b"Host: x", b"Host: 127.0.0.1")
    status, value = only(hostile, data)
    assert status == 400 and value["error_code"] == "BAD_REQUEST"


def test_chunked_bodies(hostile):
    body = json.dumps({"button_id": "nope"}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = (
        b"POST /api/spell-executions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    assert only(hostile, head + chunked)[1]["error_code"] == "BUTTON_NOT_FOUND"
    assert only(hostile, head + b"zz\r\n{}\r\n0\r\n\r\n")[0] == 400
    big = b"10001\r\n" + b" " * 0x10001 + b"\r\n0\r\n\r\n"
    assert only(hostile, head + big)[0] == 413


@pytest.mark.parametrize(
    "data,status,code",
    ids=[
        "long-line",
        "long-header",
        "many-headers",
        "big-headers",
        "http09",
        "http2",
        "bad-version",
        "tls-hello",
        "no-colon",
    ],
    argvalues=[
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "URI_TOO_LONG"),
        (
            b"GET /api/health HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "HEADERS_TOO_LARGE",
        ),
        (
            b"GET /api/health HTTP/1.1\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(150))
            + b"\r\n",
            431,
            "HEADERS_TOO_LARGE",
        ),
        (
            b"GET /api/health HTTP/1.1\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(9))
            + b"\r\n",
            431,
            "HEADERS_TOO_LARGE",
        ),
        (b"GET /api/health\r\n\r\n", 400, "BAD_REQUEST"),
        (b"GET /api/health HTTP/2.0\r\n\r\n", 400, "BAD_REQUEST"),
        (b"GET /api/health FOO/1.1\r\n\r\n", 400, "BAD_REQUEST"),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (b"GET /api/health HTTP/1.1\r\nbad header line\r\n\r\n", 400, "BAD_REQUEST"),
    ],
)
def test_malformed_heads_get_json_errors(hostile, data, status, code):
    got = answers(hostile, data)
    assert got and (got[0][0], json.loads(got[0][2])["error_code"]) == (status, code)


@pytest.mark.parametrize(
    "target,status,code",
    [
        ("/api/spell-executions/%ff%fe", 400, "INVALID_EXECUTION_ID"),
        ("/api/spell-executions/..%2f..%2fetc", 400, "INVALID_EXECUTION_ID"),
        ("/api/spell-executions/%00", 400, "INVALID_EXECUTION_ID"),
        ("/api/spell-executions/" + "a" * 5000, 404, "EXECUTION_NOT_FOUND"),
        ("/api/spell-executions?status=%00", 400, "INVALID_QUERY"),
        ("/api/spell-executions?tenant_id=%ff", 400, "INVALID_QUERY"),
        ("/api/spell-executions?limit=%ff", 400, "INVALID_QUERY"),
        ("/api/spell-executions?status=\x7f", 400, "INVALID_QUERY"),
        ("/api/%2e%2e/%2e%2e/etc/passwd", 404, "NOT_FOUND"),
        ("http://evil.example/api/nope", 404, "NOT_FOUND"),
        ("*", 404, "NOT_FOUND"),
    ],
)
def test_odd_bytes_in_paths_and_queries(hostile, target, status, code):
    data = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    got, value = only(hostile, data.encode("latin-1"))
    assert (got, value["error_code"]) == (status, code)


def test_button_filter_with_odd_bytes_just_matches_nothing(hostile):
    data = (
        b"GET /api/spell-executions?button_id=%ff%00x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: close\r\n\r\n"
    )
    status, value = only(hostile, data)
    assert status == 200 and value["executions"] == []


@pytest.fixture
def locked(server_factory):
    server = server_factory(
        request_timeout_s=TIMEOUT_S, authKeys=["team_a:operator=tok-a"]
    )
    yield server
    assert Client(server).get("/api/health") == (200, {"ok": True})


@pytest.mark.parametrize(
    "header",
    ids=lambda h: h[:24].decode("latin-1"),
    argvalues=[
        b"Authorization: \r\n",
        b"Authorization: Bearer\r\n",
        b"Authorization: Bearer \r\n",
        b"Authorization: Bearer tok-a tok-a\r\n",
        b"Authorization: Bearer \xff\xfe\r\n",
        b"Authorization: Bearer tok-\x00a\r\n",
        b"Authorization: tok-a\r\n",
        b"Authorization: BEARER tok-a\r\n",
        b"X-Api-Key: \r\n",
        b"X-Api-Key: tok-b\r\n",
        b"Authorization: Bearer " + b"t" * 7000 + b"\r\n",
    ],
)
def test_authorization_variants_are_401(locked, header):
    data = (
        b"GET /api/buttons HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + header
        + b"Connection: close\r\n\r\n"
    )
    status, value = only(locked, data)
    assert status == 401 and value["error_code"] in ("AUTH_REQUIRED", "AUTH_INVALID")


def test_tenant_crossing_is_refused(locked):
    client = Client(locked, "tok-a")
    assert client.get("/api/spell-executions?tenant_id=team_b")[0] == 403
    assert client.get("/api/spell-executions?tenant_id=team_a%00")[0] == 400
    body = client.get("/api/spell-executions?tenant_id=%20team_a%20")[1]
    assert body["filters"]["tenant_id"] == "team_a"


def test_slow_client_is_cut_off_and_others_are_served(hostile):
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        assert Client(hostile).get("/api/health")[0] == 200
        closed = False
        while time.monotonic() - started < TIMEOUT_S + 3:
            try:
                sock.sendall(b"X-Drip: 1\r\n")
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed, "a dripping client kept its connection past the deadline"


def test_idle_keep_alive_connections_are_closed(hostile):
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - started < TIMEOUT_S + 2


def test_keep_alive_serves_several_requests(hostile):
    data = (
        b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 3
        + b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert [s for s, _, _ in answers(hostile, data)] == [200] * 4


def test_head_answers_without_a_body(hostile):
    raw = raw_exchange(
        hostile.port,
        b"HEAD /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: close\r\n\r\n",
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and rest == b""


def test_too_many_connections_get_a_json_503(server_factory):
    server = server_factory(max_connections=2, request_timeout_s=TIMEOUT_S)
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        status, value = only(server, b"GET /api/health HTTP/1.1\r\n\r\n")
        assert (status, value["error_code"]) == (503, "SERVER_BUSY")
    finally:
        for sock in held:
            sock.close()
    time.sleep(TIMEOUT_S + 0.5)
    assert Client(server).get("/api/health")[0] == 200


def test_parallel_garbage_never_yields_5xx(hostile):
    payloads = [
        b"\x00" * 100,
        b"GET / HTTP/1.1\r\n" * 50,
        b"POST /api/spell-executions " b"HTTP/1.1\r\nContent-Length: 3\r\n\r\n{{{",
        b"\r\n" * 1000,
        b"GET /api/buttons HTTP/1.1\r\nHost: 127.0.0.1\r\nX: \xff\r\n\r\n",
    ]
    results = []

    def hammer(data):
        for _ in range(5):
            results.extend(
                s
                for s, _, _ in parse_responses(
                    raw_exchange(hostile.port, data, shutdown_write=True)
                )
            )

    threads = [threading.Thread(target=hammer, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results and all(status < 500 for status in results)
