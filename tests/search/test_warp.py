"""The WARP engine (`colbert_jax.search.warp`): exact when every cluster is probed, WARP's scoring rule
(brute force in numpy) when few are, the same results on several devices, and retrieval quality no lower
than PLAID's on the real-text quality queries."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import colbert_jax
from tests.conftest import COLLECTIONS
from tests.helpers import FIXTURES

QUERIES = [line.split("\t")[1] for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines()[:12]]


@pytest.fixture(scope="module", params=[1, 2])  # the tiny model's dim 16 packs at most 2 bits
def tiny_index(request, tmp_path_factory, tiny_model, small_collection):
    path = tmp_path_factory.mktemp("warp") / f"tiny.nbits{request.param}"
    colbert_jax.Indexer(tiny_model, nbits=request.param, show_progress=False).index(path, small_collection)
    return path


def warp_reference(Q: np.ndarray, index, nprobe: int, k: int) -> np.ndarray:
    """WARP's scores by brute force over the decompressed embeddings: per token, the max over the passage's
    embeddings in the token's `nprobe` best clusters, else the best unprobed cluster's centroid score."""
    emb = index.codec.decompress(index.codes, index.residuals)
    S = index.codec.centroids @ Q.T  # [P, Lq]
    order = np.argsort(-S, axis=0, kind="stable")
    probed = np.zeros(S.shape, bool)
    np.put_along_axis(probed, order[:nprobe], True, axis=0)
    imputed = np.where(probed, -np.inf, S).max(0) if nprobe < len(S) else np.zeros(Q.shape[0])
    sim = np.where(probed[index.codes], emb @ Q.T, -np.inf)  # [E, Lq], only probed (token, cluster)
    per_token = np.maximum.reduceat(sim, np.concatenate([[0], np.cumsum(index.doclens)[:-1]]), axis=0)
    return np.sort(np.where(per_token > -np.inf, per_token, imputed).sum(1))[::-1][:k]


@pytest.mark.parametrize("nprobe", ["all", 3])
def test_warp_scores_equal_brute_force(tiny_index, tiny_model, nprobe):
    """nprobe = every cluster: WARP is exact MaxSim over the decompressed embeddings (scores within 1e-5, as
    the exact engine ranks them); fewer: it equals WARP's rule computed by brute force."""
    searcher = colbert_jax.Searcher(tiny_index, checkpoint=tiny_model, engine="warp", truncate=True)
    index = searcher.index
    n = index.num_partitions if nprobe == "all" else nprobe
    ranking = searcher.search_all(QUERIES, k=20, ncells=n)
    Q = searcher.encode(QUERIES)
    exact = searcher.search_all(QUERIES, k=20, exact=True) if nprobe == "all" else None
    for i in range(len(QUERIES)):
        got = np.array([s for *_, s in ranking[i]])
        want = warp_reference(Q[i], index, n, 20)
        np.testing.assert_allclose(got, want, atol=1e-5)
        if exact is not None:
            np.testing.assert_allclose(got, [s for *_, s in exact[i]], atol=1e-5)
            # the passages too (ties aside): each one's exact score is the one WARP gave it
            rescored = dict((p, s) for p, _, s in searcher.rerank(Q[i], [p for p, _, _ in ranking[i]]))
            np.testing.assert_allclose([rescored[p] for p, _, _ in ranking[i]], got, atol=1e-5)


@pytest.mark.parametrize("tiny_index", [2], indirect=True)  # one nbits is enough here
def test_warp_refuses_what_it_does_not_do(tiny_index, tiny_model):
    with pytest.raises(ValueError, match="engine must be 'plaid' or 'warp'"):
        colbert_jax.Searcher(tiny_index, checkpoint=tiny_model, engine="colbert")
    with pytest.raises(ValueError, match="not with load_index_with_mmap"):
        colbert_jax.Searcher(tiny_index, checkpoint=tiny_model, engine="warp", load_index_with_mmap=True)


@pytest.mark.parametrize("tiny_index", [2], indirect=True)  # one nbits is enough here
def test_three_shards_equal_one(tiny_index, tiny_checkpoint, tmp_path):
    """The passages split over 3 (fake CPU) devices give the single device's rankings, at k beyond a shard's
    share of the passages too."""
    out = tmp_path / "three.json"
    script = textwrap.dedent(f"""
        import os, json
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
        import jax, colbert_jax
        assert len(jax.devices()) == 3
        result = {{}}
        for devices in (1, 3):
            s = colbert_jax.Searcher({str(tiny_index)!r}, checkpoint={str(tiny_checkpoint)!r}, truncate=True,
                                     engine="warp", devices=jax.devices()[:devices])
            assert s.mesh.size == devices
            result[devices] = {{k: [[(p, x) for p, _, x in r] for r in s.search_all({QUERIES!r}, k=k).data.values()]
                               for k in (10, 150)}}
        json.dump(result, open({str(out)!r}, "w"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    result = json.loads(out.read_text())
    for k in ("10", "150"):
        for one, three in zip(result["1"][k], result["3"][k]):
            assert len(one) == int(k)
            np.testing.assert_allclose([x for _, x in three], [x for _, x in one], atol=1e-5)
            # the same passages, up to the order of scores within float noise (sums run in other orders)
            score_of = dict(one)
            for (p, x), (_, y) in zip(three, one):
                assert abs(score_of.get(p, one[-1][1]) - y) <= 1e-5 and abs(x - y) <= 1e-5
            assert sum(p != q for (p, _), (q, _) in zip(three, one)) <= 2 * int(k) // 10


# -- quality on real text -----------------------------------------------------------------------------
QUALITY = json.loads((FIXTURES.parent / "index" / "quality_2k.json").read_text())


def ndcg_at_10(ranked: list[int], relevant: int) -> float:
    return next((1.0 / np.log2(i + 2) for i, p in enumerate(ranked[:10]) if p == relevant), 0.0)


@pytest.fixture(scope="module")
def real_indexes(real_index, real_index_nbits4):
    return {2: real_index, 4: real_index_nbits4}


@pytest.mark.parametrize("nbits", [2, 4])
def test_warp_quality_at_least_plaids(nbits, real_indexes, minilm_model):
    """On the 1,000 quality queries, WARP's overlap@10 with exact MaxSim (over the decompressed embeddings)
    and its nDCG@10 are no lower than PLAID's minus 0.005 at k=10 with each engine's defaults. (At k=100
    WARP's default matches PLAID's overlap@10 but not its nDCG@10, which PLAID's pruning lifts above exact
    MaxSim's on these queries: see docs/benchmarks.md.)"""
    rows = [line.split("\t") for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines()]
    plaid = colbert_jax.Searcher(real_indexes[nbits], checkpoint=minilm_model, truncate=True)
    engine = colbert_jax.Searcher(real_indexes[nbits], checkpoint=minilm_model, truncate=True, engine="warp")
    Q = plaid.encode([text for _, text in rows])
    queries = {int(q): Q[i] for i, (q, _) in enumerate(rows)}
    exact = plaid.search_all(queries, k=10, exact=True)
    relevant = QUALITY["relevant_pids"]

    def quality(ranking):
        overlap = np.mean([len({p for p, _, _ in ranking[q][:10]} & {p for p, _, _ in exact[q]}) / 10 for q in queries])
        ndcg = np.mean([ndcg_at_10([p for p, _, _ in ranking[q]], relevant[q]) for q in queries])
        return overlap, ndcg

    (po, pn), (wo, wn) = quality(plaid.search_all(queries, k=10)), quality(engine.search_all(queries, k=10))
    print(f"nbits={nbits}: overlap@10 warp {wo:.4f} plaid {po:.4f}; nDCG@10 warp {wn:.4f} plaid {pn:.4f}")
    assert wo >= po - 0.005 and wn >= pn - 0.005
    # every cluster probed: exact MaxSim at this nbits and dim too
    every = engine.search_all({q: queries[q] for q in range(3)}, k=10, ncells=engine.index.num_partitions)
    exact = plaid.search_all({q: queries[q] for q in range(3)}, k=10, exact=True)
    for q in range(3):
        np.testing.assert_allclose([s for *_, s in every[q]], [s for *_, s in exact[q]], atol=1e-5)


@pytest.mark.parametrize("tiny_index", [2], indirect=True)  # one nbits is enough here
def test_cli_search_engine_warp(tiny_index, tiny_checkpoint, capsys):
    """`colbert-jax search --engine warp` answers as Searcher(engine="warp")."""
    from colbert_jax.cli import main

    argv = ["search", "--index", str(tiny_index), "--checkpoint", str(tiny_checkpoint), "--format", "jsonl"]
    assert main([*argv, "--engine", "warp", "--k", "5", QUERIES[0]]) == 0
    got = [(r["pid"], r["score"]) for r in json.loads(capsys.readouterr().out.splitlines()[0])["results"]]
    searcher = colbert_jax.Searcher(tiny_index, checkpoint=tiny_checkpoint, engine="warp", truncate=True)
    want = [(p, s) for p, _, s in searcher.search(QUERIES[0], k=5)]
    assert [p for p, _ in got] == [p for p, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-4)
