"""The training step: a pure `train_step(state, batch) -> (state, metrics)`, and the optimizer.

Optimizer, as colbert-ai: gradient clipping to a global norm of `max_grad_norm` (2.0), then AdamW (torch
defaults b1=0.9, b2=0.999, eps=1e-8, decoupled weight decay 0.01 on every parameter). Learning rate:
constant, or with `warmup` set, transformers' linear warmup from 0 over `warmup` steps and linear decay
to 0 at `maxsteps` (step t uses the rate of t completed steps). While `step < warmup_bert`, the BERT
backbone's updates are zeroed (colbert-ai freezes it).

Gradient accumulation: the batch arrives as `accumsteps` micro-batches on a leading axis; a `lax.scan`
adds their gradients of loss / accumsteps (colbert-ai's backward per micro-batch) before one update.
Mixed precision: parameters (and optimizer state) stay float32; `compute_dtype` sets the matmuls' dtype.

The attention key biases' gradients are set to their exact value, zero: q.(k + b) shifts all of a query's
logits by q.b, which softmax ignores, so backprop yields only rounding noise there, different for every
summation order (device and process count); Adam would scale it up to steps of ~lr, and N processes
would no longer train as one does. colbert-ai applies that noise; the difference is noise only.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from colbert_jax.config import ColBERTConfig
from colbert_jax.modeling.colbert import ColBERTEncoder, embed_docs, embed_queries
from colbert_jax.training.config import TrainSettings
from colbert_jax.training.losses import ce_loss, distillation_loss, in_batch_loss, pair_scores

__all__ = ["TrainState", "make_optimizer", "learning_rate", "loss_fn", "train_step", "zero_key_bias_grads"]


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: completed optimizer steps
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] PRNG key for dropout


def learning_rate(colbert: ColBERTConfig):
    """colbert-ai's schedule (transformers' get_linear_schedule_with_warmup when `warmup` is set)."""
    if colbert.warmup is None:
        return colbert.lr
    warmup = max(colbert.warmup, 0)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, colbert.lr, max(warmup, 1)),
            optax.linear_schedule(colbert.lr, 0.0, max(colbert.maxsteps - warmup, 1)),
        ],
        boundaries=[warmup],
    )


def make_optimizer(colbert: ColBERTConfig, train: TrainSettings) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm),
        optax.adamw(
            learning_rate(colbert),
            b1=train.adam_b1,
            b2=train.adam_b2,
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
        ),
    )


def loss_fn(
    params,
    batch: dict[str, jax.Array],
    rng: jax.Array | None,
    *,
    module: ColBERTEncoder,
    colbert: ColBERTConfig,
    pad_id: int,
    skiplist: jax.Array,
    distill: bool,
    query_pad_id: int | None = None,
) -> tuple[jax.Array, dict]:
    """Loss of one micro-batch: q_ids/q_mask [b, Lq], d_ids/d_mask [b * nway, Ld], scores [b, nway].

    `query_pad_id` (default `pad_id`) is the query id whose rows are zeroed: `ColBERTModel.query_pad_id`, -1 for
    PyLate checkpoints (whose tokenizers may pad with [MASK], and whose queries keep every position).
    """
    nway = colbert.nway
    deterministic = rng is None
    rq = rd = None
    if not deterministic:
        rq, rd = jax.random.split(rng)
        rq, rd = {"dropout": rq}, {"dropout": rd}
    Q = embed_queries(
        module,
        params,
        batch["q_ids"],
        batch["q_mask"],
        pad_id=pad_id if query_pad_id is None else query_pad_id,
        deterministic=deterministic,
        rngs=rq,
    )
    D, D_mask = embed_docs(
        module, params, batch["d_ids"], batch["d_mask"], skiplist, pad_id=pad_id, deterministic=deterministic, rngs=rd
    )
    scores = pair_scores(Q, D, D_mask, nway, colbert.similarity)
    if distill and not colbert.ignore_scores:
        loss = distillation_loss(scores, batch["scores"], colbert.distillation_alpha)
    else:
        loss = ce_loss(scores)
    metrics = {"loss_main": loss, "positive_first": (scores.argmax(axis=1) == 0).mean()}
    if colbert.use_ib_negatives:
        ib = in_batch_loss(Q, D, D_mask, nway)
        metrics["loss_ib"] = ib
        loss = loss + ib
    return loss, metrics


def zero_key_bias_grads(grads):
    """`grads` with the attention key biases' entries zeroed: their true gradient (see the module doc)."""

    def exact(path, g):
        names = tuple(getattr(k, "key", None) for k in path[-3:])  # .../attention/self/key/bias
        return jnp.zeros_like(g) if names == ("self", "key", "bias") else g

    return jax.tree_util.tree_map_with_path(exact, grads)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    module: ColBERTEncoder,
    tx,
    colbert: ColBERTConfig,
    train: TrainSettings,
    pad_id: int,
    skiplist: jax.Array,
    distill: bool,
    query_pad_id: int | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step over `accumsteps` micro-batches (arrays with a leading micro-batch axis)."""
    accum = colbert.accumsteps
    step_rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(
        functools.partial(
            loss_fn,
            module=module,
            colbert=colbert,
            pad_id=pad_id,
            query_pad_id=query_pad_id,
            skiplist=skiplist,
            distill=distill,
        ),
        has_aux=True,
    )

    def micro(grads, xs):
        i, mb = xs
        rng = jax.random.fold_in(step_rng, i) if train.dropout else None
        (loss, metrics), g = grad_fn(state.params, mb, rng)
        grads = jax.tree.map(lambda a, b: a + b / accum, grads, g)
        return grads, {"loss": loss / accum, **metrics}

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, per_micro = jax.lax.scan(micro, zeros, (jnp.arange(accum), batch))
    grads = zero_key_bias_grads(grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if colbert.warmup_bert is not None:  # the backbone stays frozen for the first warmup_bert steps
        frozen = state.step < colbert.warmup_bert
        updates = {**updates, "bert": jax.tree.map(lambda u: jnp.where(frozen, 0.0, u), updates["bert"])}
    params = optax.apply_updates(state.params, updates)
    lr = learning_rate(colbert)
    metrics = {
        "loss": per_micro["loss"].sum(),
        "loss_main": per_micro["loss_main"].mean(),
        "positive_first": per_micro["positive_first"].mean(),
        "grad_norm": grad_norm,
        "lr": lr(state.step) if callable(lr) else jnp.float32(lr),
    }
    if "loss_ib" in per_micro:
        metrics["loss_ib"] = per_micro["loss_ib"].mean()
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics
