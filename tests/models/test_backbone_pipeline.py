"""Indexing, search and sharded training work with the new backbones and layouts, end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import colbert_jax
from tests.helpers import BACKBONE_FIXTURES, PYLATE_FIXTURES

REPO = Path(__file__).resolve().parents[2]
QUERIES = [
    "read a file line by line",
    "abstract base class",
    "parse command line arguments",
    "compress data with zlib",
    "current date and time",
    "sort a list in place",
]


@pytest.mark.parametrize(
    "checkpoint",
    [BACKBONE_FIXTURES / "modernbert" / "checkpoint", PYLATE_FIXTURES / "bert" / "checkpoint"],
    ids=["colbert-ai-modernbert", "pylate-bert"],
)
def test_index_and_search(tmp_path, small_collection, checkpoint):
    """The index stores the model's own embeddings (compressed), exact search equals brute-force MaxSim over
    them, PLAID finds most of the same passages, and the Searcher reloads the checkpoint (either layout) from
    the index's metadata."""
    model = colbert_jax.load_checkpoint(checkpoint)
    path = colbert_jax.Indexer(model, nbits=2, show_progress=False).index(tmp_path / "idx", small_collection)
    searcher = colbert_jax.Searcher(path)
    assert searcher.model.config.checkpoint == str(checkpoint)
    index = colbert_jax.Index.open(path)
    rows = [line.strip("\n\r ").split("\t") for line in small_collection.read_text().splitlines()]
    pids = [int(r[0]) for r in rows]
    flat, doclens = model.encode_docs_flat([f"{r[2]} | {r[1]}" for r in rows])  # colbert-ai's "title | passage"
    stored = index.embeddings(pids)
    np.testing.assert_array_equal([len(e) for e in stored], doclens)
    cosine = np.sum(np.concatenate(stored) * flat, axis=1)
    assert cosine.mean() > 0.9  # 2-bit residuals reconstruct the model's vectors

    Q = model.encode_queries(QUERIES)
    exact = searcher.search_all(QUERIES, k=5, exact=True)
    plaid = searcher.search_all(QUERIES, k=5)
    found = 0
    for i in range(len(QUERIES)):
        scores = np.array([np.sum(np.max(e @ Q[i].T, axis=0)) for e in stored])
        top = [pids[j] for j in np.argsort(-scores, kind="stable")[:5]]
        assert [pid for pid, *_ in exact[i]] == top
        np.testing.assert_allclose([score for *_, score in exact[i]], np.sort(scores)[::-1][:5], rtol=1e-4)
        found += len({pid for pid, *_ in plaid[i]} & set(top))
    assert found >= 0.6 * 5 * len(QUERIES)


def test_sharded_modernbert_training_equals_single_device(tmp_path):
    """Two steps from the colbert-ai ModernBERT checkpoint on 8 fake CPU devices (mesh data=4 x model=2:
    attention heads and GLU units split by the logical-axis rules) give the single device's parameters."""
    args = [
        "scripts/train.py",
        "--config",
        "configs/tiny.yaml",
        *("--set", f"checkpoint={BACKBONE_FIXTURES / 'modernbert' / 'checkpoint'}"),
        *("--set", "doc_maxlen=32", "--set", "query_maxlen=16", "--set", "bsize=8", "--set", "lr=1e-3"),
        *("--set", "maxsteps=2", "--set", "train.save_every=null", "--set", "train.dropout=false"),
    ]

    def run(out, extra=(), env=None):
        result = subprocess.run(
            [sys.executable, *args, *extra, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return load_file(str(out / "export" / "model.safetensors"))

    one = run(tmp_path / "one")
    eight = run(
        tmp_path / "eight",
        ("--set", "train.mesh.data=4", "--set", "train.mesh.model=2"),
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    start = load_file(str(BACKBONE_FIXTURES / "modernbert" / "checkpoint" / "model.safetensors"))
    assert sorted(one) == sorted(start)  # the export is colbert-ai's layout, every tensor kept
    assert np.abs(one["linear.weight"] - start["linear.weight"]).max() > 1e-4  # it trained
    for name in one:
        np.testing.assert_allclose(one[name], eight[name], rtol=0, atol=1e-6, err_msg=name)
