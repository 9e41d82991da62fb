"""colbert-jax: ColBERTv2 and PLAID in JAX.

text -> tokens (`tokenization`) -> embeddings (`model`, `modeling/`) -> codes (`indexing/codec`)
-> index (`indexing/build`, `index`) -> scores (`scoring`).
"""

from colbert_jax.checkpoint import load_checkpoint
from colbert_jax.config import ColBERTConfig
from colbert_jax.index import Index
from colbert_jax.indexing.build import Indexer
from colbert_jax.interop import import_colbert_index
from colbert_jax.model import ColBERTModel
from colbert_jax.scoring import colbert_score
from colbert_jax.search.ranking import Ranking
from colbert_jax.search.rerank import rerank
from colbert_jax.search.searcher import Searcher

__all__ = [
    "ColBERTConfig",
    "ColBERTModel",
    "Index",
    "Indexer",
    "Ranking",
    "Searcher",
    "colbert_score",
    "import_colbert_index",
    "load_checkpoint",
    "rerank",
]
__version__ = "0.1.0"
