"""The device programs lower for GPU and TPU from this CPU machine (`jax.export`, see tests/kernels/lowering.py):

- the search, stage by stage, exactly as `Searcher` calls it on a GPU (its calls are recorded on the real
  test index, a batch of queries, k=10 and 100), with implementation "pallas" (Triton kernels inside) and
  "jnp", for `cuda`; the "jnp" search also for `tpu` (where Searcher uses it: Pallas TPU kernels cannot be
  lowered without a TPU, and these kernels are Triton's);
- the query and document encoders (the document encoder and the codec's `compress` are the indexing encode
  step), for `cuda` and `tpu`;
- the training step, sharded over a 2 x 2 (data, model) mesh of 4 (fake) devices, for `cuda` and `tpu`;
- the WARP engine's stages and the int8 query encoder, for `cuda` and `tpu`.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import colbert_jax
from colbert_jax.indexing import codec as codec_module
from colbert_jax.search import plaid
from tests.kernels.lowering import TRITON_CALL, assert_triton_kernel, lower

REPO = Path(__file__).resolve().parents[1]
QUERIES = [
    "read a file line by line",
    "compute the greatest common divisor",
    "parse command line arguments",
    "join two paths",
    "current time in seconds",
    "sort a list in place",
    "random integer in a range",
    "encode bytes as base64",
]
STAGES = ("cells", "candidates", "select", "score")


@pytest.fixture(scope="module")
def search_calls(real_index, minilm_model) -> dict:
    """{(implementation, k): [(stage, array args, static kwargs), ...]}: what Searcher passed to each jitted
    stage. The searcher is told it is not on CPU, so it sizes its batches as on a GPU (vmapped query chunks).
    The recorded "pallas" calls are executed with the jnp twins (same results; interpreted kernels are slow
    here): the recording keeps the arguments Searcher gave."""
    calls: dict = {}
    originals = {stage: getattr(plaid, stage) for stage in STAGES}
    current: list = []

    def recorder(stage):
        def run(*args, **kwargs):
            current.append((stage, args, dict(kwargs)))
            if "kernels" in kwargs:
                kwargs["kernels"] = "jnp"
            return originals[stage](*args, **kwargs)

        return run

    with pytest.MonkeyPatch.context() as mp:
        for stage in STAGES:
            mp.setattr(plaid, stage, recorder(stage))
        for implementation in ("pallas", "jnp"):
            searcher = colbert_jax.Searcher(
                real_index, checkpoint=minilm_model, implementation=implementation, truncate=True
            )
            searcher._cpu = False  # size and batch the stages as on an accelerator
            Q = searcher.encode(QUERIES)
            for k in (10, 100):
                current.clear()
                ranking = searcher.search_all(list(Q), k=k)
                assert len(ranking.todict()) == len(QUERIES)
                calls[implementation, k] = list(current)
    return calls


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("implementation", ["pallas", "jnp"])
def test_search_lowers_for_cuda(search_calls, implementation, k):
    calls = search_calls[implementation, k]
    assert {stage for stage, _, _ in calls} == set(STAGES)
    for stage, args, kwargs in calls:
        fn = jax.jit(functools.partial(getattr(plaid, stage), **kwargs))
        text = lower(fn, *args, platform="cuda", name=f"search stage {stage} ({implementation}, k={k})")
        if implementation == "pallas" and stage == "select":
            assert kwargs["kernels"] == "pallas"
            assert_triton_kernel(text, "colbert_centroid_interaction")
        elif implementation == "pallas" and stage == "score":
            assert_triton_kernel(text, "colbert_maxsim")
        else:
            assert TRITON_CALL not in text


@pytest.mark.parametrize("k", [10, 100])
def test_jnp_search_lowers_for_tpu(search_calls, k):
    for stage, args, kwargs in search_calls["jnp", k]:
        fn = jax.jit(functools.partial(getattr(plaid, stage), **kwargs))
        lower(fn, *args, platform="tpu", name=f"search stage {stage} (jnp, k={k})")


def test_pallas_search_does_not_lower_for_tpu(search_calls):
    """On TPU the search must use "jnp": the Triton kernels have no TPU lowering, and that is an error, not a
    silent substitution."""
    stage, args, kwargs = next(c for c in search_calls["pallas", 10] if c[0] == "score")
    with pytest.raises(AssertionError, match="does not lower for tpu"):
        lower(jax.jit(functools.partial(plaid.score, **kwargs)), *args, platform="tpu", name="score (pallas)")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_encoders_and_indexing_step_lower(minilm_model, real_index, platform):
    model = minilm_model
    ids, mask = model.query_tokenizer.tensorize(QUERIES)
    lower(model._query_fn, model._query_params, ids, mask, platform=platform, name="query encoder")
    ids, mask = model.doc_tokenizer.tensorize(["a passage " * 60] * 32)
    skiplist = model._skiplist
    text = lower(model._doc_fn, model.params, ids, mask, skiplist, platform=platform, name="document encoder")
    # float32 compute is float32 on accelerators too (not TPU bfloat16 passes or GPU TensorFloat-32)
    dots = re.findall(r"stablehlo\.dot_general .*", text)
    assert len(dots) >= 6  # a layer (scanned: its body once) and the projection
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in dots), [d for d in dots if "HIGHEST" not in d][:2]
    bf16 = minilm_model.replace_config(compute_dtype="bfloat16")
    text = lower(bf16._doc_fn, bf16.params, ids, mask, skiplist, platform=platform, name="bfloat16 document encoder")
    assert "HIGHEST" not in text, "bfloat16 compute must keep the platform's fast products"
    index = colbert_jax.Index.open(real_index)
    c = index.codec
    embs = jax.ShapeDtypeStruct((4096, c.dim), np.float32)
    compress = jax.jit(functools.partial(codec_module.compress, nbits=c.nbits))
    lower(compress, embs, c.centroids, c.bucket_cutoffs, platform=platform, name="codec.compress")


def lower_train_step() -> None:
    """Run in a process with 4 fake CPU devices: the training step over a 2 x 2 (data, model) mesh."""
    sys.path.insert(0, str(REPO / "scripts"))
    from device_bench import train_program

    from colbert_jax.modeling.bert import BertConfig
    from colbert_jax.training.config import MeshSettings
    from colbert_jax.training.sharding import make_mesh

    assert jax.device_count() == 4
    mesh = make_mesh(MeshSettings(data=2, model=2))
    bert = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    step, _, state, batch, _ = train_program(
        bert, dim=32, queries=4, nway=2, query_len=32, doc_len=48, mesh=mesh, dtype="bfloat16"
    )
    for platform in ("cuda", "tpu"):
        text = lower(step, state, batch, platform=platform, name="training step")
        assert "num_partitions = 4" in text, "the step is not partitioned over 4 devices"
        # Shardy names the mesh axes that split the batch and the heads/MLP (GSPMD, if a JAX uses it, does not).
        assert ('{"data"}' in text and '{"model"}' in text) or "mhlo.sharding" in text, "no data/model shardings"
        print(f"training step lowers for {platform}")


def test_sharded_training_step_lowers():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    code = "from tests.test_lowering import lower_train_step; lower_train_step()"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "training step lowers for cuda" in run.stdout and "training step lowers for tpu" in run.stdout


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_warp_engine_and_int8_query_encoder_lower(real_index, minilm_model, platform):
    """The WARP engine's two stages, as `Searcher(engine="warp")` calls them, and the int8 query encoder."""
    from colbert_jax.search import warp

    calls: list = []
    originals = {stage: getattr(warp, stage) for stage in ("probe", "search")}

    def recorder(stage):
        def run(*args, **kwargs):
            calls.append((stage, args, dict(kwargs)))
            return originals[stage](*args, **kwargs)

        return run

    with pytest.MonkeyPatch.context() as mp:
        for stage in originals:
            mp.setattr(warp, stage, recorder(stage))
        searcher = colbert_jax.Searcher(real_index, checkpoint=minilm_model, engine="warp", truncate=True)
        assert len(searcher.search_all(QUERIES, k=10).todict()) == len(QUERIES)
    assert {stage for stage, _, _ in calls} == {"probe", "search"}
    for stage, args, kwargs in calls:
        fn = jax.jit(functools.partial(originals[stage], **kwargs))
        lower(fn, *args, platform=platform, name=f"warp {stage}")
    int8 = minilm_model.replace_config(query_quantization="int8")
    ids, mask = int8.query_tokenizer.tensorize(QUERIES)
    lower(int8._query_fn, int8._query_params, ids, mask, platform=platform, name="int8 query encoder")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_maxsim_scores_float32_in_float32(platform):
    """`colbert_score` on float32 vectors keeps float32 products on accelerators; bfloat16 vectors keep the
    platform's fast products."""
    for dtype, exact in ((np.float32, True), (jnp.bfloat16, False)):
        Q, D = jax.ShapeDtypeStruct((2, 32, 128), dtype), jax.ShapeDtypeStruct((2, 50, 128), dtype)
        mask = jax.ShapeDtypeStruct((2, 50), np.bool_)
        text = lower(colbert_jax.colbert_score, Q, D, mask, platform=platform, name=f"colbert_score ({dtype})")
        assert ("precision = [HIGHEST, HIGHEST]" in text) == exact
