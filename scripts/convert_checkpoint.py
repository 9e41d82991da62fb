"""Convert a ColBERT checkpoint between the PyTorch ColBERTv2 layout and colbert-jax's own.

    python scripts/convert_checkpoint.py SRC DST [--to torch|jax] [--overwrite]

SRC: a PyTorch ColBERTv2 directory (model.safetensors or pytorch_model.bin, read without torch), a Hub
id such as colbert-ir/colbertv2.0 (when online), or a colbert-jax directory. Same as `colbert-jax convert`.
"""

import sys

from colbert_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
