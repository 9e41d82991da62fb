"""HTTP server over real localhost connections: API shape, validation, error bodies, OpenAPI, micro-batching,
503s, readiness, /api/explain; and `colbert-jax serve` as a subprocess (busy port, bad start-up, warm-up)."""

import asyncio
import functools
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn

import colbert_jax
from colbert_jax import server
from colbert_jax.server import MAX_QUERY_CHARS, create_app, uvicorn_config
from tests.conftest import COLLECTIONS

QUERIES = [line.split("\t")[1] for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines()[:64]]
# A request may wait for a search program to compile (seconds, more on a busy machine): no tight timeouts.
get = functools.partial(httpx.get, timeout=120)
post = functools.partial(httpx.post, timeout=120)


def start(app):
    """Runs `app` on a free loopback port in a thread; returns (server, thread, base url)."""
    srv = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    return srv, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def searcher(real_index, minilm_model):
    s = colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)
    s.search_all(QUERIES, k=100)  # compile the shapes these queries need
    return s


@pytest.fixture(scope="module")
def served(searcher):
    app = create_app(searcher, max_batch=64, max_wait_ms=25)
    srv, thread, url = start(app)
    yield url, app
    srv.should_exit = True
    thread.join(10)


async def gather_get(url, params_list):
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.get(f"{url}/api/search", params=p) for p in params_list))


def test_get_search_shape_and_values(served, searcher):
    url, _ = served
    r = get(f"{url}/api/search", params={"query": QUERIES[0]})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == QUERIES[0] and len(body["topk"]) == 10
    assert [h["rank"] for h in body["topk"]] == list(range(1, 11))
    assert sum(h["prob"] for h in body["topk"]) == pytest.approx(1.0)
    expected = searcher.search(QUERIES[0], k=100)[:10]  # the reference searches at k=100 and cuts
    assert [h["pid"] for h in body["topk"]] == [p for p, _, _ in expected]
    assert body["topk"][0]["text"] == searcher.passages([expected[0][0]])[0]
    top = body["topk"][0]["score"]
    total = sum(math.exp(h["score"] - top) for h in body["topk"])
    assert body["topk"][0]["prob"] == pytest.approx(1 / total)
    assert len(get(f"{url}/api/search", params={"query": QUERIES[1], "k": 3}).json()["topk"]) == 3


def test_concurrent_requests_are_batched(served, searcher):
    url, app = served
    before = app.state.batcher.batches
    responses = asyncio.run(gather_get(url, [{"query": q, "k": 5} for q in QUERIES]))
    assert all(r.status_code == 200 for r in responses)
    direct = searcher.search_all(QUERIES, k=100)
    for i, r in enumerate(responses):
        assert [h["pid"] for h in r.json()["topk"]] == [p for p, _, _ in direct[i][:5]]
    calls = app.state.batcher.batches - before
    assert calls < 32, f"64 concurrent requests took {calls} search calls"


def test_post_batch(served, searcher):
    url, _ = served
    r = post(f"{url}/api/search", json={"queries": QUERIES[:3], "k": 4})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [res["query"] for res in results] == QUERIES[:3] and all(len(res["topk"]) == 4 for res in results)
    direct = searcher.search_all(QUERIES[:3], k=100)
    assert [[h["pid"] for h in res["topk"]] for res in results] == [[p for p, _, _ in direct[i][:4]] for i in range(3)]


@pytest.mark.parametrize(
    "json_k,url_k", [(0, "0"), (101, "101"), (2.5, "2.5"), (2.0, "2.0"), (True, "true"), ("ten", "ten"), (None, "")]
)
def test_k_is_validated_alike_for_get_and_post(served, json_k, url_k):
    url, _ = served
    prefix = "k: must be an integer between 1 and 100, got "
    by_post = post(f"{url}/api/search", json={"queries": ["a query"], "k": json_k})
    assert by_post.status_code == 400 and by_post.json() == {"error": f"{prefix}{json_k!r}"}, by_post.text
    by_get = get(f"{url}/api/search", params={"query": "a query", "k": url_k})
    assert by_get.status_code == 400 and set(by_get.json()) == {"error"}, by_get.text
    assert by_get.json()["error"].startswith(prefix) and url_k in by_get.json()["error"]


@pytest.mark.parametrize(
    "params,message",
    [
        ({}, "missing query parameter 'query'"),
        ({"query": "   "}, "query: is empty"),
        ({"query": "x" * (MAX_QUERY_CHARS + 1)}, f"at most {MAX_QUERY_CHARS} are allowed"),
    ],
)
def test_bad_get_requests(served, params, message):
    url, _ = served
    r = get(f"{url}/api/search", params=params)
    assert r.status_code == 400 and message in r.json()["error"]


def test_long_query_within_the_limit_is_answered(served):
    url, _ = served
    query = ("how do I read a file line by line " * 40)[:MAX_QUERY_CHARS]
    r = get(f"{url}/api/search", params={"query": query, "k": 2})
    assert r.status_code == 200 and len(r.json()["topk"]) == 2  # longer than query_maxlen: truncated


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "the body must be JSON"),
        (b"[1]", "the body must be a JSON object"),
        (b'{"queries": "a string"}', "queries: Input should be a valid list"),
        (b'{"queries": []}', "queries: List should have at least 1 item"),
        (b'{"queries": ["a", 3]}', "queries.1: must be a string, got int"),
        (b'{"queries": ["a", " "]}', "queries.1: is empty"),
        (b'{"queries": ["a"], "topk": 3}', "topk: Extra inputs are not permitted"),
        (b'{"k": 3}', "missing field 'queries'"),
    ],
)
def test_bad_post_bodies(served, body, message):
    url, _ = served
    r = post(f"{url}/api/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_per_request_query_limit(served):
    url, _ = served
    r = post(f"{url}/api/search", json={"queries": ["a"] * 65})
    assert r.status_code == 400 and "at most 64 items" in r.json()["error"]


def test_every_error_has_one_shape(served):
    url, _ = served
    not_found = get(f"{url}/nowhere")
    assert not_found.status_code == 404 and not_found.json() == {
        "error": "no such path: /nowhere (the API is described at /docs)"
    }
    wrong_method = httpx.delete(f"{url}/api/search", timeout=120)
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error"}
    assert "DELETE" in wrong_method.json()["error"]
    bad = get(f"{url}/api/search", params={"query": "x", "k": "2.5"})
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    health = get(f"{url}/health").json()
    assert health["status"] == "ok" and health["passages"] == 2000


def test_an_internal_error_answers_500_in_the_same_shape(searcher):
    class Broken:
        """The real searcher, whose collection has become unreadable."""

        def __init__(self, inner):
            self.inner, self.index = inner, inner.index

        def passages(self, pids, collection=None):
            raise OSError("the disk went away")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    srv, thread, url = start(create_app(Broken(searcher)))
    try:
        r = get(f"{url}/api/search", params={"query": QUERIES[0]})
    finally:
        srv.should_exit = True
        thread.join(10)
    assert r.status_code == 500 and r.json() == {"error": "internal error: OSError: the disk went away"}


def test_openapi_describes_every_parameter_and_limit(served):
    url, _ = served
    schema = get(f"{url}/openapi.json").json()
    operation = schema["paths"]["/api/search"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert params["k"]["schema"]["minimum"] == 1 and params["k"]["schema"]["maximum"] == 100
    assert params["k"]["schema"]["default"] == 10 and params["k"]["schema"]["type"] == "integer"
    assert params["query"]["required"] and params["query"]["schema"]["maxLength"] == MAX_QUERY_CHARS
    components = schema["components"]["schemas"]
    request = components["SearchRequest"]
    assert request["properties"]["queries"]["maxItems"] == 64 and request["properties"]["queries"]["minItems"] == 1
    assert request["properties"]["queries"]["items"]["maxLength"] == MAX_QUERY_CHARS
    assert request["properties"]["k"]["maximum"] == 100 and request["additionalProperties"] is False
    assert set(components["Hit"]["properties"]) == {"text", "pid", "rank", "score", "prob"}
    assert set(components["Health"]["properties"]["status"]["enum"]) == {"warming", "ok"}
    explain = {p["name"] for p in schema["paths"]["/api/explain"]["get"]["parameters"]}
    assert explain == {"query", "pid"}
    for path in schema["paths"].values():
        for operation in path.values():
            assert "422" not in operation["responses"]  # validation errors answer 400 with ErrorBody
            for status in ("400", "503"):
                if status in operation["responses"]:
                    ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody")
    assert get(f"{url}/docs").status_code == 200


def test_explain_endpoint(served, searcher):
    url, _ = served
    pid = searcher.search(QUERIES[2], k=100)[0][0]
    r = get(f"{url}/api/explain", params={"query": QUERIES[2], "pid": pid})
    assert r.status_code == 200
    body = r.json()
    direct = searcher.explain(QUERIES[2], pid)
    assert len(body["matches"]) == len(direct) == searcher.config.query_maxlen
    assert [(m["query_token"], m["doc_token"], m["doc_position"]) for m in body["matches"]] == [
        (m.query_token, m.doc_token, m.doc_position) for m in direct
    ]
    assert body["score"] == pytest.approx(sum(m["score"] for m in body["matches"]))
    assert body["score"] == pytest.approx(searcher.search(QUERIES[2], k=100)[0][2], abs=1e-3)
    assert body["text"] == searcher.passages([pid])[0]
    # each matched token's span is its text (MiniLM's vocabulary is lowercase; "##" marks a word piece)
    spans = [(m["start"], m["end"], m["doc_token"]) for m in body["matches"] if m["start"] is not None]
    ascii_spans = [(s, e, t) for s, e, t in spans if body["text"][s:e].isascii() and t != "[UNK]"]
    assert ascii_spans and all(body["text"][s:e].lower() == t.removeprefix("##") for s, e, t in ascii_spans)
    missing = get(f"{url}/api/explain", params={"query": "x", "pid": 10**9})
    assert missing.status_code == 404 and missing.json() == {"error": f"pid {10**9} is not in the index"}
    bad = get(f"{url}/api/explain", params={"query": "x", "pid": "1.5"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("pid:")


def test_batches_use_only_the_warmed_up_sizes(searcher):
    """On the CPU path a request of 11 queries is searched as 8 + 1 + 1 + 1 with max_batch 16, with the
    same results as one call."""

    class Recording:
        def __init__(self, inner):
            self.inner, self.index, self.calls = inner, inner.index, []

        def search_all(self, queries, k, batch_size):
            self.calls.append((len(queries), batch_size))
            return self.inner.search_all(queries, k=k, batch_size=batch_size)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    assert searcher.implementation == "streamed"
    recording = Recording(searcher)
    assert server.batch_sizes(recording, 16) == [1, 8, 16]
    srv, thread, url = start(create_app(recording, max_batch=16))
    try:
        r = post(f"{url}/api/search", json={"queries": QUERIES[:11], "k": 5})
    finally:
        srv.should_exit = True
        thread.join(10)
    assert r.status_code == 200
    assert recording.calls == [(8, 8), (3, 1)]
    direct = searcher.search_all(QUERIES[:11], k=100)
    assert [[h["pid"] for h in res["topk"]] for res in r.json()["results"]] == [
        [p for p, _, _ in direct[i][:5]] for i in range(11)
    ]


def test_health_says_warming_then_ok_and_searches_wait(searcher, monkeypatch):
    gate = threading.Event()

    def steps(searcher, max_batch):  # a warm-up that holds the worker until the test lets it go
        yield
        gate.wait(60)
        yield

    monkeypatch.setattr(server, "warm_up_steps", steps)
    srv, thread, url = start(create_app(searcher, warm=True))
    try:
        health = get(f"{url}/health").json()
        assert health["status"] == "warming" and health["warm_up_s"] is None
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(get, f"{url}/api/search", params={"query": QUERIES[0]})
            time.sleep(0.5)
            assert not pending.done()  # waits for the warm-up step in progress
            gate.set()
            assert pending.result().status_code == 200
        for _ in range(100):
            health = get(f"{url}/health").json()
            if health["status"] == "ok":
                break
            time.sleep(0.1)
        assert health["status"] == "ok" and health["warm_up_s"] is not None and health["warm_up_error"] is None
    finally:
        gate.set()
        srv.should_exit = True
        thread.join(10)


def test_a_failing_warm_up_still_serves(searcher, monkeypatch):
    def steps(searcher, max_batch):
        yield
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(server, "warm_up_steps", steps)
    srv, thread, url = start(create_app(searcher, warm=True))
    try:
        for _ in range(100):
            health = get(f"{url}/health").json()
            if health["status"] == "ok":
                break
            time.sleep(0.1)
        assert health["warm_up_error"] == "RuntimeError: no compiler today"
        assert get(f"{url}/api/search", params={"query": QUERIES[0]}).status_code == 200
    finally:
        srv.should_exit = True
        thread.join(10)


def test_overload_answers_503_and_recovers(searcher):
    class Slow:
        """The real searcher, 0.3 s slower per call, so that requests pile up."""

        def __init__(self, inner):
            self.inner = inner
            self.index = inner.index

        def search_all(self, *args, **kwargs):
            time.sleep(0.3)
            return self.inner.search_all(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    app = create_app(Slow(searcher), max_batch=2, max_wait_ms=1, max_queue=2)
    srv, thread, url = start(app)
    try:
        responses = asyncio.run(gather_get(url, [{"query": q} for q in QUERIES[:30]]))
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        overloaded = [r for r in responses if r.status_code == 503]
        assert all(r.headers.get("retry-after") == "1" and set(r.json()) == {"error"} for r in overloaded)
        assert get(f"{url}/health").json()["status"] == "ok"
        assert get(f"{url}/api/search", params={"query": QUERIES[0]}).status_code == 200
    finally:
        srv.should_exit = True
        thread.join(10)


# -- `colbert-jax serve` as a subprocess ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny_model, small_collection):
    """A 300-passage index of the tiny model, with its own copy of the collection."""
    root = tmp_path_factory.mktemp("serve")
    collection = root / "collection.tsv"
    shutil.copyfile(small_collection, collection)
    path = colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(root / "index", collection)
    return path, collection


def test_warm_up_compiles_what_served_batches_need(tiny_index, tiny_model):
    """After the server's warm-up, batches of any size up to max_batch, of other queries, compile nothing."""
    from colbert_jax.search import plaid

    searcher = colbert_jax.Searcher(tiny_index[0], checkpoint=tiny_model, truncate=True)
    assert server.warm_up(searcher, max_batch=8) > 0
    batcher = server.MicroBatcher(searcher, max_batch=8)

    def programs():
        return (
            plaid.cells._cache_size(),
            plaid.search_streamed._cache_size(),
            plaid.search_fused._cache_size(),
            searcher.model._query_fn._cache_size(),
        )

    before = programs()
    rng = np.random.default_rng(0)
    batches = [[QUERIES[i] for i in rng.choice(len(QUERIES), size, replace=False)] for size in (1, 2, 3, 5, 8, 7, 4)]
    served = [batcher._search(batch, server.batch_sizes(searcher, 8)) for batch in batches]
    assert programs() == before
    for batch, results in zip(batches, served):  # and the results are those of one search_all call
        direct = searcher.search_all(batch, k=100)
        for i, result in enumerate(results):  # (other encoder batch shapes: equal up to float rounding)
            assert [pid for pid, _, _ in result[:10]] == [pid for pid, _, _ in direct[i][:10]]
            assert [s for _, _, s in result] == pytest.approx([s for _, _, s in direct[i]], abs=1e-4)


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "colbert_jax.cli", "serve", *args]


def test_serve_refuses_a_busy_port_before_loading_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The index does not exist: the port message proves the port was checked first.
        r = subprocess.run(
            serve_command("--index", str(tmp_path / "no_index"), "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2, r.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr and "serving" not in r.stderr


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--max-batch", "0", "must be from 1 up, got 0"),  # every GET answered 500 (ZeroDivisionError)
        ("--max-queue", "0", "must be from 1 up, got 0"),  # an unbounded queue: never 503
        ("--port", "70000", "must be from 0 to 65535, got 70000"),  # bound port 4464 (70000 mod 65536)
        ("--max-wait-ms", "-1", "must be from 0 up"),
        ("--request-timeout-s", "0", "must be above 0"),
        ("--max-batch", "2.5", "expected an integer, got '2.5'"),
    ],
)
def test_serve_flags_out_of_range_are_refused(tmp_path, flag, value, message, capsys):
    from colbert_jax import cli

    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["serve", "--index", str(tmp_path), flag, value])
    assert exit_.value.code == 2 and f"{flag}: {message}" in capsys.readouterr().err


def test_create_app_refuses_settings_that_cannot_serve(searcher):
    for bad in ({"max_batch": 0}, {"max_queue": 0}, {"max_body_bytes": True}, {"request_timeout_s": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_app(searcher, **bad)


@pytest.mark.parametrize(
    "option,message",
    [
        ("missing-collection", "--collection"),
        ("other-collection", "is not the collection"),
        ("missing-checkpoint", "config.json"),
    ],
)
def test_serve_refuses_to_start_without_texts_or_checkpoint(tiny_index, small_collection, tmp_path, option, message):
    """Exit 2 with a message, not a server answering 500: a collection that is not there or not the index's
    (the index's own texts are not used once --collection is given), a checkpoint that cannot be loaded."""
    index, _ = tiny_index
    other = tmp_path / "other.tsv"  # as many passages, other texts
    other.write_text("".join(f"{i}\tanother text {i}\n" for i in range(300)))
    (tmp_path / "empty").mkdir()
    extra = {
        "missing-collection": ["--collection", str(tmp_path / "gone.tsv")],
        "other-collection": ["--collection", str(other)],
        "missing-checkpoint": ["--checkpoint", str(tmp_path / "empty")],
    }[option]
    r = subprocess.run(
        serve_command("--index", str(index), "--port", "0", *extra), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("colbert-jax serve: error:") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "serving" not in r.stderr


def test_serve_opens_the_port_at_once_and_warms_up_behind_it(tiny_index, tmp_path):
    index, _ = tiny_index
    env = {**os.environ, "COLBERT_JAX_CACHE": str(tmp_path / "cache")}  # nothing compiled yet: a real warm-up
    proc = subprocess.Popen(
        serve_command("--index", str(index), "--port", "0", "--max-batch", "1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        url = None
        for _ in range(1200):  # bounded: 120 s to load the index and the model
            url = next((line.split(" at ")[1].split("/ ")[0] for line in lines if line.startswith("serving")), None)
            if url or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert url, "".join(lines)
        for _ in range(100):
            with_retry = _get(f"{url}/health")
            if with_retry is not None:
                break
            time.sleep(0.1)
        assert with_retry is not None and with_retry.json()["status"] == "warming"
        search = get(f"{url}/api/search", params={"query": "return the value", "k": 3}, timeout=300)
        assert search.status_code == 200, search.text + "".join(lines)
        assert len(search.json()["topk"]) == 3  # waited, was answered
        for _ in range(3000):  # bounded: 300 s
            health = get(f"{url}/health").json()
            if health["status"] == "ok":
                break
            time.sleep(0.1)
        assert health["status"] == "ok" and health["warm_up_error"] is None, health
        page = get(f"{url}/")
        assert page.status_code == 200 and "colbert-jax search" in page.text
        assert get(f"{url}/static/app.js").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert "Traceback" not in "".join(lines)


def _get(url: str) -> httpx.Response | None:
    try:
        return get(url, timeout=10)
    except httpx.TransportError:
        return None
