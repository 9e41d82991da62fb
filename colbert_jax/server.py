"""HTTP search server (FastAPI + uvicorn): colbert-ai's API, micro-batching, readiness and a search page.

API (every request and response model is in the OpenAPI schema: `/openapi.json`, browsable at `/docs`):
- `GET /api/search?query=TEXT&k=K` (colbert-ai's `server.py`): k an integer in 1..100, default 10. Like
  colbert-ai, the search always runs with k=100's parameters and is cut to k. Response:
  `{"query": ..., "topk": [{"text", "pid", "rank", "score", "prob"}, ...]}`, prob = softmax of the scores
  returned.
- `POST /api/search` with `{"queries": [TEXT, ...], "k": K}` (at most `max_batch` queries):
  `{"results": [<the GET response>, ...]}`. Same validation as GET: booleans and floats are not integers.
- `GET /api/explain?query=TEXT&pid=PID`: which passage token each query token matched (MaxSim), with
  the score and the token's character span in the text.
- `GET /health`: `status` is "warming" until the warm-up has compiled the search programs, then "ok".
- `GET /`: a search page (`colbert_jax/web/`), served by this process: no build step, no CDN.

A query string has at most `MAX_QUERY_CHARS` characters. Every error answers `{"error": "..."}`: 400 for a
bad parameter or body, 404 for an unknown pid or path, 405 for a wrong method, 503 (with Retry-After) when
the request queue is full.

Readiness: the port opens before the warm-up, which runs in the search worker between requests; a search
that arrives meanwhile waits for at most the current warm-up step and then compiles what it needs itself.
Compiled programs are cached on disk (`colbert_jax.runtime`), so a restart loads instead of compiling.

Several processes (hosts; `colbert_jax.distributed`): the index is split over all their devices. Process 0
serves HTTP; before each step that touches the index (a batch, a warm-up step) it announces the step
(`Followers`), and the other processes, in `follow`, take it with it; its "stop", on shutdown, ends them.
Filtered search (pids) and explain read passages from every shard: they answer 501 there. When the index
is updated, process 0 notices and every process moves to the new version at the same step.
"""

# No `from __future__ import annotations`: FastAPI reads endpoint annotations as objects, and the POST body
# model is made per application (its list limit is that server's max_batch).
import asyncio
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException

from colbert_jax.index import IndexChangedError
from colbert_jax.search.searcher import QueryError, Searcher

__all__ = [
    "create_app",
    "serve",
    "bind",
    "check_exposure",
    "warm_up",
    "MicroBatcher",
    "Followers",
    "follow",
    "MAX_K",
    "MAX_QUERY_CHARS",
]

SEARCH_K = 100
MAX_K = 100
DEFAULT_K = 10
MAX_QUERY_CHARS = 1000  # query_maxlen is 32 tokens; 1,000 characters leave room for any real query
MAX_BODY_BYTES = 1 << 20  # a POST of max_batch queries of MAX_QUERY_CHARS is ~64 kB (~256 kB as \u escapes)
# The request line and headers uvicorn's h11 parser buffers before it gives up with a bare text 400. Its own
# default (16 KiB) applies only when a request arrives in several reads, so a long URL got our JSON error or
# that text depending on how TCP split it; this admits any URL httpx sends (64 KiB) to the app's own checks.
MAX_HEAD_BYTES = 128 << 10
REQUEST_TIMEOUT_S = 60.0
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
WEB = Path(__file__).parent / "web"
log = logging.getLogger("colbert_jax.server")


# -- request and response models ----------------------------------------------------------------------
def _check_k(value: object) -> int:
    """k from JSON (an int) or a URL (digits); booleans, floats and out-of-range values are refused alike."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,6}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise ValueError(f"must be an integer between 1 and {MAX_K}, got {value!r}")
    return value


def _check_query(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("is empty")
    if len(value) > MAX_QUERY_CHARS:
        raise ValueError(f"has {len(value)} characters; at most {MAX_QUERY_CHARS} are allowed")
    return value


K_DOC = f"results to return: an integer from 1 to {MAX_K}"
QUERY_DOC = f"query text, at most {MAX_QUERY_CHARS} characters (longer than query_maxlen tokens: truncated)"
# Field before the validator: pydantic then states the range in the schema (minimum/maximum); the validator
# still runs first, so every bad k gets the same message.
KValue = Annotated[int, Field(ge=1, le=MAX_K, description=K_DOC), BeforeValidator(_check_k)]
QueryText = Annotated[
    str, Field(min_length=1, max_length=MAX_QUERY_CHARS, description=QUERY_DOC), BeforeValidator(_check_query)
]


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="what was wrong, in words")


class Hit(BaseModel):
    text: str = Field(description="the passage text")
    pid: int = Field(description="the passage id in the collection")
    rank: int = Field(description="1 for the best")
    score: float = Field(description="ColBERT (MaxSim) score")
    prob: float = Field(description="softmax of the returned scores")


class SearchResponse(BaseModel):
    query: str
    topk: list[Hit]


class BatchResponse(BaseModel):
    results: list[SearchResponse] = Field(description="one response per query, in request order")


class TokenMatch(BaseModel):
    query_position: int = Field(description="position in the query's tokens ([CLS] [Q] ... [SEP] [MASK]...)")
    query_token: str
    doc_token: str = Field(description="the passage token with the highest similarity")
    doc_position: int = Field(description="its position in the passage's tokens ([CLS] [D] ... [SEP])")
    score: float = Field(description="the similarity; the scores sum to the passage's score")
    start: int | None = Field(description="character span of doc_token in the text (None: a special token)")
    end: int | None


class ExplainResponse(BaseModel):
    query: str
    pid: int
    score: float = Field(description="the passage's MaxSim score: the sum of the matches' scores")
    text: str
    matches: list[TokenMatch] = Field(description="one per query token, in query order")


class Health(BaseModel):
    status: Literal["warming", "ok"] = Field(description="'warming' while search programs compile, then 'ok'")
    index: str
    passages: int
    embeddings: int
    batches: int = Field(description="search calls made")
    queries: int = Field(description="queries answered")
    queued: int = Field(description="requests waiting")
    uptime_s: float
    warm_up_s: float | None = Field(description="how long the warm-up took (None while warming)")
    warm_up_error: str | None = Field(description="why the warm-up stopped early, if it did")


def _request_model(max_queries: int) -> type[BaseModel]:
    class SearchRequest(BaseModel):
        """A batch of queries, searched together."""

        model_config = ConfigDict(extra="forbid")
        queries: list[QueryText] = Field(
            min_length=1, max_length=max_queries, description=f"1 to {max_queries} queries"
        )
        k: KValue = DEFAULT_K
        pids: list[StrictInt] | None = Field(
            None, min_length=1, description="search only these passages (pids), for every query"
        )

    return SearchRequest


# -- micro-batching and warm-up -------------------------------------------------------------------------
class Overloaded(Exception):
    """The request queue is full."""


def batch_sizes(searcher: Searcher, max_batch: int) -> list[int]:
    """The batch sizes the server searches with. On the streamed CPU path queries are retrieved one at a
    time, so batching only serves the encoder; three sizes then compile 3/7 of the programs that every power
    of two would (each ~1.5 s per IVF-entry bucket). Elsewhere every power of two, for less padding."""
    if searcher.implementation == "streamed":
        return sorted({s for s in (1, 8, max_batch) if s <= max_batch})
    return sorted({min(1 << i, max_batch) for i in range(max(1, max_batch).bit_length() + 1)})


def _sample_queries(searcher: Searcher, count: int, seed: int = 0) -> list[str]:
    """`count` queries cut from the collection's passages for the warm-up: their first tokens, from all that
    query_maxlen allows (none truncated) down to 2, as queries of every length come."""
    import numpy as np

    n = searcher.index.num_passages
    pick = np.random.default_rng(seed).choice(n, count, replace=n < count)
    try:
        texts = searcher.passages(searcher.index.pids[pick])
    except (FileNotFoundError, ValueError, KeyError):
        texts = ["what is the answer to this question"] * count
    tokenizer = searcher.model.hf_tokenizer
    room = searcher.config.query_maxlen - 3  # [CLS], the [Q] marker and [SEP]
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    return [tokenizer.decode(x[: max(2, room >> (i % 4))]).strip() or "query" for i, x in enumerate(ids)]


def warm_up_steps(searcher: Searcher, max_batch: int = 64) -> Iterator[None]:
    """Compiles, one step per `next()`, what the server's searches need: each of `batch_sizes`, and on the
    streamed path each IVF-entry bucket from half to twice what sample queries need, capped by what the
    index can produce (as `Searcher.warm_up` does, for the server's sizes only). Batch size 1 comes first."""
    sizes = batch_sizes(searcher, max_batch)
    queries = _sample_queries(searcher, 2 * max(sizes))
    k = min(SEARCH_K, searcher.index.num_passages)
    yield
    buckets: list[int] = []
    for i, size in enumerate(sizes):
        searcher.search_all([queries[j % len(queries)] for j in range(size)], k=k, batch_size=size)
        yield
        if i == 0 and searcher.implementation == "streamed":  # after batch size 1: first requests need it
            engine, params = searcher._plaid_engine(), searcher._params(k, searcher.config)
            lq = searcher.config.query_maxlen
            m = max(sizes)  # in chunks of a served batch size: no program the server would never use
            batches = [searcher.encode(queries[j : j + m]) for j in range(0, len(queries), m)]
            # From half the fewest to twice the most entries the samples reach (real queries stray both ways).
            buckets = engine.entry_buckets(batches, params, lq, below=2)
            yield
        for max_entries in buckets:  # padding queries only: compiles, and runs no search work
            engine.compile_streamed(size, params, lq, [max_entries])
            yield


def warm_up(searcher: Searcher, max_batch: int = 64) -> float:
    """Runs all of `warm_up_steps` now; returns the seconds spent."""
    t0 = time.perf_counter()
    for _ in warm_up_steps(searcher, max_batch):
        pass
    return time.perf_counter() - t0


@dataclass
class MicroBatcher:
    """Merges concurrent queries into few `search_all` calls, made by one worker thread, which also runs
    the warm-up (when `warm`) one step at a time whenever no request is waiting."""

    searcher: Searcher
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 256
    warm: bool = False
    batches: int = 0
    queries: int = 0
    warming: bool = False
    warm_up_s: float | None = None
    warm_up_error: str | None = None
    reloads: int = 0
    followers: "Followers | None" = None  # over several processes: announces each step to the others
    _index_stat: tuple | None = field(default=None, repr=False)
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _task: asyncio.Task | None = field(default=None, repr=False)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1), repr=False)

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self.warming = self.warm
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.followers is not None:  # in the worker, after the step it may be running
            await self.call(self.followers.stop)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def search(self, queries: list[str], k: int) -> list[tuple[list[tuple[int, int, float]], list[str]]]:
        """Each query's top k results (searched at SEARCH_K) and their passage texts; raises Overloaded when
        the queue is full."""
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((queries, k, future))
        except asyncio.QueueFull:
            raise Overloaded from None
        return await future

    async def call(self, fn: Callable, *args):
        """Runs `fn(*args)` in the search worker (JAX work is serialised there)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _next_warm_step(self, steps: Iterator[None]) -> bool:
        if self.followers is not None:
            self.followers.announce("warm")
        return next(steps, StopIteration) is not StopIteration

    async def _warm_step(self, steps: Iterator[None], t0: float) -> None:
        try:
            more = await self.call(self._next_warm_step, steps)
        except Exception as e:  # noqa: BLE001 - serve anyway: searches compile what they need themselves
            log.warning("warm-up stopped: %s: %s", type(e).__name__, e)
            self.warm_up_error, more = f"{type(e).__name__}: {e}", False
        if not more:
            self.warming = False
            self.warm_up_s = round(time.perf_counter() - t0, 2)
            log.info("warm in %.1fs", self.warm_up_s)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        steps = warm_up_steps(self.searcher, self.max_batch) if self.warm else iter(())
        t0 = time.perf_counter()
        sizes = batch_sizes(self.searcher, self.max_batch)
        while True:
            if self.warming and self._queue.empty():
                await self._warm_step(steps, t0)
                continue
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
            texts = [q for queries, _, _ in batch for q in queries]
            ks = [k for queries, k, _ in batch for _ in queries]
            try:
                answers = await loop.run_in_executor(self._pool, self._answer, texts, ks, sizes)
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.queries += len(texts)
            offset = 0
            for queries, _, future in batch:
                if not future.done():
                    future.set_result(answers[offset : offset + len(queries)])
                offset += len(queries)

    def _search(self, texts: list[str], sizes: list[int]) -> list[list[tuple[int, int, float]]]:
        """Searches `texts` in chunks of the warmed-up batch sizes only (largest first)."""
        k = min(SEARCH_K, self.searcher.index.num_passages)
        out, start = [], 0
        for size in sorted(sizes, reverse=True):
            count = (len(texts) - start) // size * size
            if count:
                if self.followers is not None:
                    self.followers.announce("search", n=count, k=k, batch_size=size)
                ranking = self.searcher.search_all(texts[start : start + count], k=k, batch_size=size)
                out += [ranking[i] for i in range(count)]
                self.batches += 1
                start += count
        return out

    def reload_if_updated(self) -> bool:
        """Moves the searcher to the index's newest version when its metadata.json changed (an `Indexer.add`,
        `delete` or `compact` committed). Runs in the worker between batches, so no request sees a half-moved
        searcher; if the new version cannot be opened, the old one keeps answering. Over several processes the
        others move with it, at the same step (`follow`)."""
        try:
            st = os.stat(self.searcher.index.path / "metadata.json")
        except OSError:
            return False
        seen = (st.st_mtime_ns, st.st_ino, st.st_size)
        if seen == self._index_stat:
            return False
        # (The first check, too, asks the index: an update may have committed after the searcher opened it.
        # A version that cannot be opened is tried again only when metadata.json changes again.)
        self._index_stat = seen
        try:
            moved = self.searcher.reload(verify=False)
        except Exception as e:  # noqa: BLE001 - keep answering from the version in memory
            log.warning(
                "index changed but could not be reloaded (still serving version %s): %s: %s",
                self.searcher.version,
                type(e).__name__,
                e,
            )
            return False
        if moved:
            self.reloads += 1
            log.info("index updated: now serving version %s (%s)", self.searcher.version, self.searcher.index)
            if self.followers is not None:
                self.followers.announce("reload", metadata=_metadata_digest(self.searcher.index))
        return moved

    def on_newest(self, work: Callable[[], Any]) -> Any:
        """`work()` on the index's newest version; once more after a reload where updates overtook it (an
        IndexChangedError: the files of the version it read were removed or replaced while it ran)."""
        self.reload_if_updated()
        try:
            return work()
        except IndexChangedError:
            self._index_stat = None  # ask the index even if metadata.json looks unchanged
            if not self.reload_if_updated():
                raise
            return work()

    def filtered(self, queries: list[str], k: int, pids: list[int]):
        """Search restricted to `pids` (not micro-batched: each request has its own set), with passage texts."""

        def work():
            n = min(SEARCH_K, self.searcher.index.num_passages)
            ranking = self.searcher.search_all(queries, k=n, pids=pids)
            results = [ranking[i][:k] for i in range(len(queries))]
            hits = [pid for r in results for pid, _, _ in r]
            passages = iter(self.searcher.passages(hits) if hits else [])
            return [(r, [next(passages) for _ in r]) for r in results]

        out = self.on_newest(work)
        self.queries += len(queries)
        return out

    def _answer(self, texts: list[str], ks: list[int], sizes: list[int]):
        """`_search`, cut to each query's k, with the passage texts: every use of the searcher stays in this
        one worker thread (tokenizers and lazily loaded arrays are not shared across threads)."""

        def work():
            results = [r[:k] for r, k in zip(self._search(texts, sizes), ks)]
            pids = [pid for r in results for pid, _, _ in r]
            passages = iter(self.searcher.passages(pids) if pids else [])
            return [(r, [next(passages) for _ in r]) for r in results]

        return self.on_newest(work)


# -- several processes ---------------------------------------------------------------------------------
STEPS_KEY = "colbert-jax serve/step/{}"


class Followers:
    """Process 0's side of a server over several processes: announces, in order, each step the others must
    take with it (`follow`), through the coordinator's key-value store. Thread-safe; after `stop` nothing
    more is announced (a step then raises instead of waiting forever in a collective alone)."""

    def __init__(self) -> None:
        from colbert_jax import distributed

        self._distributed = distributed
        self._next = 0
        self._collective_before = False
        self._lock = threading.Lock()
        self.stopped = False

    def announce(self, op: str, **args: int | str) -> None:
        """Announces step `op` ("search" with n, k, batch_size; "warm"; "reload" with the new version's metadata
        digest; "stop"): right before taking it (a reload: right after)."""
        with self._lock:
            if self.stopped:
                raise RuntimeError("the server is stopping: the other processes have left")
            self._distributed.publish(STEPS_KEY.format(self._next), json.dumps({"op": op, **args}))
            # The step before, if it was a search, ran collectives with every process: they have all read
            # it, so its key can go. (Warm-up steps are a bounded few; some run no collective.)
            if self._collective_before:
                self._distributed.retract(STEPS_KEY.format(self._next - 1))
            self._collective_before = op == "search"
            self._next += 1
            self.stopped = op == "stop"

    def stop(self) -> None:
        """Ends the other processes' `follow` (idempotent)."""
        if not self.stopped:
            self.announce("stop")


def follow(searcher: Searcher, max_batch: int = 64, poll_s: float = 30.0) -> int:
    """Processes 1..N-1 of a server over several processes: takes each step process 0 announces, in order, with
    the same arguments (the queries searched are process 0's: `Searcher` broadcasts them), until "stop".
    SIGTERM and SIGINT do not end it: process 0's stop does, so that no process leaves a step the others are
    in (if process 0 dies instead, the runtime ends this process). Returns the number of batches searched."""
    import jax
    import numpy as np

    from colbert_jax import distributed

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not in the main thread (tests): no handler to install
            signal.signal(sig, lambda *_: log.info("signalled: this process stops when process 0 stops"))
    steps, warming, batches = warm_up_steps(searcher, max_batch), True, 0
    blank = np.zeros((searcher.config.query_maxlen, searcher.config.dim), np.float32)
    for step in range(1 << 62):
        message = json.loads(distributed.receive(STEPS_KEY.format(step), poll_s))
        if message["op"] == "stop":
            log.info("process %d: process 0 stopped the server after %d batches", jax.process_index(), batches)
            return batches
        if message["op"] == "warm" and warming:
            try:
                warming = next(steps, StopIteration) is not StopIteration
            except Exception as e:  # noqa: BLE001 - as process 0 does: the searches compile what they need
                log.warning("warm-up stopped: %s: %s", type(e).__name__, e)
                warming = False
        elif message["op"] == "search":
            try:
                searcher.search_all([blank] * message["n"], k=message["k"], batch_size=message["batch_size"])
            except Exception as e:  # noqa: BLE001 - process 0 met the same error at the same point and goes on
                log.warning("search failed: %s: %s", type(e).__name__, e)
            batches += 1
        elif message["op"] == "reload":
            _reload_to(searcher, message["metadata"])
    return batches


def _metadata_digest(index) -> str:
    """Names one version of an index: a digest of its metadata.json's contents."""
    return hashlib.sha256(json.dumps(index.metadata, sort_keys=True).encode()).hexdigest()[:16]


def _reload_to(searcher: Searcher, digest: str, wait_s: float = 60.0) -> None:
    """Moves `searcher` to the index version process 0 moved to (named by `digest`), waiting up to `wait_s`
    for a shared filesystem to show it; raises rather than serve another version than process 0."""
    deadline = time.monotonic() + wait_s
    while True:
        searcher.reload(verify=False)
        if _metadata_digest(searcher.index) == digest:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{searcher.index.path}: process 0 moved to another version of the index than this process sees "
                f"after {wait_s:g} s (version {searcher.version} here): is it the same index on every host?"
            )
        time.sleep(0.5)


# -- the application -----------------------------------------------------------------------------------
def _hits(query: str, results: list[tuple[int, int, float]], texts: list[str]) -> SearchResponse:
    top = max((s for _, _, s in results), default=0.0)
    weights = [math.exp(s - top) for _, _, s in results]
    total = sum(weights) or 1.0
    return SearchResponse(
        query=query,
        topk=[
            Hit(text=text, pid=pid, rank=rank, score=score, prob=w / total)
            for (pid, rank, score), text, w in zip(results, texts, weights)
        ],
    )


def _validation_message(exc: RequestValidationError) -> str:
    """Pydantic's errors in one line: `k: must be an integer between 1 and 100, got 2.9`."""
    messages = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ())[1:])
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            messages.append('the body must be JSON, e.g. {"queries": ["a query"], "k": 10}')
        elif err.get("type") == "missing":
            kind = "query parameter" if err.get("loc", ("",))[0] == "query" else "field"
            messages.append(f"missing {kind} '{where}'" if where else 'missing body {"queries": [...], "k": 10}')
        elif err.get("type") == "model_attributes_type":
            messages.append('the body must be a JSON object: {"queries": ["a query"], "k": 10}')
        else:
            messages.append(f"{where}: {msg}" if where else msg)
    return "; ".join(messages) or "invalid request"


def _error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _BodyTooLarge(BaseException):  # noqa: N818 - not an Exception: FastAPI turns those, while reading a body, into 400
    """Raised from the body reader once a body passes the limit, caught by `_Guard`."""


class _Guard:
    """ASGI middleware in front of the application: bearer key on /api/ (when one is set), request body size
    (413, whether or not Content-Length is given) and a time limit per request (503 with Retry-After)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, timeout_s: float):
        self.app, self.max_body, self.timeout_s = app, max_body_bytes, timeout_s
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/api/"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await _error(413, f"request body over {self.max_body:,} bytes")(scope, receive, send)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # a chunked body without Content-Length
                raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, limited_receive, tracked_send), self.timeout_s)
        except _BodyTooLarge:
            if not started:
                await _error(413, f"request body over {self.max_body:,} bytes")(scope, receive, send)
        except TimeoutError:
            if not started:
                await _error(503, f"request took over {self.timeout_s:g} s: retry later")(scope, receive, send)


ERRORS = {
    400: {"model": ErrorBody, "description": "a bad parameter or body"},
    401: {"model": ErrorBody, "description": "the server has an API key and the request lacks it"},
    413: {"model": ErrorBody, "description": "the request body is over the server's limit"},
    503: {"model": ErrorBody, "description": "the request queue is full: retry after Retry-After seconds"},
}


def create_app(
    searcher: Searcher,
    *,
    max_batch: int = 64,
    max_wait_ms: float = 2.0,
    max_queue: int = 256,
    warm: bool = False,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    followers: Followers | None = None,
) -> FastAPI:
    """The FastAPI application serving `searcher`.

    Args:
      searcher: the index to serve (with `truncate=True` to accept queries longer than query_maxlen).
      max_batch: most queries per search call, and per POST request.
      max_wait_ms: how long the first queued request waits for others to batch with.
      max_queue: queued requests beyond which requests answer 503.
      warm: compile the search programs in the background after start-up (`/health` says "warming").
      api_key: when set, every /api/ request needs `Authorization: Bearer <api_key>` (else 401).
      max_body_bytes: larger request bodies answer 413.
      request_timeout_s: a request not answered by then gets 503 with Retry-After.
      followers: over several processes (process 0), announces each step to the others (`follow`).
    """
    for name, value, low in (
        ("max_batch", max_batch, 1),
        ("max_queue", max_queue, 1),
        ("max_body_bytes", max_body_bytes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    if not max_wait_ms >= 0 or not request_timeout_s > 0:  # (NaN fails both)
        raise ValueError(
            f"max_wait_ms must be >= 0 and request_timeout_s > 0, got {max_wait_ms!r} and {request_timeout_s!r}"
        )
    batcher = MicroBatcher(
        searcher, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, warm=warm, followers=followers
    )
    several = "{} is not available: the index is split over several processes and it reads every shard"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="colbert-jax",
        description=f"ColBERTv2 + PLAID search over {searcher.index.num_passages:,} passages. Every error "
        'answers {"error": "..."}.',
        lifespan=lifespan,
        responses={404: {"model": ErrorBody, "description": "no such path, or pid not in the index"}},
    )
    app.state.batcher = batcher
    started = time.time()
    SearchRequest = _request_model(max_batch)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc: RequestValidationError):
        return _error(400, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such path: {request.url.path} (the API is described at /docs)"
        elif exc.status_code == 405 and message == "Method Not Allowed":
            message = f"{request.method} is not allowed on {request.url.path} (the API is described at /docs)"
        response = _error(exc.status_code, message)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(IndexChangedError)
    async def index_changing(request, exc: IndexChangedError):
        # updates overtook a search twice in a row: the next try reads a version that holds still
        response = _error(503, f"the index is being updated: retry ({exc})")
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("error answering %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def answer(queries: list[str], k: int, pids: list[int] | None = None) -> list[SearchResponse] | JSONResponse:
        if pids is not None and not all(_INT64_MIN <= p <= _INT64_MAX for p in pids):
            return _error(400, "pids: a pid beyond 64-bit integers is not in the index")
        if pids is not None and followers is not None:
            return _error(501, several.format("a pids filter"))
        try:
            searcher._validate(queries)
            if pids is not None:
                answers = await batcher.call(batcher.filtered, queries, k, pids)
            else:
                answers = await batcher.search(queries, k)
        except Overloaded:
            return _error(503, "server overloaded: too many queued requests, retry later")
        except QueryError as e:
            return _error(400, str(e))
        except KeyError as e:  # a pid not in the index
            return _error(400, str(e.args[0]) if e.args else "unknown pid")
        return [_hits(q, results, texts) for q, (results, texts) in zip(queries, answers)]

    @app.get("/api/search", response_model=SearchResponse, responses=ERRORS, summary="Search one query")
    async def get_search(
        query: Annotated[QueryText, Query()],
        k: Annotated[KValue, Query()] = DEFAULT_K,
        pids: Annotated[str | None, Query(description="comma-separated pids: search only these passages")] = None,
    ):
        """colbert-ai's endpoint: the top k passages for `query` (with `pids=1,2,3`: among those only)."""
        allowed = None
        if pids is not None:
            try:
                allowed = [int(p) for p in pids.split(",") if p.strip()]
            except ValueError:
                return _error(400, f"pids: expected comma-separated integers, got {pids[:50]!r}")
            if not allowed:  # a search of no passages: a client's mistake, not an empty answer
                return _error(400, "pids: no pids given (leave pids out to search every passage)")
        out = await answer([query], k, allowed)
        return out if isinstance(out, JSONResponse) else out[0]

    @app.post("/api/search", response_model=BatchResponse, responses=ERRORS, summary="Search a batch of queries")
    async def post_search(request: SearchRequest):
        """The top k passages for each query (with `pids`: among those passages only)."""
        out = await answer(request.queries, request.k, request.pids)
        return out if isinstance(out, JSONResponse) else BatchResponse(results=out)

    @app.get("/api/explain", response_model=ExplainResponse, responses=ERRORS, summary="Why a passage matches a query")
    async def explain(query: Annotated[QueryText, Query()], pid: Annotated[int, Query(description="passage id")]):
        """ColBERT's MaxSim alignment: for each query token, the passage token it matched best and the
        similarity (the scores sum to the passage's score)."""
        from colbert_jax.search.explain import doc_token_spans

        def work():
            searcher.index.positions([pid])  # KeyError: not in the version now served
            matches = searcher.explain(query, pid)
            text = searcher.passages([pid])[0]
            return matches, text, doc_token_spans(searcher.model, text)

        if followers is not None:
            return _error(501, several.format("explain"))
        try:
            if not _INT64_MIN <= pid <= _INT64_MAX:  # numpy cannot even look it up
                raise KeyError(pid)
            # in the worker, on the newest version, as searches are (an added pid was a 404 until a search)
            matches, text, spans = await batcher.call(batcher.on_newest, work)
        except KeyError:
            return _error(404, f"pid {pid} is not in the index")
        except QueryError as e:
            return _error(400, str(e))
        return ExplainResponse(
            query=query,
            pid=pid,
            score=sum(m.score for m in matches),
            text=text,
            matches=[
                TokenMatch(
                    query_position=i,
                    query_token=m.query_token,
                    doc_token=m.doc_token,
                    doc_position=m.doc_position,
                    score=m.score,
                    start=spans[m.doc_position][0] if spans[m.doc_position] else None,
                    end=spans[m.doc_position][1] if spans[m.doc_position] else None,
                )
                for i, m in enumerate(matches)
            ],
        )

    @app.get("/health", response_model=Health, summary="Readiness and statistics")
    async def health():
        """'warming' while the search programs compile (searches wait meanwhile), then 'ok'."""
        index = searcher.index
        return Health(
            status="warming" if batcher.warming else "ok",
            index=str(index.path),
            passages=index.num_passages,
            embeddings=index.num_embeddings,
            batches=batcher.batches,
            queries=batcher.queries,
            queued=batcher.queued,
            uptime_s=round(time.time() - started, 1),
            warm_up_s=batcher.warm_up_s,
            warm_up_error=batcher.warm_up_error,
        )

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    def openapi() -> dict:
        # FastAPI documents a 422 with its own body for every route with parameters; we answer 400 with
        # ErrorBody instead, so the schema says that.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, timeout_s=request_timeout_s)
    return app


# -- running -------------------------------------------------------------------------------------------
class PortInUse(OSError):
    """The address to serve on is taken."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening: taking the port before the slow start-up work
    turns a busy port into an immediate error. Raises `PortInUse` or `OSError` with a message."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(e.errno, f"port {port} on {host} is already in use") from None
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuses (ValueError) to serve on an address other machines can reach without an API key, unless
    `insecure`: an index's passages are whatever was indexed, and anyone on the network could read them."""
    if api_key or insecure:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host {host!r}: {e.strerror}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(
            f"{host} is reachable from other machines: set an API key (--api-key KEY or COLBERT_JAX_API_KEY) "
            "or pass --insecure to serve without one"
        )


def uvicorn_config(app, **kwargs):
    """uvicorn's configuration for `app` with the server's limits (`MAX_HEAD_BYTES`); `kwargs` go to
    `uvicorn.Config` (host, port, log_level, ...)."""
    import uvicorn

    return uvicorn.Config(app, h11_max_incomplete_event_size=MAX_HEAD_BYTES, **kwargs)


def serve(
    searcher: Searcher,
    *,
    host: str = "127.0.0.1",
    port: int = 8893,
    sock: socket.socket | None = None,
    warm: bool = True,
    insecure: bool = False,
    **kwargs,
) -> None:
    """Runs the server until interrupted (loopback unless `host` says otherwise). The port opens at once;
    the warm-up runs behind it. `sock`: an already bound socket (from `bind`); `kwargs` go to `create_app`."""
    import uvicorn

    check_exposure(sock.getsockname()[0] if sock else host, kwargs.get("api_key"), insecure)
    sock = sock or bind(host, port)
    config = uvicorn_config(create_app(searcher, warm=warm, **kwargs), log_level="info")
    if kwargs.get("followers") is not None:
        # uvicorn raises the signal that stopped it again once stopped; over several processes that would end
        # this one before the others leave the runtime with it (they would then be aborted)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: log.info("stopped: leaving with the other processes"))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:  # (the application stops them on shutdown; this covers a server that never started)
        if kwargs.get("followers") is not None:
            kwargs["followers"].stop()
