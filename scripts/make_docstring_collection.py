"""A held-out benchmark collection from installed packages' docstrings: long passages and API-name queries.

    python scripts/make_docstring_collection.py --packages torch transformers numpy networkx sympy \\
        --passages 4000 --queries 366 --out DIR

Run it with a Python that has those packages (the reference venv does). Walks each package's importable
modules; one passage per documented public function, class or method whose docstring has at least
--min-words words (whitespace collapsed, cut at 180 words: passages about as long as ColBERT's 180-token
documents allow), duplicates dropped; a seeded sample of --passages of them is written to DIR/collection.tsv
(`pid \\t text \\t title`). Queries (DIR/queries.tsv, `qid \\t text`): the qualified names of a seeded sample of
--queries passages, split into words ("torch nn functional interpolate"): the way one searches for an API,
worded unlike the passages' openings that `bench_search.py` uses by default.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import pkgutil
import random
import re
import warnings
from pathlib import Path

MAX_WORDS = 180


def _members(module):
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isroutine(member):
                    yield f"{module.__name__}.{name}.{attr}", member
        elif inspect.isroutine(obj):
            yield f"{module.__name__}.{name}", obj


def docstring_passages(packages: list[str], min_words: int) -> list[tuple[str, str]]:
    """`[(qualified name, passage)]` over the packages' importable modules, in a fixed order."""
    out, seen = [], set()
    for package in packages:
        root = importlib.import_module(package)
        names = [package]
        if hasattr(root, "__path__"):
            names += sorted(m.name for m in pkgutil.walk_packages(root.__path__, f"{package}.") if "._" not in m.name)
        for name in names:
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # modules that print
                    warnings.simplefilter("ignore")
                    module = importlib.import_module(name)
            except Exception:  # optional dependencies, platform-specific modules
                continue
            for title, obj in _members(module):
                doc = inspect.getdoc(obj) or ""
                words = doc.split()
                text = " ".join(words[:MAX_WORDS])
                if len(words) < min_words or text in seen:
                    continue
                seen.add(text)
                out.append((title, text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", nargs="+", required=True)
    ap.add_argument("--passages", type=int, default=4000)
    ap.add_argument("--queries", type=int, default=366)
    ap.add_argument("--min-words", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    passages = docstring_passages(args.packages, args.min_words)
    if len(passages) < args.passages:
        raise SystemExit(f"only {len(passages)} passages with >= {args.min_words} words in {args.packages}")
    rng = random.Random(args.seed)
    chosen = rng.sample(passages, args.passages)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "collection.tsv", "w") as f:
        for pid, (title, text) in enumerate(chosen):
            f.write(f"{pid}\t{text.replace(chr(9), ' ')}\t{title}\n")
    with open(out / "queries.tsv", "w") as f:
        for qid, (title, _) in enumerate(rng.sample(chosen, args.queries)):
            f.write(f"{qid}\t{' '.join(w for w in re.split(r'[._]+', title) if w)}\n")
    words = sum(len(text.split()) for _, text in chosen)
    print(f"{len(passages)} candidate passages; wrote {args.passages} ({words / args.passages:.0f} words on average)")
    print(f"and {args.queries} queries to {out}")


if __name__ == "__main__":
    main()
