"""HTTP server over real localhost connections: API shape, micro-batching, 400s, 503s, staying up."""

import asyncio
import math
import threading
import time

import httpx
import pytest
import uvicorn

import colbert_jax
from colbert_jax.server import create_app
from tests.conftest import COLLECTIONS

QUERIES = [line.split("\t")[1] for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines()[:64]]


def start(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def searcher(real_index, minilm_model):
    s = colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)
    s.search_all(QUERIES, k=100)  # compile the shapes these queries need
    return s


@pytest.fixture(scope="module")
def served(searcher):
    app = create_app(searcher, max_batch=64, max_wait_ms=25)
    server, thread, url = start(app)
    yield url, app
    server.should_exit = True
    thread.join(10)


async def gather_get(url, params_list, timeout=120):
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*(client.get(f"{url}/api/search", params=p) for p in params_list))


def test_get_search_shape_and_values(served, searcher):
    url, _ = served
    r = httpx.get(f"{url}/api/search", params={"query": QUERIES[0]}, timeout=60)
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
    assert len(httpx.get(f"{url}/api/search", params={"query": QUERIES[1], "k": 3}).json()["topk"]) == 3


def test_concurrent_requests_are_batched(served, searcher):
    url, app = served
    before = app.state.batcher.batches
    responses = asyncio.run(gather_get(url, [{"query": q, "k": 5} for q in QUERIES]))
    assert all(r.status_code == 200 for r in responses)
    direct = searcher.search_all(QUERIES, k=100)
    for i, r in enumerate(responses):
        assert [h["pid"] for h in r.json()["topk"]] == [p for p, _, _ in direct[i][:5]]
    calls = app.state.batcher.batches - before
    assert calls < 16, f"64 concurrent requests took {calls} search calls"


def test_post_batch(served, searcher):
    url, _ = served
    r = httpx.post(f"{url}/api/search", json={"queries": QUERIES[:3], "k": 4}, timeout=60)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [res["query"] for res in results] == QUERIES[:3] and all(len(res["topk"]) == 4 for res in results)


@pytest.mark.parametrize(
    "params,message",
    [
        ({}, "missing query"),
        ({"query": "   "}, "empty"),
        ({"query": "x", "k": "0"}, "between 1 and 100"),
        ({"query": "x", "k": "101"}, "between 1 and 100"),
        ({"query": "x", "k": "ten"}, "must be an integer"),
    ],
)
def test_bad_get_requests(served, params, message):
    url, _ = served
    r = httpx.get(f"{url}/api/search", params=params)
    assert r.status_code == 400 and message in r.json()["error"]


def test_bad_post_requests_and_still_healthy(served):
    url, _ = served
    assert httpx.post(f"{url}/api/search", content=b"{not json").status_code == 400
    assert httpx.post(f"{url}/api/search", json={"queries": "a string"}).status_code == 400
    assert httpx.post(f"{url}/api/search", json={"queries": []}).status_code == 400
    assert httpx.post(f"{url}/api/search", json={"queries": ["a"] * 65}).status_code == 400
    assert httpx.post(f"{url}/api/search", json={"queries": ["a", 3]}).status_code == 400
    assert httpx.get(f"{url}/nowhere").status_code == 404
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["passages"] == 2000


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
    server, thread, url = start(app)
    try:
        responses = asyncio.run(gather_get(url, [{"query": q} for q in QUERIES[:30]]))
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert httpx.get(f"{url}/api/search", params={"query": QUERIES[0]}, timeout=60).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
