"""HTTP search server (FastAPI + uvicorn) with micro-batching.

API (colbert-ai's `server.py`, plus batches and health):
- `GET /api/search?query=TEXT&k=K`: k defaults to 10 and may be at most 100. Like colbert-ai, the search
  always runs with k=100's parameters and is cut to k. Response:
  `{"query": ..., "topk": [{"text", "pid", "rank", "score", "prob"}, ...]}`, prob = softmax of the scores
  returned.
- `POST /api/search` with `{"queries": [TEXT, ...], "k": K}`: `{"results": [<the GET response>, ...]}`.
- `GET /health`: status, index counts and batching statistics.

Concurrent requests wait in a bounded queue; one worker takes everything queued (up to `max_batch`
queries, waiting at most `max_wait_ms` for more) and answers it with one `search_all` call. A full queue
answers 503 at once instead of piling up work; bad parameters answer 400 with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from colbert_jax.search.searcher import QueryError, Searcher

__all__ = ["create_app", "serve", "warm_up", "MicroBatcher"]

SEARCH_K = 100
MAX_K = 100


class Overloaded(Exception):
    """The request queue is full."""


@dataclass
class MicroBatcher:
    """Merges concurrent queries into one `search_all` call (run in a worker thread)."""

    searcher: Searcher
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 256
    batches: int = 0
    queries: int = 0
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _task: asyncio.Task | None = field(default=None, repr=False)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1), repr=False)

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def search(self, queries: list[str]) -> list[list[tuple[int, int, float]]]:
        """Top SEARCH_K results of each query; raises Overloaded when the queue is full."""
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((queries, future))
        except asyncio.QueueFull:
            raise Overloaded from None
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0][0])
            deadline = loop.time() + self.max_wait_ms / 1000
            while size < self.max_batch:
                remaining = deadline - loop.time()
                try:
                    item = (
                        self._queue.get_nowait()
                        if remaining <= 0
                        else await asyncio.wait_for(self._queue.get(), remaining)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(item)
                size += len(item[0])
            texts = [q for queries, _ in batch for q in queries]
            try:
                ranking = await loop.run_in_executor(self._pool, self._search, texts)
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.queries += len(texts)
            offset = 0
            for queries, future in batch:
                if not future.done():
                    future.set_result([ranking[offset + i] for i in range(len(queries))])
                offset += len(queries)

    def _search(self, texts: list[str]):
        return self.searcher.search_all(texts, k=min(SEARCH_K, self.searcher.index.num_passages))


def _response(searcher: Searcher, query: str, results: list[tuple[int, int, float]], k: int) -> dict:
    results = results[:k]
    texts = searcher.passages([pid for pid, _, _ in results]) if results else []
    top = max((s for _, _, s in results), default=0.0)
    weights = [math.exp(s - top) for _, _, s in results]
    total = sum(weights) or 1.0
    return {
        "query": query,
        "topk": [
            {"text": text, "pid": pid, "rank": rank, "score": score, "prob": w / total}
            for (pid, rank, score), text, w in zip(results, texts, weights)
        ],
    }


def _parse_k(raw) -> int:
    if raw is None:
        return 10
    try:
        k = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"k must be an integer, got {raw!r}") from None
    if isinstance(raw, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {raw!r}")
    return k


def create_app(searcher: Searcher, *, max_batch: int = 64, max_wait_ms: float = 2.0, max_queue: int = 256):
    """The FastAPI application serving `searcher`."""
    batcher = MicroBatcher(searcher, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="colbert-jax", lifespan=lifespan)
    app.state.batcher = batcher
    started = time.time()

    def error(status: int, message: str) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def answer(queries: list[str], k: int):
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                return error(400, f"query {i} is empty or not a string")
        try:
            searcher._validate(queries)
            results = await batcher.search(queries)
        except Overloaded:
            return error(503, "server overloaded: too many queued requests, retry later")
        except QueryError as e:
            return error(400, str(e))
        return [_response(searcher, q, r, k) for q, r in zip(queries, results)]

    @app.get("/api/search")
    async def get_search(request: Request):
        query = request.query_params.get("query")
        if query is None:
            return error(400, "missing query parameter 'query'")
        try:
            k = _parse_k(request.query_params.get("k"))
        except ValueError as e:
            return error(400, str(e))
        out = await answer([query], k)
        return out if isinstance(out, JSONResponse) else out[0]

    @app.post("/api/search")
    async def post_search(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, 'the body must be JSON: {"queries": [...], "k": 10}')
        if not isinstance(body, dict) or not isinstance(body.get("queries"), list) or not body["queries"]:
            return error(400, "the body must be an object with a non-empty list 'queries'")
        if len(body["queries"]) > max_batch:
            return error(400, f"at most {max_batch} queries per request")
        try:
            k = _parse_k(body.get("k"))
        except ValueError as e:
            return error(400, str(e))
        out = await answer(body["queries"], k)
        return out if isinstance(out, JSONResponse) else {"results": out}

    @app.get("/health")
    async def health():
        index = searcher.index
        return {
            "status": "ok",
            "index": str(index.path),
            "passages": index.num_passages,
            "embeddings": index.num_embeddings,
            "batches": batcher.batches,
            "queries": batcher.queries,
            "queued": batcher.queued,
            "uptime_s": round(time.time() - started, 1),
        }

    return app


def warm_up(searcher: Searcher, max_batch: int = 64, seed: int = 0) -> float:
    """Compiles the programs a stream of micro-batches needs (every power-of-two batch size, with queries
    cut from the collection's passages), so the first requests do not wait for JIT compilation. Programs
    are also cached on disk, so a restarted server warms up in about a second. Returns the seconds spent."""
    import numpy as np

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = searcher.index.num_passages
    try:
        texts = searcher.passages(searcher.index.pids[rng.choice(n, min(n, 2 * max_batch), replace=False)])
    except (FileNotFoundError, ValueError):
        texts = ["what is the answer"] * (2 * max_batch)
    queries = [" ".join(t.split()[:8]) or "query" for t in texts]
    searcher.warm_up(queries, k=min(SEARCH_K, n), max_batch=max_batch)
    return time.perf_counter() - t0


def serve(searcher: Searcher, *, host: str = "127.0.0.1", port: int = 8893, **kwargs) -> None:
    """Runs the server until interrupted (loopback unless `host` says otherwise)."""
    import uvicorn

    uvicorn.run(create_app(searcher, **kwargs), host=host, port=port, log_level="info")
