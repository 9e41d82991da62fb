"""Token ids and masks equal colbert-ai's for varied text (fixtures from the reference)."""

import numpy as np
import pytest

from colbert_jax.config import ColBERTConfig
from colbert_jax.default_model import minilm_dir
from colbert_jax.tokenization import DocTokenizer, QueryTokenizer, load_hf_tokenizer
from tests.helpers import FIXTURES

SETTINGS = {
    "default": dict(query_maxlen=32, doc_maxlen=180),
    "short": dict(query_maxlen=8, doc_maxlen=16),
    "attend": dict(query_maxlen=32, doc_maxlen=180, attend_to_mask_tokens=True),
}


@pytest.fixture(scope="module")
def hf():
    return load_hf_tokenizer(minilm_dir())


@pytest.fixture(scope="module")
def ref_tokens():
    return dict(np.load(FIXTURES / "tokens.npz"))


@pytest.mark.parametrize("name", SETTINGS)
def test_query_tokens_match_reference(hf, ref_tokens, texts, name):
    ids, mask = QueryTokenizer(hf, ColBERTConfig(**SETTINGS[name])).tensorize(texts["queries"])
    np.testing.assert_array_equal(ids, ref_tokens[f"{name}_query_ids"])
    np.testing.assert_array_equal(mask, ref_tokens[f"{name}_query_mask"])


@pytest.mark.parametrize("name", SETTINGS)
def test_doc_tokens_match_reference(hf, ref_tokens, texts, name):
    ids, mask = DocTokenizer(hf, ColBERTConfig(**SETTINGS[name])).tensorize(texts["documents"])
    np.testing.assert_array_equal(ids, ref_tokens[f"{name}_doc_ids"])
    np.testing.assert_array_equal(mask, ref_tokens[f"{name}_doc_mask"])


def test_query_layout(hf):
    ids, mask = QueryTokenizer(hf, ColBERTConfig()).tensorize(["what color is amber urine"])
    np.testing.assert_array_equal(ids[0, :8], [101, 1, 2054, 3609, 2003, 8994, 17996, 102])
    assert (ids[0, 8:] == 103).all() and mask[0].tolist() == [1] * 8 + [0] * 24


def test_skiplist_is_punctuation_ids(hf):
    skip = DocTokenizer(hf, ColBERTConfig()).skiplist.tolist()
    assert skip == list(range(999, 1014)) + list(range(1024, 1037)) + list(range(1063, 1067))
    assert DocTokenizer(hf, ColBERTConfig(mask_punctuation=False)).skiplist.size == 0


def test_keep_mask_drops_pad_and_punctuation(hf):
    tok = DocTokenizer(hf, ColBERTConfig())
    ids, _ = tok.tensorize(["Hello, world.", "a"])
    keep = tok.keep_mask(ids)
    assert keep[0].tolist() == [True, True, True, False, True, False, True]  # [CLS] [D] hello , world . [SEP]
    assert keep[1].tolist() == [True, True, True, True, False, False, False]


@pytest.mark.parametrize(
    "bad,err",
    [([], ValueError), ("a query", TypeError), (["ok", 3], TypeError), ([None], TypeError), ({"q": 1}, TypeError)],
)
def test_bad_inputs(hf, bad, err):
    with pytest.raises(err):
        QueryTokenizer(hf, ColBERTConfig()).tensorize(bad)
    with pytest.raises(err):
        DocTokenizer(hf, ColBERTConfig()).tensorize(bad)
