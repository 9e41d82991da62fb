"""Train a ColBERT model: python scripts/train.py --config configs/tiny.yaml --out runs/tiny [--set lr=1e-5 --set ...]

Several processes (hosts) train together when COLBERT_JAX_COORDINATOR=host:port, COLBERT_JAX_NUM_PROCESSES
and COLBERT_JAX_PROCESS_ID are set in each one's environment (README, "Several hosts"); on one machine,
`scripts/launch_local.sh 2 python scripts/train.py ...` sets them. Same as `colbert-jax train`.
"""

import sys

from colbert_jax import distributed

if __name__ == "__main__":
    distributed.initialize()  # before anything else touches JAX
    from colbert_jax.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
