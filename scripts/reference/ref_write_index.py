"""Write compressed embeddings as a colbert-ai index, with colbert-ai's own classes (for bench_scale.py).
Run with the reference venv's python:

    ref_write_index.py --arrays DIR --index OUT --checkpoint CKPT

DIR holds centroids.npy (float16 [P, dim]), cutoffs.npy, weights.npy, codes.npy (int32), residuals.npy
(uint8) and doclens.npy. One chunk; the IVF is built by colbert-ai's optimize_ivf.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arrays", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--checkpoint", required=True)
    args = ap.parse_args()
    import numpy as np
    import torch
    from colbert.indexing.codecs.residual import ResidualCodec
    from colbert.indexing.codecs.residual_embeddings import ResidualEmbeddings
    from colbert.indexing.utils import optimize_ivf
    from colbert.infra import ColBERTConfig

    src, out = Path(args.arrays), Path(args.index)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    centroids = torch.from_numpy(np.load(src / "centroids.npy").astype(np.float32))
    cutoffs = torch.from_numpy(np.load(src / "cutoffs.npy"))
    weights = torch.from_numpy(np.load(src / "weights.npy"))
    codes = torch.from_numpy(np.load(src / "codes.npy"))
    residuals = torch.from_numpy(np.load(src / "residuals.npy"))
    doclens = np.load(src / "doclens.npy").tolist()
    nbits = int(np.log2(len(weights)))
    config = ColBERTConfig(
        checkpoint=args.checkpoint,
        nbits=nbits,
        dim=centroids.shape[1],
        doc_maxlen=180,
        query_maxlen=32,
        index_path=str(out),
    )
    ResidualCodec(
        config=config,
        centroids=centroids,
        avg_residual=torch.tensor(0.0),
        bucket_cutoffs=cutoffs,
        bucket_weights=weights,
    ).save(index_path=str(out))
    ResidualEmbeddings(codes, residuals).save(str(out / "0"))
    (out / "doclens.0.json").write_text(json.dumps(doclens))
    (out / "0.metadata.json").write_text(
        json.dumps(
            {"passage_offset": 0, "num_passages": len(doclens), "num_embeddings": len(codes), "embedding_offset": 0}
        )
    )
    sorted_codes = codes.long().sort()
    optimize_ivf(
        sorted_codes.indices, torch.bincount(sorted_codes.values, minlength=len(centroids)), str(out), verbose=0
    )
    meta = {
        "config": config.export(),
        "num_chunks": 1,
        "num_partitions": len(centroids),
        "num_embeddings": len(codes),
        "avg_doclen": len(codes) / len(doclens),
    }
    for name in ("metadata.json", "plan.json"):
        (out / name).write_text(json.dumps(meta, indent=4))
    print("RESULT " + json.dumps({"passages": len(doclens), "embeddings": len(codes)}))


if __name__ == "__main__":
    sys.exit(main())
