"""One process of a test's training run that stops early, as an interrupted run would:

    python -m tests.training.train_process OUT STOP_AFTER [KEY=VALUE ...]

trains configs/tiny.yaml with those overrides, returning after step STOP_AFTER (its checkpoint saved). Under
scripts/launch_local.sh it is one of several processes.
"""

import sys
from pathlib import Path

from colbert_jax import distributed


def main(out: str, stop_after: str, *overrides: str) -> None:
    distributed.initialize()  # before anything else touches JAX
    from colbert_jax.training.config import TrainConfig
    from colbert_jax.training.loop import train

    config = TrainConfig.load(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", list(overrides))
    train(config, out, stop_after=int(stop_after), show_progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
