"""`train(config, out_dir)`: the training loop, from a checkpoint to an exported ColBERTv2 model.

    out_dir/metrics.jsonl      one JSON object per step (step, loss, grad_norm, lr, examples/s, tokens/s, mfu)
    out_dir/checkpoints/<step> Orbax checkpoints: train state (params, optimizer, step, RNG), each host's data
                               position (Grain iterator state, one file per process)
    out_dir/export/            the final model in the PyTorch ColBERTv2 layout (loads in colbert-ai), or in
                               PyLate's layout when training started from a PyLate checkpoint (ours for an l2
                               model from one: `export_format`)
    out_dir/config.yaml        the resolved configuration
    out_dir/inputs.json        sha256 of the data files and checkpoint the run started from (resume checks them)

`out_dir` must be absent, empty, or an earlier run's directory (which the run resumes, or with
`overwrite=True` deletes and starts over); anything else is refused, so nothing of the user's is replaced.

Where training starts from (in this order):
1. the latest Orbax checkpoint in out_dir/checkpoints (a rerun after a kill resumes exactly: same
   parameters, optimizer state, step, dropout RNG and data position);
2. otherwise `colbert.checkpoint`: a PyTorch ColBERTv2 / PyLate / colbert-jax checkpoint, a plain BERT (a
   fresh projection), or `default` (the packaged MiniLM model). The model trains as it encodes: a PyLate
   checkpoint keeps its Dense layers (`head`), text settings and [MASK]-padded query positions.

Several processes (hosts) train together when COLBERT_JAX_COORDINATOR (host:port),
COLBERT_JAX_NUM_PROCESSES and COLBERT_JAX_PROCESS_ID are set: call `colbert_jax.distributed.initialize()`
before anything else touches JAX (scripts/train.py does). N processes train exactly as one process with
the same global batch would: every step's global batch is the same examples in the same order (data.py),
each process reads only the rows that the mesh places on its devices, dropout keys depend only on the
step, and all processes run the same number of steps. Process 0 writes metrics and the export; the
checkpoint directory must be on a filesystem that every process sees.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from colbert_jax import distributed, io
from colbert_jax.checkpoint import load_checkpoint
from colbert_jax.config import ConfigError
from colbert_jax.distributed import initialize as maybe_initialize_distributed  # the name cli.py imports
from colbert_jax.model import LENGTH_BUCKET, ColBERTModel
from colbert_jax.modeling.colbert import ColBERTEncoder
from colbert_jax.runtime import enable_compilation_cache
from colbert_jax.training.config import TrainConfig
from colbert_jax.training.data import DataError, TrainingData
from colbert_jax.training.sharding import batch_sharding, make_mesh, param_shardings, state_shardings
from colbert_jax.training.step import TrainState, make_optimizer, train_step

__all__ = ["train", "maybe_initialize_distributed", "is_run_dir"]

INPUTS = "inputs.json"  # sha256 of the data and checkpoint files the run started from
RUN_ENTRIES = ("config.yaml", INPUTS, "metrics.jsonl", "checkpoints", "export", "tensorboard")

PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v5 lite": 197e12,
    "TPU v4": 275e12,
    "TPU v5p": 459e12,
}


def _resolve_checkpoint(name: str | None) -> str:
    if not name:
        raise ConfigError("colbert.checkpoint is not set: name a checkpoint directory (or 'default')")
    if name == "default":
        from colbert_jax.default_model import default_checkpoint

        return str(default_checkpoint())
    return name


def _flops_per_step(model: ColBERTModel, n_queries: int, query_len: int, n_docs: int, doc_len: int) -> float:
    """Training FLOPs (forward x 3) of the encoder for one step, from the matmul shapes."""
    b = model.bert_config
    h, f, layers = b.hidden_size, b.intermediate_size, b.num_hidden_layers

    def forward(seqs, length):
        head, width = 0, h
        for features, _, _ in model.head or ((model.config.dim, False, "identity"),):
            head, width = head + 2 * width * features, features
        per_token = layers * (2 * 4 * h * h + 2 * 2 * h * f + 2 * 2 * length * h) + head
        return seqs * length * per_token

    return 3.0 * (forward(n_queries, query_len) + forward(n_docs, doc_len))


def _peak_flops(config: TrainConfig) -> float | None:
    if config.train.peak_flops_per_device:
        return config.train.peak_flops_per_device * jax.device_count()
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
    return peak * jax.device_count() if peak else None


def _tokenize(model: ColBERTModel, batch, accum: int, nway: int) -> dict[str, np.ndarray]:
    """One host's batch -> arrays with a leading micro-batch axis [accumsteps, ...]."""
    q_ids, q_mask = model.query_tokenizer.tensorize(batch.queries)
    d_ids, d_mask = model.doc_tokenizer.tensorize(batch.passages)
    width = -(-d_ids.shape[1] // LENGTH_BUCKET) * LENGTH_BUCKET
    if jax.process_count() > 1:  # every host must build arrays of one global shape
        width = int(np.max(multihost_utils.process_allgather(np.int32(width))))
    pad = ((0, 0), (0, width - d_ids.shape[1]))
    d_ids, d_mask = np.pad(d_ids, pad), np.pad(d_mask, pad)
    b = len(batch.queries)
    scores = batch.scores if batch.scores is not None else np.zeros((b, nway), np.float32)
    out = {"q_ids": q_ids, "q_mask": q_mask, "d_ids": d_ids, "d_mask": d_mask, "scores": scores}
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in out.items()}


# Settings a resumed run may change: how the run is kept, logged, laid out on devices and how long it goes on.
# Any other difference from the run's config.yaml would make the resumed steps another training than the
# first ones (and overwrite the record of the settings those used).
RESUMABLE_CHANGES = frozenset(
    {
        "colbert.maxsteps",
        "train.epochs",
        "train.save_every",
        "train.keep_checkpoints",
        "train.log_every",
        "train.export",
        "train.peak_flops_per_device",
        "train.tensorboard",
        "train.mesh",
        "train.logical_axis_rules",
        "train.remat",
    }
)
_PATH_SETTINGS = ("colbert.checkpoint", "colbert.triples", "colbert.queries", "colbert.collection")


def _flat_settings(config: TrainConfig) -> dict[str, Any]:
    flat = {f"{section}.{k}": v for section, values in config.to_dict().items() for k, v in values.items()}
    for key in _PATH_SETTINGS:  # a local file or directory is the same however it was named (a hub id as given)
        if flat.get(key) and os.path.exists(flat[key]):
            flat[key] = os.path.realpath(flat[key])
    return flat


def _check_resume_config(out: Path, config: TrainConfig) -> None:
    """Refuses to resume the run in `out` under settings that differ from its config.yaml (beyond
    RESUMABLE_CHANGES), naming them."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():  # killed before its first save: nothing recorded to hold to
        return
    try:
        saved = _flat_settings(TrainConfig.load(saved_path))
    except ConfigError as e:
        raise ConfigError(f"{out}: cannot resume, its config.yaml does not load ({e})") from None
    new = _flat_settings(config)
    differ = sorted(k for k in saved.keys() | new.keys() if k not in RESUMABLE_CHANGES and saved.get(k) != new.get(k))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} in the run, {new.get(k)!r} now" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ConfigError(
            f"{out} holds a run with other settings ({shown}{more}): resuming would continue it as another "
            "training. Use its settings to resume it, or overwrite=True (--overwrite) to start over"
        )


def _input_checksums(config: TrainConfig) -> dict[str, dict[str, str]]:
    """sha256 of the files a run reads (its data and the checkpoint directory it started from), by setting."""
    c = config.colbert
    named = {"colbert.triples": c.triples, "colbert.queries": c.queries, "colbert.collection": c.collection}
    named["colbert.checkpoint"] = c.checkpoint if c.checkpoint and Path(c.checkpoint).is_dir() else None
    return {k: {"path": str(v), "sha256": io.content_checksum(v)} for k, v in named.items() if v and Path(v).exists()}


def _check_resume_inputs(out: Path, now: dict[str, dict[str, str]]) -> None:
    """Refuses to resume where a file the run read changed since it started: the data order is rebuilt over
    the new file, and the resumed steps would repeat some examples and skip others."""
    saved_path = out / INPUTS
    if not saved_path.is_file():  # a run from before inputs were recorded
        return
    saved = io.read_json(saved_path)
    for key in sorted(saved.keys() & now.keys()):
        if saved[key]["sha256"] != now[key]["sha256"]:
            raise ConfigError(
                f"{out}: cannot resume, {now[key]['path']} ({key}) changed since the run started (sha256 "
                f"{now[key]['sha256'][:12]}..., the run read {saved[key]['sha256'][:12]}...): put back the file "
                "it read, or overwrite=True (--overwrite) to start over"
            )


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run's output directory: only what `train` writes, config or checkpoints
    among it (temporary `.export.*` directories of an interrupted export included)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}

    def written_by_train(name: str) -> bool:
        return name in RUN_ENTRIES or (name.startswith(".") and any(name[1:].startswith(e + ".") for e in RUN_ENTRIES))

    return bool(names & {"config.yaml", "checkpoints"}) and all(map(written_by_train, names))


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    stop_after: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Trains as configured; returns out_dir. An earlier run in `out_dir` resumes, or with `overwrite=True`
    is deleted first. `stop_after=N` returns after step N (as an interrupted run would, with its checkpoint
    saved): rerunning resumes."""
    enable_compilation_cache()
    out = Path(out_dir)
    leader = jax.process_index() == 0
    ours = is_run_dir(out)
    if not ours:  # absent or empty is fine; anything else is refused with a message naming what is there
        io.check_target(out, overwrite=False, what="colbert-jax training run", is_ours=is_run_dir)
    # (overwrite deletes an earlier run only below, once this run's checkpoint, settings and data have loaded:
    # a mistyped path must not cost the earlier run)
    c, t = config.colbert, config.train

    # -- model, mesh, optimizer -------------------------------------------------------------------
    # A plain backbone (e.g. bert-base-uncased) starts with a fresh projection, as colbert-ai's training does.
    model = load_checkpoint(_resolve_checkpoint(c.checkpoint), config=c, init_projection=c.dim, projection_seed=t.seed)
    c = model.config
    mesh = make_mesh(t.mesh)
    data_size = mesh.shape["data"]
    if c.bsize % c.accumsteps:
        raise ConfigError(f"bsize={c.bsize} is not a multiple of accumsteps={c.accumsteps}")
    micro = c.bsize // c.accumsteps
    if micro % data_size:
        raise ConfigError(f"bsize/accumsteps={micro} must be a multiple of the mesh's data axis ({data_size})")
    dtype = jnp.bfloat16 if c.compute_dtype == "bfloat16" else jnp.float32
    module = ColBERTEncoder(model.bert_config, c.dim, dtype=dtype, remat=t.remat, head=model.head)
    tx = make_optimizer(c, t)
    p_shard = param_shardings(module, mesh, t.logical_axis_rules)
    host_params = jax.device_get(model.params)
    abstract_opt = jax.eval_shape(tx.init, host_params)
    s_shard = state_shardings(tx, abstract_opt, p_shard, mesh)
    replicated = NamedSharding(mesh, P())

    # -- data -------------------------------------------------------------------------------------
    data = TrainingData(
        c.triples,
        c.queries,
        c.collection,
        nway=c.nway,
        seed=t.seed,
        shuffle=t.shuffle,
    )
    distill = data.has_scores
    batch_shard = batch_sharding(mesh)
    rows = _process_rows(batch_shard, c.accumsteps, micro)
    batches = data.batches(c.bsize, t.epochs, rows)
    # Every process derives the step count from its copy of the file: the copies must agree, or one
    # process would leave the loop while another waits in a collective.
    if jax.process_count() > 1:
        distributed.barrier("colbert-jax train: data loaded")  # gloo's first connection, all together
        counts = multihost_utils.process_allgather(np.int64(len(data.examples))).tolist()
        if len(set(counts)) > 1:
            raise DataError(f"{c.triples}: the processes read different numbers of examples ({counts})")
    steps_per_epoch = data.steps_per_epoch(c.bsize)
    total = min(c.maxsteps, steps_per_epoch * t.epochs)
    if ours and overwrite and leader:
        shutil.rmtree(out)
    if overwrite and jax.process_count() > 1:
        multihost_utils.sync_global_devices("colbert-jax: run directory cleared")
    out.mkdir(parents=True, exist_ok=True)
    run_config = config.model_copy(update={"colbert": c})

    # -- state: resume, or start from the checkpoint -----------------------------------------------
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        out.resolve() / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, create=True)
    )
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), host_params, p_shard),
        opt_state=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt, s_shard.opt_state
        ),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    )
    # A run killed while Orbax deleted its oldest checkpoint leaves it (partly) behind, and a finished
    # resume saves nothing that would delete it: keep only the newest `keep_checkpoints` here.
    for old in sorted(manager.all_steps())[: -t.keep_checkpoints]:
        manager.delete(old)
    latest = manager.latest_step()
    inputs = _input_checksums(run_config)
    if latest is not None:
        _check_resume_config(out, run_config)
        _check_resume_inputs(out, inputs)
        # Each process restores its own data position (Grain writes one file per process); a checkpoint
        # of another process count has none for us, and then the step gives it: one global batch a step.
        own = (
            out / "checkpoints" / str(latest) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        )
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if own.is_file():
            items["data"] = grain.checkpoint.CheckpointRestore(batches)
        restored = manager.restore(latest, args=ocp.args.Composite(**items))
        state = TrainState(*restored["state"])
        if not own.is_file():
            batches.set_state({**batches.get_state(), "next_index": int(jax.device_get(state.step))})
        if batches.get_state()["next_index"] != int(jax.device_get(state.step)):
            raise RuntimeError(f"checkpoint {latest}: this process's data position disagrees with the step")
        if leader and show_progress:
            tqdm.write(f"[colbert-jax] resuming from {out / 'checkpoints' / str(latest)} (step {latest})")
    else:
        params = jax.device_put(host_params, p_shard)
        opt_state = jax.jit(tx.init, out_shardings=s_shard.opt_state)(params)
        state = TrainState(
            jax.device_put(jnp.int32(0), replicated),
            params,
            opt_state,
            jax.device_put(jax.random.PRNGKey(t.seed), replicated),
        )
    start = int(jax.device_get(state.step))
    if leader:
        run_config.save(out / "config.yaml")
        if latest is None or not (out / INPUTS).is_file():
            io.write_json(out / INPUTS, inputs)
        _truncate_metrics(out / "metrics.jsonl", start)

    step_fn = jax.jit(
        functools.partial(
            train_step,
            module=module,
            tx=tx,
            colbert=c,
            train=t,
            pad_id=model.doc_tokenizer.pad_id,
            query_pad_id=model.query_pad_id,
            skiplist=jnp.asarray(model.doc_tokenizer.skiplist),
            distill=distill,
        ),
        in_shardings=(s_shard, batch_sharding(mesh)),
        out_shardings=(s_shard, replicated),
        donate_argnums=0,  # the old state's buffers become the new state's
    )

    # -- loop -------------------------------------------------------------------------------------
    peak = _peak_flops(config)
    writer = _tensorboard(out) if (leader and t.tensorboard) else None
    bar = tqdm(total=total, initial=start, unit="step", desc="training", disable=not (leader and show_progress))
    step, saved = start, start
    programs = {}  # compiled step per batch shape
    distributed.barrier(f"colbert-jax train: start at step {start}")
    with open(out / "metrics.jsonl", "a") if leader else open(os.devnull, "w") as log:
        while step < total:
            epoch = step // steps_per_epoch
            t0 = time.perf_counter()
            arrays = _tokenize(model, next(batches), c.accumsteps, c.nway)
            global_batch = {k: _global_array(batch_shard, v, c.bsize // c.accumsteps) for k, v in arrays.items()}
            shapes = tuple((k, v.shape) for k, v in global_batch.items())
            if shapes not in programs:
                programs[shapes] = step_fn.lower(state, global_batch).compile()
                # Processes compile at different speeds; the first run's collectives must start together.
                distributed.barrier(f"colbert-jax train: program {len(programs)} at step {step}")
            state, metrics = programs[shapes](state, global_batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            step += 1
            seconds = time.perf_counter() - t0
            q_len, d_len = arrays["q_ids"].shape[-1], arrays["d_ids"].shape[-1]
            tokens = c.bsize * (q_len + c.nway * d_len)
            flops = _flops_per_step(model, c.bsize, q_len, c.bsize * c.nway, d_len)
            record = {
                "step": step,
                **metrics,
                "epoch": epoch,
                "examples_per_s": c.bsize / seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": (flops / seconds / peak) if peak else None,
                "seconds": seconds,
            }
            if step % t.log_every == 0 or step == total:
                log.write(json.dumps(record) + "\n")
                log.flush()
                if writer is not None:
                    for k, v in record.items():
                        if isinstance(v, float):
                            writer.add_scalar(k, v, step)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                ex_s=f"{record['examples_per_s']:.1f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mfu="n/a" if record["mfu"] is None else f"{record['mfu']:.1%}",
            )
            bar.update(1)
            if t.save_every and step % t.save_every == 0:
                _save(manager, step, state, batches)
                saved = step
            if stop_after is not None and step >= stop_after:
                if saved != step:
                    _save(manager, step, state, batches)
                manager.wait_until_finished()
                bar.close()
                return out
    bar.close()
    if saved != step:
        _save(manager, step, state, batches)
    manager.wait_until_finished()
    if t.export:
        distributed.barrier(f"colbert-jax train: export after step {step}")
        params = (
            multihost_utils.process_allgather(state.params, tiled=True)
            if jax.process_count() > 1
            else jax.device_get(state.params)
        )
        if leader:
            exported = ColBERTModel(
                c,
                model.bert_config,
                params,
                model.hf_tokenizer,
                extras=model.extras,
                tokenizer_files=model.tokenizer_files,
                devices=jax.local_devices()[:1],
                head=model.head,
                text=model.text,
            )
            layout = export_format(model)
            exported.save(out / "export", format=layout, overwrite=True)
            if show_progress:
                tqdm.write(f"[colbert-jax] {step} steps; model exported to {out / 'export'} ({layout} layout)")
    return out


def export_format(model) -> str:
    """The layout a run's `export/` is written in: colbert-ai's (torch) where it holds the model; PyLate's for
    its Dense stack and text conventions; ours (jax) for what neither holds (an l2 model with those: PyLate's
    layout scores cosines only, and refusing it only once training was done lost the export)."""
    if not (model.text.pylate or model.head):
        return "torch"
    return "pylate" if model.config.similarity == "cosine" else "jax"


def _save(manager, step: int, state: TrainState, batches) -> None:
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(batches)),
    )


def _held_rows(sharding: NamedSharding, micro: int) -> list[int]:
    """Rows of a micro-batch that this process's devices hold under `sharding` (any of them), sorted."""
    held = set()
    for index in sharding.addressable_devices_indices_map((1, micro)).values():
        held.update(range(*index[1].indices(micro)))
    return sorted(held)


def _process_rows(sharding: NamedSharding, accum: int, micro: int) -> np.ndarray:
    """Positions in the global batch (micro-batch-major, as `_tokenize` reshapes it) of the examples that
    this process must read: those its devices hold."""
    held = np.array(_held_rows(sharding, micro), np.int64)
    return (np.arange(accum)[:, None] * micro + held[None, :]).reshape(-1)


def _global_array(sharding: NamedSharding, local: np.ndarray, micro: int) -> jax.Array:
    """The global [accum, micro * k, ...] array from this process's part `local` [accum, held * k, ...]: k rows
    per example (nway for passages) of the examples of `_process_rows`, in order. Each device gets the rows
    that the single-process run gives it."""
    held = _held_rows(sharding, micro)
    k = local.shape[1] // len(held)
    where = {r: i for i, r in enumerate(held)}

    def rows(index):
        start, stop, _ = index[1].indices(micro * k)
        first = where[start // k] * k
        return local[:, first : first + stop - start]

    return jax.make_array_from_callback((local.shape[0], micro * k, *local.shape[2:]), sharding, rows)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops logged steps after `step` (a resumed run logs them again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if record["step"] <= step:
            keep.append(line)
    io.write_text(path, "".join(line + "\n" for line in keep))  # atomic: a kill must not lose the logged steps


def _tensorboard(out: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
