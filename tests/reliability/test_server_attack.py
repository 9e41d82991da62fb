"""The server under attack, on loopback: its OpenAPI schema fuzzed by schemathesis (no 5xx for any input),
oversized bodies (413), huge queries, bad k, unknown pids and broken JSON (4xx with a message), a time limit
per request, bearer API keys, and no unauthenticated serving beyond loopback."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings

import colbert_jax
from colbert_jax.cli import main
from colbert_jax.server import check_exposure, create_app, uvicorn_config

KEY = "s3cret-key"


def start(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Runs `app` on a free loopback port in a thread."""
    srv = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:  # bounded by the test's own timeout; start-up takes well under a second
        time.sleep(0.02)
    return srv, thread, f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, tiny_model, small_collection):
    root = tmp_path_factory.mktemp("attack")
    coll = root / "c.tsv"
    coll.write_text("\n".join(small_collection.read_text().splitlines()[:100]) + "\n")
    path = colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(root / "index", coll)
    return colbert_jax.Searcher(path, checkpoint=tiny_model, truncate=True)


@pytest.fixture(scope="module")
def served(searcher):
    servers = []

    def run(**options) -> str:
        srv, thread, url = start(create_app(searcher, max_batch=8, max_wait_ms=1, **options))
        servers.append((srv, thread))
        return url

    yield run
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def open_api(served):
    return schemathesis.openapi.from_url(served(max_body_bytes=64 << 10) + "/openapi.json")


def test_no_input_gets_a_server_error(open_api):
    """Every operation of the OpenAPI schema, fuzzed (valid and invalid parameters and bodies)."""
    from hypothesis import given
    from schemathesis.checks import not_a_server_error

    operations = [result.ok() for result in open_api.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/search", "/api/explain", "/health"}
    for operation in operations:

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(timeout=60)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:  # every error says what is wrong, in the documented shape
                assert isinstance(response.json()["error"], str) and response.json()["error"]

        fuzz()


def test_hostile_requests_get_a_4xx_with_a_message(served):
    url = served(max_body_bytes=64 << 10)
    with httpx.Client(base_url=url, timeout=60) as c:
        big = c.post("/api/search", content=b'{"queries": ["' + b"a" * (70 << 10) + b'"]}')
        assert big.status_code == 413 and "over 65,536 bytes" in big.json()["error"], big.text
        chunked = c.post("/api/search", content=(b"x" * 8192 for _ in range(10)))  # no Content-Length
        assert chunked.status_code == 413
        long = c.get("/api/search", params={"query": "word " * 12_000})  # 60,000: httpx's longest URL query
        assert long.status_code == 400 and "characters" in long.json()["error"]
    with httpx.Client(base_url=served(), timeout=60) as c:  # the default body limit, 1 MiB
        long = c.post("/api/search", json={"queries": ["word " * 20_000]})  # 100,000 characters
        assert long.status_code == 400 and "characters" in long.json()["error"]
    with httpx.Client(base_url=url, timeout=60) as c:
        for k in ("0", "101", "-1", "2.5", "true", "1e3"):
            bad = c.get("/api/search", params={"query": "q", "k": k})
            assert bad.status_code == 400 and bad.json()["error"], k
        unknown = c.get("/api/explain", params={"query": "q", "pid": 10**9})
        assert unknown.status_code in (400, 404) and "10000000" in unknown.json()["error"]
        for body in (b"{", b"[]", b'{"queries": "a"}', b'{"queries": [1]}', b"\xff\xfe", b'{"queries": ["\\ud800"]}'):
            bad = c.post("/api/search", content=body, headers={"content-type": "application/json"})
            assert 400 <= bad.status_code < 500 and bad.json()["error"], body
        assert c.get("/api/search", params={"query": "what is a file", "k": 3}).status_code == 200


def test_a_long_url_gets_the_servers_own_400_however_tcp_splits_it(served):
    """A request line that arrives in several reads (a loaded machine, a slow client) is parsed whole: the
    app answers its JSON error, not uvicorn's bare "Invalid HTTP request received." (h11's 16 KiB default)."""
    host, port = served().removeprefix("http://").split(":")
    request = b"GET /api/search?query=" + b"word+" * 12_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for pieces in (1, 4):
        with socket.create_connection((host, int(port)), timeout=60) as conn:
            step = -(-len(request) // pieces)
            for start in range(0, len(request), step):
                conn.sendall(request[start : start + step])
                time.sleep(0.2)  # each piece its own read on the server
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, (pieces, answer[:300])
        assert "characters" in json.loads(body)["error"], pieces


def test_a_request_over_its_time_limit_gets_503(served):
    url = served(request_timeout_s=1e-6)  # no search answers within a microsecond
    response = httpx.get(f"{url}/api/search", params={"query": "read a file"}, timeout=60)
    assert response.status_code == 503 and "retry later" in response.json()["error"]
    assert response.headers["retry-after"] == "1"


def test_api_key(served):
    url = served(api_key=KEY)
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/api/search", params={"query": "q"}).status_code == 401
        wrong = c.get("/api/search", params={"query": "q"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = c.get("/api/search", params={"query": "q"}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # readiness probes need no key


def test_no_unauthenticated_serving_beyond_loopback(capsys, monkeypatch):
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None, False)
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="--api-key KEY or COLBERT_JAX_API_KEY"):
            check_exposure(host, None, False)
        check_exposure(host, KEY, False)
        check_exposure(host, None, True)
    monkeypatch.delenv("COLBERT_JAX_API_KEY", raising=False)
    # Refused before anything is loaded (the index does not exist).
    assert main(["serve", "--index", "/nonexistent", "--host", "0.0.0.0"]) == 2
    assert "reachable from other machines" in capsys.readouterr().err
