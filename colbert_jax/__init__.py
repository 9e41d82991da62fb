"""colbert-jax: ColBERTv2 and PLAID in JAX.

text -> tokens (`tokenization`) -> embeddings (`model`, `modeling/`) -> scores (`scoring`).
"""

from colbert_jax.checkpoint import load_checkpoint
from colbert_jax.config import ColBERTConfig
from colbert_jax.model import ColBERTModel
from colbert_jax.scoring import colbert_score

__all__ = ["ColBERTConfig", "ColBERTModel", "colbert_score", "load_checkpoint"]
__version__ = "0.1.0"
