"""Batched CPU search by `plaid.search_fused` (stages 1-6 in one program, each query's centroid scores computed
once, its IVF-entry width guessed from earlier batches): the same rankings and scores as the two programs
(`cells`, then `search_streamed`), whether every query fits the guessed width, none does (each is ranked again
by the two programs), or some do; filtered searches too. Lowered for cuda/tpu, it runs without the native
kernels."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import colbert_jax
from colbert_jax.search import plaid
from tests.conftest import COLLECTIONS
from tests.kernels.lowering import lower

QUERIES = [line.split("\t")[1] for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines()[:96]]


@pytest.fixture(scope="module")
def searcher(real_index, minilm_model):
    return colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)


def _two_programs(searcher, queries, k, **kwargs):
    """Rankings with no width guess recorded: every batch by `cells` + `search_streamed`."""
    engine = searcher._plaid_engine()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plaid.PlaidEngine, "_guess_entries", lambda *a, **kw: None)
        engine._entries_guess.clear()
        return searcher.search_all(queries, k=k, **kwargs).todict()


def _fused(searcher, queries, k, guess=None, **kwargs):
    """Rankings by `search_fused` for every batch (the guess set beforehand), and how many batches and queries
    it ranked, and how many it left to the two programs."""
    engine = searcher._plaid_engine()
    calls = []
    original = plaid.PlaidEngine.fused

    def spy(self, Q, real, params, max_entries, allowed=None):
        calls.append((int(real.sum()), max_entries))
        return original(self, Q, real, params, max_entries, allowed)

    ncells = searcher._params(k, searcher.config).ncells
    key = (min(ncells, searcher.index.num_partitions), searcher.config.query_maxlen)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plaid.PlaidEngine, "fused", spy)
        if guess is not None:
            mp.setattr(plaid.PlaidEngine, "_guess_entries", lambda *a, **kw: None)
            engine._entries_guess[key] = guess
        result = searcher.search_all(queries, k=k, batch_size=32, **kwargs).todict()
    engine._entries_guess.pop(key, None)
    return result, calls


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for q in a:
        assert [p for p, _, _ in a[q]] == [p for p, _, _ in b[q]], q
        np.testing.assert_allclose([s for *_, s in a[q]], [s for *_, s in b[q]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [10, 100])
def test_fused_equals_the_two_programs(searcher, k):
    want = _two_programs(searcher, QUERIES, k)
    searcher.search_all(QUERIES[:32], k=k, batch_size=32)  # records a guess from a first batch
    got, calls = _fused(searcher, QUERIES, k)
    assert len(calls) == 3 and sum(n for n, _ in calls) == len(QUERIES)  # every batch went through it
    _assert_same(got, want)


def test_queries_that_outgrow_the_guess_are_ranked_again(searcher):
    want = _two_programs(searcher, QUERIES, 10)
    # A width of one entry: every query overflows and is ranked again by the two programs.
    got, calls = _fused(searcher, QUERIES, 10, guess=1)
    assert calls and all(width == 1 for _, width in calls)
    _assert_same(got, want)
    # The index's bound: no query overflows.
    bound = searcher._plaid_engine().max_entries(searcher._params(10, searcher.config).ncells, 32)
    got, _ = _fused(searcher, QUERIES, 10, guess=bound)
    _assert_same(got, want)


def test_part_of_a_batch_outgrows_the_guess(searcher):
    """A width between the queries' needs: some are ranked by the fused program, the rest again."""
    engine = searcher._plaid_engine()
    params = searcher._params(10, searcher.config)
    Q = searcher.encode(QUERIES[:32])
    _, _, n_entries = engine.cells(Q, params, 32, False)
    needs = n_entries.max(axis=0)
    guess = 1 << (int(np.median(needs)).bit_length() - 1)  # a power of two below half of them
    assert (needs > guess).any() and (needs <= guess).any()
    want = _two_programs(searcher, QUERIES[:32], 10)
    got, calls = _fused(searcher, QUERIES[:32], 10, guess=guess)
    assert calls == [(32, guess)]
    _assert_same(got, want)


def test_filtered_search_through_the_fused_program(searcher):
    allowed = list(range(0, 2000, 3))
    want = _two_programs(searcher, QUERIES[:64], 10, pids=allowed)
    searcher.search_all(QUERIES[:32], k=10, batch_size=32)
    got, calls = _fused(searcher, QUERIES[:64], 10, pids=allowed)
    assert len(calls) == 2
    _assert_same(got, want)
    assert all(pid % 3 == 0 for ranking in got.values() for pid, _, _ in ranking)


def _forget_widths(searcher, k=10):
    """Clears the width guess and the needs it is computed from; returns the guess's key."""
    engine = searcher._plaid_engine()
    key = (min(searcher._params(k, searcher.config).ncells, searcher.index.num_partitions), 32)
    engine._entries_guess.pop(key, None)
    engine._entries_needed.pop(key, None)
    return key


def test_a_single_query_does_not_reset_the_width_batches_use(searcher):
    """The width comes from the latest queries' needs, not from the last call's: one query alone used to set it
    to its own needs, so the next batch compiled a new width and ranked most of its queries twice."""
    engine = searcher._plaid_engine()
    params = searcher._params(10, searcher.config)
    key = _forget_widths(searcher)
    _, _, n_entries = engine.cells(searcher.encode(QUERIES[:64]), params, 32, False)
    needs = n_entries.max(axis=0)
    searcher.search_all(QUERIES[:64], k=10, batch_size=64)
    width = engine._entries_guess[key]
    assert width == plaid.pow2(int(np.quantile(needs, 0.9, method="higher")))
    smallest = int(np.argmin(needs))
    assert plaid.pow2(int(needs[smallest])) < width  # what the old rule would have set
    searcher.search(QUERIES[smallest], k=10)
    assert engine._entries_guess[key] == width
    _forget_widths(searcher)


def test_the_first_search_all_sizes_the_width_before_batches_run_in_flight(searcher):
    """With no width recorded, the first batch runs alone (by the two programs) and records one; the batches
    after it, in flight together, all go through the fused program, with the same rankings."""
    want = _two_programs(searcher, QUERIES, 10, batch_size=16)
    _forget_widths(searcher)
    calls = []
    original = plaid.PlaidEngine.fused

    def spy(self, Q, real, params, max_entries, allowed=None):
        calls.append(int(real.sum()))
        return original(self, Q, real, params, max_entries, allowed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plaid.PlaidEngine, "fused", spy)
        got = searcher.search_all(QUERIES, k=10, batch_size=16).todict()
    assert sorted(calls) == [16] * (len(QUERIES) // 16 - 1)
    _assert_same(got, want)
    _forget_widths(searcher)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_fused_program_lowers_for_accelerators_without_the_native_kernels(searcher, platform):
    engine = searcher._plaid_engine()
    params = searcher._params(10, searcher.config)
    Q = searcher.encode(QUERIES[:4])
    args = (Q, np.ones(4, bool), np.float32(params.threshold), engine.arrays)
    statics = dict(mesh=engine.mesh, ncells=params.ncells, max_entries=1024, ndocs=params.ndocs, k=10, nbits=2)
    program = plaid.search_fused.lower(*args, **statics).as_text()
    assert "colbert_jax_centroid_interaction" in program and "colbert_jax_exact_maxsim" in program  # on the CPU
    text = lower(functools.partial(plaid.search_fused, **statics), *args, platform=platform, name="search_fused")
    assert "colbert_jax_" not in text
