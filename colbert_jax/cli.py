"""The `colbert-jax` command line: one subcommand per job, each a thin shim over the library.

Exit codes: 0 success, 1 failure while running, 2 bad usage or bad input (missing file, bad config key,
a target that is not ours to replace), 130 interrupted (Ctrl-C; rerunning the same command resumes).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Formatter(argparse.HelpFormatter):
    """Help that shows every option's default (where it has a meaningful one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _convert(args: argparse.Namespace) -> int:
    import colbert_jax
    from colbert_jax.checkpoint import JAX_PARAMS

    src_is_jax = (Path(args.src) / JAX_PARAMS).is_file()
    target = args.to or ("torch" if src_is_jax else "jax")
    model = colbert_jax.load_checkpoint(
        args.src, init_projection=args.init_projection, projection_seed=args.projection_seed
    )
    out = model.save(args.dst, format=target, overwrite=args.overwrite)
    print(f"wrote {target} checkpoint: {out}  ({model})")
    return EXIT_OK


def _overrides(pairs: list[str] | None) -> dict:
    """`--set key=value` pairs -> config overrides (values parsed as YAML scalars: 2, 0.5, true, null),
    each checked against `ColBERTConfig` so that an error names the `--set` that caused it."""
    import yaml

    from colbert_jax.config import ColBERTConfig, ConfigError

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair}: the value is not a YAML scalar") from None
        try:
            ColBERTConfig().replace(**{key.strip(): out[key.strip()]})
        except ConfigError as e:
            raise ConfigError(f"--set {pair}: {str(e).split(': ', 1)[-1]}") from None
    return out


def _index(args: argparse.Namespace) -> int:
    import jax

    import colbert_jax
    from colbert_jax.default_model import default_checkpoint

    overrides = _overrides(args.set)
    for key in ("nbits", "kmeans_niters", "doc_maxlen", "index_bsize"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    indexer = colbert_jax.Indexer(args.checkpoint or default_checkpoint(), chunksize=args.chunksize, **overrides)
    path = indexer.index(args.index, args.collection, overwrite=args.overwrite)
    if jax.process_index() == 0:
        index = colbert_jax.Index.open(path, verify=False)
        size = index.nbytes()
        print(f"{index}  {size / 2**20:.1f} MiB, {size / index.num_embeddings:.1f} bytes/embedding")
    return EXIT_OK


def _search(args: argparse.Namespace) -> int:
    import json
    import time

    import jax

    import colbert_jax
    from colbert_jax.queries import load_queries

    if args.queries and args.query:
        raise ValueError("give queries either as arguments or with --queries FILE, not both")
    overrides = _overrides(args.set)
    for key in ("ncells", "ndocs", "centroid_score_threshold"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    t0 = time.perf_counter()
    searcher = colbert_jax.Searcher(
        args.index,
        checkpoint=args.checkpoint,
        exact=args.exact,
        truncate=args.truncate,
        allow_other_checkpoint=args.allow_other_checkpoint,
        engine=args.engine,
        **overrides,
    )
    queries = load_queries(args.queries) if args.queries else dict(enumerate(args.query))
    if not queries:
        raise ValueError("give one or more QUERY arguments or --queries FILE")
    texts = {}
    if args.show_text:
        searcher.passages(searcher.index.pids[:1], collection=args.collection)  # fail before searching
    t1 = time.perf_counter()
    ranking = searcher.search_all(queries, k=args.k)
    t2 = time.perf_counter()
    if jax.process_index() > 0:  # every process searched in step; process 0 writes the results
        return EXIT_OK
    if args.show_text:
        pids = sorted({pid for results in ranking.data.values() for pid, _, _ in results})
        texts = dict(zip(pids, searcher.passages(pids)))

    fmt = args.format or ("tsv" if args.out else "text")
    out = open(args.out, "w", encoding="utf-8") if args.out and fmt != "tsv" else sys.stdout
    try:
        if args.out and fmt == "tsv":
            ranking.save(args.out)  # colbert-ai's ranking TSV (with a provenance .meta file beside it)
        for qid, results in ranking.data.items() if not (args.out and fmt == "tsv") else ():
            if fmt == "jsonl":
                hits = [
                    {"pid": pid, "rank": rank, "score": score} | ({"text": texts[pid]} if args.show_text else {})
                    for pid, rank, score in results
                ]
                print(json.dumps({"qid": qid, "query": queries[qid], "results": hits}, ensure_ascii=False), file=out)
            elif fmt == "tsv":
                for pid, rank, score in results:
                    extra = "\t" + " ".join(texts[pid].split()) if args.show_text else ""
                    print(f"{qid}\t{pid}\t{rank}\t{score:.6f}{extra}", file=out)
            else:
                print(f"{qid}: {queries[qid]}", file=out)
                for pid, rank, score in results:
                    print(f"  {rank:3d}. pid {pid}  {score:.3f}", file=out)
                    if args.show_text:
                        print(f"       {texts[pid][:200]}", file=out)
    finally:
        if out is not sys.stdout:
            out.close()
    n = len(queries)
    print(
        f"{n} quer{'y' if n == 1 else 'ies'} in {t2 - t1:.2f}s ({n / (t2 - t1):.1f}/s, "
        f"{1000 * (t2 - t1) / n:.1f} ms each, compilation included); index and model loaded in "
        f"{t1 - t0:.1f}s" + (f"; written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    import jax

    import colbert_jax
    from colbert_jax import distributed
    from colbert_jax.server import Followers, bind, check_exposure, follow, serve

    def open_searcher() -> colbert_jax.Searcher:
        return colbert_jax.Searcher(
            args.index,
            checkpoint=args.checkpoint,
            truncate=True,
            allow_other_checkpoint=args.allow_other_checkpoint,
            engine=args.engine,
        )

    if jax.process_index() > 0:  # one of several processes: serves its shards for process 0's server
        searcher = open_searcher()
        distributed.barrier("colbert-jax serve: loaded")
        batches = follow(searcher, max_batch=args.max_batch)
        print(
            f"colbert-jax serve: process {jax.process_index()} stopped with process 0 after {batches} batches",
            file=sys.stderr,
        )
        return EXIT_OK

    args.api_key = args.api_key or os.environ.get("COLBERT_JAX_API_KEY") or None
    try:
        check_exposure(args.host, args.api_key, args.insecure)
    except ValueError as e:
        print(f"colbert-jax serve: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Take the port first: a busy port is an error now, not after loading the index and compiling.
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"colbert-jax serve: error: {e.strerror}; choose another port with --port", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        searcher = open_searcher()
        # Every answer carries passage texts: refuse to start a server that could only answer 500.
        try:
            searcher.passages([int(searcher.index.pids[0])], collection=args.collection)
        except (FileNotFoundError, ValueError, KeyError) as e:
            message = getattr(e, "cli_message", None) or e  # the flag to use, where the library names one
            print(f"colbert-jax serve: error: cannot show passage texts: {message}", file=sys.stderr)
            sock.close()
            return EXIT_BAD_INPUT
        # Over several processes: wait until every one has loaded its part (one that failed ends the job).
        followers = Followers() if jax.process_count() > 1 else None
        distributed.barrier("colbert-jax serve: loaded")
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(
        f"serving {searcher.index} at {url}/ (search page; API at {url}/docs); warming up in the background: "
        f"{url}/health says 'ok' when done",
        file=sys.stderr,
        flush=True,
    )
    serve(
        searcher,
        sock=sock,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        api_key=args.api_key,
        insecure=args.insecure,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout_s,
        followers=followers,
    )
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from colbert_jax.evaluation import evaluate, load_qrels, load_run

    metrics = evaluate(
        load_run(args.ranking), load_qrels(args.qrels), mrr_k=args.mrr_k, ndcg_k=args.ndcg_k, recall_ks=args.recall
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for name, value in metrics.items():
            print(f"{name:>24}: {value:.4f}" if isinstance(value, float) else f"{name:>24}: {value}")
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from colbert_jax.training.config import TrainConfig
    from colbert_jax.training.data import DataError
    from colbert_jax.training.loop import train

    config = TrainConfig.load(args.config, args.set or [])
    try:
        train(config, args.out, overwrite=args.overwrite)
    except DataError as e:
        raise ValueError(str(e)) from None
    return EXIT_OK


def _quickstart(args: argparse.Namespace) -> int:
    from colbert_jax import quickstart

    return quickstart.run(args)


def _add(args: argparse.Namespace) -> int:
    import colbert_jax

    indexer = colbert_jax.Indexer(args.checkpoint, show_progress=False)  # the summary below says it all
    pids = indexer.add(args.index, args.collection, replace=args.replace)
    drift = indexer.stats["drift"]
    if args.quiet:
        return EXIT_OK
    print(
        f"added {len(pids):,} passages to {args.index} ({indexer.stats['replaced']:,} replaced); reconstruction "
        f"cosine {drift['last_add_cosine']:.4f}"
        + (f" (the index's own: {drift['baseline_cosine']:.4f})" if drift["baseline_cosine"] is not None else "")
        + f"; added since the centroids were trained: {drift['added_share']:.1%} of the index",
        file=sys.stderr,
    )
    return EXIT_OK


def _delete(args: argparse.Namespace) -> int:
    import colbert_jax

    if (args.pids is None) == (args.pids_file is None):
        raise ValueError("give the pids to delete with --pids 3,17 or --pids-file FILE (one of them)")
    text = args.pids if args.pids is not None else Path(args.pids_file).read_text()
    try:
        pids = [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError("pids must be integers, separated by commas or whitespace") from None
    n = colbert_jax.Indexer(show_progress=False).delete(args.index, pids)
    if not args.quiet:
        print(f"deleted {n:,} passages from {args.index}", file=sys.stderr)
    return EXIT_OK


def _compact(args: argparse.Namespace) -> int:
    import colbert_jax

    colbert_jax.Indexer(args.checkpoint, show_progress=not args.quiet).compact(args.index, recluster=args.recluster)
    print(f"compacted {args.index}" + (" (centroids retrained)" if args.recluster else ""), file=sys.stderr)
    return EXIT_OK


def _rerank(args: argparse.Namespace) -> int:
    import colbert_jax
    from colbert_jax.queries import canonical_id, load_queries
    from colbert_jax.search.rerank import read_run

    # qids matched as evaluate matches them: the queries file's '001' is read as 1, a run's stays '001'
    queries = {canonical_id(q): text for q, text in load_queries(args.queries).items()}
    run = read_run(args.run)
    missing = [q for q in run if canonical_id(q) not in queries]
    if missing:
        raise ValueError(f"{args.run} ranks query {missing[0]!r}, which {args.queries} does not hold")
    searcher = colbert_jax.Searcher(
        args.index, checkpoint=args.checkpoint, allow_other_checkpoint=args.allow_other_checkpoint
    )
    ranking = searcher.rerank_all({q: queries[canonical_id(q)] for q in run}, run, k=args.k)
    ranking.save(args.out)
    print(f"reranked {len(run):,} queries' candidates from {args.run}: written to {args.out}", file=sys.stderr)
    return EXIT_OK


def _bounded(kind: type, low: float, high: float | None = None, *, above: bool = False) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) at least `low` (above it, with above=True) and at most `high`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > low if above else value >= low) or (high is not None and value > high):  # NaN too
            bound = f"above {low}" if above else f"from {low}" + (f" to {high}" if high is not None else " up")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from colbert_jax import __version__, quickstart

    parser = _Parser(
        prog="colbert-jax",
        description="ColBERTv2 + PLAID in JAX. Exit codes: 0 success, 1 failure, 2 bad input, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"colbert-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between the colbert-ai (PyTorch), PyLate and colbert-jax layouts",
        description="Convert a checkpoint. SRC is a colbert-ai / PyTorch ColBERTv2 directory "
        "(model.safetensors or pytorch_model.bin, read without torch), a PyLate / sentence-transformers "
        "directory, a Hub id, or a colbert-jax directory; backbones: BERT, RoBERTa, XLM-RoBERTa, ELECTRA, "
        "ModernBERT. By default a colbert-jax SRC is written as torch and anything else as jax.",
    )
    p.add_argument("src", help="checkpoint directory or Hub id")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument(
        "--to",
        choices=["torch", "pylate", "jax"],
        help="output layout: torch (colbert-ai's), pylate (PyLate 1.6 / sentence-transformers) or jax (ours)",
    )
    p.add_argument(
        "--init-projection",
        dest="init_projection",
        type=int,
        metavar="DIM",
        help="SRC is a plain backbone without a ColBERT projection: start one of DIM outputs, drawn at random",
    )
    p.add_argument("--projection-seed", dest="projection_seed", type=int, default=0, help="seed for --init-projection")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing checkpoint that colbert-jax wrote (anything else is never replaced)",
    )
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "index",
        help="build a PLAID index of a collection",
        description="Encode a collection (TSV 'pid<TAB>passage[<TAB>title]' or JSONL with "
        "id/title/text), train centroids, compress residuals and write a colbert-jax index. "
        "An interrupted build resumes when run again with the same arguments.",
    )
    p.add_argument("--checkpoint", help="checkpoint directory or Hub id (default: the packaged MiniLM model)")
    p.add_argument("--collection", required=True, help="collection file (.tsv or .jsonl)")
    p.add_argument("--index", required=True, help="output index directory")
    p.add_argument("--nbits", type=int, help="bits per residual dimension (1, 2, 4 or 8; default: checkpoint's)")
    p.add_argument("--kmeans-niters", dest="kmeans_niters", type=int, help="k-means iterations")
    p.add_argument("--doc-maxlen", dest="doc_maxlen", type=int, help="maximum document tokens")
    p.add_argument("--index-bsize", dest="index_bsize", type=int, help="maximum documents per encoder batch")
    p.add_argument("--chunksize", type=int, default=25_000, help="passages per resumable chunk")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config key (repeat --set)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing colbert-jax index, once the new one is complete (anything else is never replaced)",
    )
    p.set_defaults(func=_index)

    p = sub.add_parser(
        "add",
        help="add (or replace) passages in an index, in place",
        description="Encode new passages with the index's checkpoint and codec and add them (a TSV/JSONL keeps "
        "its ids; an id already in the index is an error unless --replace). Atomic; reports how well the new "
        "passages fit the centroids.",
    )
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--collection", required=True, help="passages to add (.tsv or .jsonl)")
    p.add_argument("--replace", action="store_true", help="replace passages whose ids are already in the index")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the one the index records)")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=_add)

    p = sub.add_parser("delete", help="delete passages from an index, in place (atomic)")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--pids", help="comma-separated pids, e.g. 3,17")
    p.add_argument("--pids-file", dest="pids_file", help="file of pids (one per line, or comma-separated)")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=_delete)

    p = sub.add_parser(
        "compact",
        help="fold an index's adds and deletes into a clean layout",
        description="Rewrite the index without its update log (search results do not change); --recluster "
        "retrains the centroids on the current passages (a full rebuild over them).",
    )
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--recluster", action="store_true", help="retrain centroids on the current passages")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the one the index records)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_compact)

    p = sub.add_parser(
        "rerank",
        help="rerank another system's run with the index's exact ColBERT scores",
        description="Score each query's candidates (a run: 'qid<TAB>pid<TAB>rank[<TAB>score]' TSV or TREC "
        "'qid Q0 docid rank score tag') exactly with the index's embeddings; write the reranked run (TSV).",
    )
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--run", required=True, help="the run to rerank")
    p.add_argument("--queries", required=True, help="queries file: TSV 'qid<TAB>text' or JSONL")
    p.add_argument("--k", type=int, help="keep the best k of each query (default: all candidates)")
    p.add_argument("--out", required=True, help="reranked run (TSV)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the one the index records)")
    p.add_argument(
        "--allow-other-checkpoint", dest="allow_other_checkpoint", action="store_true", help="see search --help"
    )
    p.set_defaults(func=_rerank)

    p = sub.add_parser(
        "search",
        help="search an index",
        description="Search an index with PLAID (or --exact brute force) and print or save the "
        "ranking (colbert-ai's TSV: qid, pid, rank, score).",
    )
    p.add_argument("query", nargs="*", help="queries to search (or use --queries)")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--queries", help="queries file: TSV 'qid<TAB>text' or JSONL")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument(
        "--format",
        choices=["text", "tsv", "jsonl"],
        help="output: text (for reading), tsv (qid, pid, rank, score) or jsonl "
        "(default: text on the terminal, tsv with --out)",
    )
    p.add_argument("--show-text", dest="show_text", action="store_true", help="include each passage's text")
    p.add_argument("--collection", help="collection file for --show-text (default: the one the index records)")
    p.add_argument("--out", help="write the results to this file (tsv: colbert-ai's ranking TSV)")
    p.add_argument("--checkpoint", help="checkpoint (default: the one recorded in the index)")
    p.add_argument(
        "--allow-other-checkpoint",
        dest="allow_other_checkpoint",
        action="store_true",
        help="search with a checkpoint other than the one that built the index",
    )
    p.add_argument("--exact", action="store_true", help="brute-force MaxSim instead of PLAID")
    p.add_argument(
        "--engine",
        choices=("plaid", "warp"),
        default="plaid",
        help="plaid or warp: WARP's cluster-by-cluster scoring of the packed residuals",
    )
    p.add_argument(
        "--truncate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cut queries longer than query_maxlen, with a warning (--no-truncate: refuse them)",
    )
    p.add_argument("--ncells", type=int, help="centroids probed per query token (default by k)")
    p.add_argument("--ndocs", type=int, help="candidates kept after pruned centroid interaction (default by k)")
    p.add_argument(
        "--centroid-score-threshold",
        dest="centroid_score_threshold",
        type=float,
        help="centroid pruning threshold (default by k)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config key (repeat --set)")
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "serve",
        help="serve an index over HTTP, with a search page",
        description="HTTP search server. GET / is a search page showing which passage token each query "
        "token matched; GET /api/search?query=...&k=... (k from 1 to 100), POST /api/search "
        '{"queries": [...], "k": 10}, GET /api/explain?query=...&pid=..., GET /health ("warming", then '
        '"ok"); the API is described at /docs. The port opens at once and the search programs compile '
        "behind it (searches meanwhile wait). Concurrent requests are micro-batched; a full queue answers "
        "503. Binds loopback unless --host says otherwise. Exits 2 if the port is in use or the index's "
        "checkpoint or collection cannot be loaded.",
    )
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--checkpoint", help="checkpoint (default: the one recorded in the index)")
    p.add_argument(
        "--allow-other-checkpoint",
        dest="allow_other_checkpoint",
        action="store_true",
        help="serve with a checkpoint other than the one that built the index",
    )
    p.add_argument("--collection", help="collection file for passage texts (default: the one the index records)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument(
        "--engine",
        choices=("plaid", "warp"),
        default="plaid",
        help="plaid or warp: WARP's cluster-by-cluster scoring of the packed residuals",
    )
    p.add_argument(
        "--port", type=_bounded(int, 0, 65535), default=8893, help="port (0: any free port, printed at start-up)"
    )
    p.add_argument(
        "--api-key",
        dest="api_key",
        help="require 'Authorization: Bearer KEY' on /api/ (default: $COLBERT_JAX_API_KEY, never printed)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="serve on a non-loopback --host without an API key (anyone can query)"
    )
    limits = (  # (flag, type with its range, default, help): out of range, a server that cannot serve
        ("--max-batch", _bounded(int, 1), 64, "queries per search call, and per POST request"),
        ("--max-wait-ms", _bounded(float, 0), 2.0, "how long the first queued request waits for others to batch with"),
        ("--max-queue", _bounded(int, 1), 256, "queued requests before 503"),
        ("--max-body-bytes", _bounded(int, 1), 1 << 20, "larger request bodies get 413"),
        ("--request-timeout-s", _bounded(float, 0, above=True), 60.0, "slower requests get 503"),
    )
    for flag, kind, default, text in limits:
        p.add_argument(flag, dest=flag[2:].replace("-", "_"), type=kind, default=default, help=text)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "evaluate",
        help="MRR, Recall and nDCG of a ranking against qrels (computed by ir-measures / trec_eval)",
        description="Evaluate a ranking TSV (qid, pid, rank[, score]) or a TREC run file (qid Q0 docno rank "
        "score tag) against qrels in TREC / MS MARCO ('qid 0 docno rel') or BEIR ('query-id corpus-id score', "
        "with header) format. Metrics come from ir-measures (trec_eval), averaged over the judged queries "
        "(a judged query missing from the ranking counts 0).",
    )
    p.add_argument("--ranking", required=True, help="ranking TSV (colbert-jax search --out) or TREC run file")
    p.add_argument("--qrels", required=True, help="relevance judgements (TREC, MS MARCO or BEIR)")
    p.add_argument("--mrr-k", dest="mrr_k", type=int, default=10, help="MRR depth")
    p.add_argument("--ndcg-k", dest="ndcg_k", type=int, default=10, help="nDCG depth")
    p.add_argument("--recall", type=int, nargs="+", default=[10, 50, 100, 1000], help="Recall@k depths")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "train",
        help="train or fine-tune a ColBERT model",
        description="Train from a YAML config (sections 'colbert' and 'train'; see configs/). "
        "Writes OUT/metrics.jsonl, Orbax checkpoints in OUT/checkpoints and the final model in the "
        "PyTorch ColBERTv2 layout in OUT/export. Rerunning the same command resumes.",
    )
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a config override, repeated: --set lr=1e-5 --set train.seed=1 (bare keys are looked up in both sections)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete an earlier run in --out (only a colbert-jax run directory) instead of resuming it",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "quickstart",
        help="the default model on the built-in corpus",
        description=quickstart.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quickstart.add_arguments(p)
    p.set_defaults(func=_quickstart)
    return parser


def _short_warnings(command: str) -> None:
    """Our own warnings (e.g. queries truncated) as one line in CLI terms; others as Python prints them."""
    import warnings

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("colbert_jax"):
            print(f"colbert-jax {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code. Of several processes, each leaves the runtime together with
    the others when its command succeeds, and at once (os._exit) when it fails: the others may be waiting for
    it in a collective, which an orderly shutdown would wait for in turn."""
    from colbert_jax import distributed

    try:
        code = _main(argv)
    except BaseException:
        if not distributed.joined():
            raise
        import traceback

        traceback.print_exc()
        code = EXIT_FAILED
    if code != EXIT_OK and distributed.joined():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    distributed.shutdown()
    return code


def _main(argv: list[str] | None = None) -> int:
    from colbert_jax.checkpoint import CheckpointError
    from colbert_jax.config import ConfigError
    from colbert_jax.errors import cli_message
    from colbert_jax.torch_io import TorchFileError

    args = build_parser().parse_args(argv)
    _short_warnings(args.command)
    from colbert_jax import distributed
    from colbert_jax.runtime import enable_compilation_cache

    try:
        if args.command in ("index", "train", "search", "serve"):  # jobs that run as several processes
            distributed.initialize()
        enable_compilation_cache()
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\ncolbert-jax {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (
        FileNotFoundError,
        FileExistsError,
        ConfigError,
        CheckpointError,
        TorchFileError,
        ValueError,
        TypeError,
        KeyError,
    ) as e:
        print(f"colbert-jax {args.command}: error: {cli_message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        if not _out_of_space(e):
            raise
        print(
            f"colbert-jax {args.command}: error: no space left on the device (or a file size limit reached): {e}; "
            "nothing that was there before was replaced: free some space and run the same command again",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _out_of_space(e: OSError) -> bool:
    """A full disk, a quota or RLIMIT_FSIZE: errno says so, or numpy's short write (which has no errno)."""
    return e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or (
        e.errno is None and " requested and " in str(e) and str(e).endswith(" written")
    )


if __name__ == "__main__":
    sys.exit(main())
