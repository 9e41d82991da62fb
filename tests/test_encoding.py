"""Bucketed, batched encoding: results independent of batching, bounded compiles, flat doc form."""

import os
import subprocess
import sys
import textwrap

import numpy as np

from colbert_jax.model import QUERY_BATCH_STEP, batch_bucket, batch_buckets


def test_batch_bucket():
    assert [batch_bucket(n, 64, 1) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert batch_bucket(3, 48, 1) == 4 and batch_bucket(40, 48, 1) == 48
    assert [batch_bucket(n, 64, 8) for n in (1, 9, 64)] == [8, 16, 64]


def test_query_batches_past_the_step_pad_to_its_multiples():
    step = QUERY_BATCH_STEP
    assert step == 16
    sizes = [batch_bucket(n, 64, 1, step) for n in (1, 3, 9, 16, 17, 33, 46, 49, 64)]
    assert sizes == [1, 4, 16, 16, 32, 48, 48, 64, 64]
    assert [batch_bucket(n, 64, 8, step) for n in (1, 9, 33)] == [8, 16, 48]
    assert batch_buckets(64, step) == [1, 2, 4, 8, 16, 32, 48, 64]  # what warm_up compiles
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(40, step) == [1, 2, 4, 8, 16, 32, 40]
    for n in range(1, 65):
        assert n <= batch_bucket(n, 64, 1, step) in batch_buckets(64, step)


def test_results_do_not_depend_on_batching(tiny_model, texts):
    docs = texts["documents"]
    D_all, m_all = tiny_model.encode_docs(docs, bsize=64)
    D_small, m_small = tiny_model.encode_docs(docs, bsize=3)
    np.testing.assert_array_equal(m_all, m_small)
    np.testing.assert_allclose(D_all, D_small, atol=2e-6)
    for i in (0, 8, 12):  # alone: different padding, same vectors
        D_one, m_one = tiny_model.encode_docs([docs[i]])
        n = m_one.shape[1]
        np.testing.assert_allclose(D_one[0], D_all[i, :n], atol=2e-6)
        assert not m_all[i, n:].any()
    Q_all = tiny_model.encode_queries(texts["queries"])
    Q_one = tiny_model.encode_queries(texts["queries"][3:4])
    np.testing.assert_allclose(Q_one[0], Q_all[3], atol=2e-6)


def test_flat_form_matches_padded(tiny_model, texts):
    docs = texts["documents"]
    D, mask = tiny_model.encode_docs(docs)
    flat, doclens = tiny_model.encode_docs_flat(docs, bsize=4)
    np.testing.assert_array_equal(doclens, mask.sum(1))
    np.testing.assert_allclose(flat, D[mask], atol=2e-6)


def test_compiles_are_bounded(tiny_checkpoint):
    import colbert_jax

    model = colbert_jax.load_checkpoint(tiny_checkpoint, doc_maxlen=64)
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for n in range(1, 40):  # 39 calls with varied batch sizes and lengths
        docs = [" ".join(rng.choice(words, rng.integers(0, 80))) for _ in range(n)]
        model.encode_docs(docs, bsize=16)
    # lengths bucket to multiples of 16 up to 64 (4 widths), batch sizes to 1, 2, 4, 8, 16 (5 sizes).
    assert model._doc_fn._cache_size() <= 4 * 5


def test_eight_devices_equal_one(tiny_checkpoint, texts):
    """Data-parallel encoding over 8 fake CPU devices gives the single-device results."""
    script = textwrap.dedent(f"""
        import os, sys, numpy as np
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, colbert_jax
        assert len(jax.devices()) == 8
        m = colbert_jax.load_checkpoint({str(tiny_checkpoint)!r})
        texts = {texts["documents"]!r}
        D, mask = m.encode_docs(texts, bsize=4)
        Q = m.encode_queries({texts["queries"]!r})
        np.savez(sys.argv[1], D=D, mask=mask, Q=Q, n=m.n_devices)
    """)
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"eight_{os.getpid()}.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script, out], check=True, env=env)
    got = np.load(out)
    assert int(got["n"]) == 8
    import colbert_jax

    one = colbert_jax.load_checkpoint(tiny_checkpoint)
    D, mask = one.encode_docs(texts["documents"], bsize=4)
    np.testing.assert_array_equal(got["mask"], mask)
    np.testing.assert_allclose(got["D"], D, atol=2e-6)
    np.testing.assert_allclose(got["Q"], one.encode_queries(texts["queries"]), atol=2e-6)
