"""colbert_score: MaxSim semantics (mask fill -9999, broadcast of one query) against a numpy oracle."""

import numpy as np
import pytest

from colbert_jax import colbert_score


def oracle(Q, D, mask):
    out = []
    for b in range(D.shape[0]):
        q = Q[0] if Q.shape[0] == 1 else Q[b]
        s = D[b] @ q.T  # [Ld, Lq]
        s[~mask[b]] = -9999.0
        out.append(s.max(axis=0).sum())
    return np.array(out, np.float32)


@pytest.mark.parametrize("nq", [1, 5])
def test_matches_oracle(nq):
    rng = np.random.default_rng(0)
    Q = rng.normal(size=(nq, 7, 16)).astype(np.float32)
    D = rng.normal(size=(5, 11, 16)).astype(np.float32)
    mask = rng.random((5, 11)) > 0.3
    mask[:, 0] = True
    np.testing.assert_allclose(np.asarray(colbert_score(Q, D, mask)), oracle(Q, D, mask), rtol=1e-5, atol=1e-4)


def test_masked_tokens_never_win():
    Q = np.ones((1, 2, 4), np.float32)
    D = np.stack([np.full((3, 4), 5.0), np.full((3, 4), -1.0)]).astype(np.float32)
    mask = np.array([[False, False, False], [True, False, False]])
    scores = np.asarray(colbert_score(Q, D, mask))
    assert scores[0] == pytest.approx(-9999.0 * 2) and scores[1] == pytest.approx(-8.0)
    np.testing.assert_allclose(np.asarray(colbert_score(Q, D)), [40.0, -8.0])  # no mask: all tokens count


def test_shape_errors():
    Q = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="must be 1 or equal"):
        colbert_score(Q, np.zeros((3, 5, 4), np.float32))
    with pytest.raises(ValueError, match="dimension mismatch"):
        colbert_score(Q, np.zeros((2, 5, 8), np.float32))
    with pytest.raises(ValueError, match="D_mask shape"):
        colbert_score(Q, np.zeros((2, 5, 4), np.float32), np.ones((2, 4), bool))
