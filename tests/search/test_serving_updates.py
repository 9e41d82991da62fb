"""The server with living indexes: `pids` filters on GET and POST, and updates committed while requests
flow are picked up between batches without a failed request. Real text, tiny model."""

import functools
import threading
import time

import httpx
import pytest

import colbert_jax
from colbert_jax.server import create_app
from tests.test_server import start

get = functools.partial(httpx.get, timeout=120)
post = functools.partial(httpx.post, timeout=120)
QUERY = "read a file line by line"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, small_collection):
    path = tmp_path_factory.mktemp("serve") / "idx"
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, small_collection)
    searcher = colbert_jax.Searcher(path, tiny_model)
    srv, thread, url = start(create_app(searcher, max_batch=8, max_wait_ms=5))
    yield url, searcher, path
    srv.should_exit = True
    thread.join(10)


def test_pids_filter(served):
    url, searcher, _ = served
    allowed = searcher.index.pids[10:200:3].tolist()
    expected = searcher.search(QUERY, k=100, pids=allowed)[:5]
    r = get(f"{url}/api/search", params={"query": QUERY, "k": 5, "pids": ",".join(map(str, allowed))})
    assert r.status_code == 200, r.text
    assert [h["pid"] for h in r.json()["topk"]] == [p for p, _, _ in expected]
    r = post(f"{url}/api/search", json={"queries": [QUERY, "socket"], "k": 3, "pids": allowed[:4]})
    assert r.status_code == 200, r.text
    for hits in r.json()["results"]:
        assert {h["pid"] for h in hits["topk"]} <= set(allowed[:4]) and len(hits["topk"]) == 3
    r = get(f"{url}/api/search", params={"query": QUERY, "pids": "1,x"})
    assert r.status_code == 400 and "comma-separated integers" in r.json()["error"]
    r = get(f"{url}/api/search", params={"query": QUERY, "pids": " , "})  # answered with no results before
    assert r.status_code == 400 and "no pids given" in r.json()["error"]
    for bad in ([], [True], [1.0], ["3"]):  # True searched pid 1, "3" pid 3: only integers are pids, as for k
        r = post(f"{url}/api/search", json={"queries": [QUERY], "pids": bad})
        assert r.status_code == 400 and r.json()["error"].startswith("pids"), (bad, r.text)
    r = post(f"{url}/api/search", json={"queries": [QUERY], "pids": [1, 123456]})
    assert r.status_code == 400 and "pid 123456 is not in the index" in r.json()["error"]


def test_updates_are_served_without_failed_requests(served, tiny_model):
    url, searcher, path = served
    top = get(f"{url}/api/search", params={"query": QUERY, "k": 3}).json()["topk"]
    statuses, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            statuses.append(get(f"{url}/api/search", params={"query": QUERY, "k": 3}).status_code)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        new = int(colbert_jax.Indexer(tiny_model).add(path, [top[0]["text"]])[0])  # a copy of the best passage
        colbert_jax.Indexer().delete(path, [top[1]["pid"]])
        colbert_jax.Indexer().compact(path)
        deadline = time.time() + 120
        while time.time() < deadline:
            hits = get(f"{url}/api/search", params={"query": QUERY, "k": 3}).json()["topk"]
            if new in [h["pid"] for h in hits]:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(120)
    assert {top[0]["pid"], new} == {h["pid"] for h in hits[:2]} and top[1]["pid"] not in [h["pid"] for h in hits]
    assert hits[[h["pid"] for h in hits].index(new)]["text"] == top[0]["text"]
    assert len(statuses) > 0 and set(statuses) == {200}
    assert searcher.version == 3


def test_an_update_committed_before_the_first_request_is_served(tmp_path, tiny_model, small_collection):
    """The first request's check asks the index too (it once only noted metadata.json's state, so an update
    committed between the searcher opening the index and the first request was never served)."""
    path = tmp_path / "idx"
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, small_collection)
    searcher = colbert_jax.Searcher(path, tiny_model)
    top = [p for p, _, _ in searcher.search(QUERY, k=3)]
    srv, thread, url = start(create_app(searcher, max_batch=8, max_wait_ms=5))
    try:
        colbert_jax.Indexer().delete(path, [top[0]])
        hits = get(f"{url}/api/search", params={"query": QUERY, "k": 3}).json()["topk"]
        assert [h["pid"] for h in hits][:2] == top[1:] and searcher.version == 1
    finally:
        srv.should_exit = True
        thread.join(10)


def test_updates_that_overtake_a_search_are_retried_and_explain_serves_the_newest(
    tmp_path, tiny_model, small_collection, monkeypatch
):
    """A compaction and the update after it committed while the worker searched: the version it had read
    lost its passage texts, and the request answered 500 (IndexChangedError). It is searched again on the new
    version. And explain, which never reloaded, answered 404 for a pid added since the last search."""
    path = tmp_path / "idx"
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, small_collection)
    searcher = colbert_jax.Searcher(path, tiny_model)
    srv, thread, url = start(create_app(searcher, max_batch=8, max_wait_ms=5))
    try:
        indexer = colbert_jax.Indexer(tiny_model, show_progress=False)
        indexer.add(path, ["a passage added before the race"])
        assert get(f"{url}/api/search", params={"query": QUERY, "k": 3}).status_code == 200
        search_all, raced = searcher.search_all, []

        def overtaken(*args, **kwargs):
            out = search_all(*args, **kwargs)
            if not raced:  # another process updates the index while this search runs
                raced.append(searcher.version)
                indexer.compact(path)  # retires the files of the version being searched
                indexer.delete(path, [0])  # removes them
            return out

        monkeypatch.setattr(searcher, "search_all", overtaken)
        r = get(f"{url}/api/search", params={"query": QUERY, "k": 3})
        assert r.status_code == 200, r.text
        assert searcher.version == raced[0] + 2 and 0 not in [h["pid"] for h in r.json()["topk"]]
        (new,) = indexer.add(path, ["reading a file line by line with a context manager"])
        r = get(f"{url}/api/explain", params={"query": QUERY, "pid": int(new)})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == "reading a file line by line with a context manager"
    finally:
        srv.should_exit = True
        thread.join(10)
