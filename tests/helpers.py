"""Test helpers: fixture paths and tiny random checkpoints in the exact ColBERT format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "foundation"
BACKBONE_FIXTURES = Path(__file__).parent / "fixtures" / "backbones"
PYLATE_FIXTURES = Path(__file__).parent / "fixtures" / "pylate"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_tiny_checkpoint(
    path: Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    dim: int = 16,
    doc_maxlen: int = 64,
    query_maxlen: int = 16,
    **settings,
) -> Path:
    """Writes a random BERT ColBERT checkpoint (HF layout, safetensors) with MiniLM's tokenizer."""
    from safetensors.numpy import save_file

    from colbert_jax.default_model import minilm_dir

    rng = np.random.default_rng(seed)
    vocab = 30522

    def w(*shape):
        return rng.normal(0.0, 0.2, shape).astype(np.float32)

    state = {
        "bert.embeddings.word_embeddings.weight": w(vocab, hidden),
        "bert.embeddings.position_embeddings.weight": w(512, hidden),
        "bert.embeddings.token_type_embeddings.weight": w(2, hidden),
        "bert.embeddings.LayerNorm.weight": 1 + w(hidden),
        "bert.embeddings.LayerNorm.bias": w(hidden),
        "linear.weight": w(dim, hidden),
    }
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            state[p + name + ".weight"], state[p + name + ".bias"] = w(hidden, hidden), w(hidden)
        state[p + "intermediate.dense.weight"], state[p + "intermediate.dense.bias"] = (
            w(intermediate, hidden),
            w(intermediate),
        )
        state[p + "output.dense.weight"], state[p + "output.dense.bias"] = w(hidden, intermediate), w(hidden)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[p + name + ".weight"], state[p + name + ".bias"] = 1 + w(hidden), w(hidden)

    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["HF_ColBERT"],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }
    (path / "config.json").write_text(json.dumps(config))
    meta = {"dim": dim, "doc_maxlen": doc_maxlen, "query_maxlen": query_maxlen, **settings}
    (path / "artifact.metadata").write_text(json.dumps(meta))
    for f in TOKENIZER_FILES:
        shutil.copyfile(minilm_dir() / f, path / f)
    return path


def assert_same_ranking_up_to_ties(a, b, atol: float) -> None:
    """Two rankings [(pid, rank, score)] are the same but for the order of passages whose scores differ by
    float summation order (two paths, e.g. a native kernel and XLA, sum in different orders: a near-tie
    may swap), scores within atol."""
    np.testing.assert_allclose([s for *_, s in a], [s for *_, s in b], rtol=0, atol=atol)
    score_a, score_b = {p: s for p, _, s in a}, {p: s for p, _, s in b}
    for pid, score in score_a.items():
        if pid in score_b:
            assert abs(score_b[pid] - score) <= atol, (pid, score, score_b[pid])
        else:  # cut at k: a tie with the other ranking's last passage
            assert abs(score - b[-1][2]) <= atol, (pid, score, b[-1])
    for (pa, _, sa), (pb, _, sb) in zip(a, b):
        assert pa == pb or abs(score_a[pa] - score_a.get(pb, sb)) <= 2 * atol, (pa, pb, sa, sb)
