"""Device mesh and shardings for training: a ('data', 'model') mesh, parameters placed by logical-axis rules.

Parameters carry logical axis names (`colbert_jax/modeling`); `logical_axis_rules` (config) maps them to
mesh axes: by default attention heads and MLP units are split over `model`, everything else replicated,
and batches split over `data`. Optimizer state follows its parameters (built with `optax.tree_map_params`,
so that scalar leaves such as Adam's count are replicated rather than left on one device).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from colbert_jax.config import ConfigError
from colbert_jax.modeling.colbert import ColBERTEncoder, logical_axes
from colbert_jax.training.config import MeshSettings
from colbert_jax.training.step import TrainState

__all__ = ["make_mesh", "param_shardings", "state_shardings", "batch_sharding"]


def make_mesh(settings: MeshSettings, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    model = settings.model
    data = settings.data if settings.data != -1 else len(devices) // model
    if data < 1 or data * model != len(devices):
        raise ConfigError(f"train.mesh: data={settings.data} x model={model} does not fit {len(devices)} devices")
    return jax.make_mesh(
        (data, model), ("data", "model"), devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2
    )


def param_shardings(module: ColBERTEncoder, mesh: Mesh, rules) -> dict:
    specs = logical_axes(module)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)),
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def state_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_sharding, mesh: Mesh) -> TrainState:
    replicated = NamedSharding(mesh, P())
    opt = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, params_sharding, transform_non_params=lambda _: replicated
    )
    return TrainState(step=replicated, params=params_sharding, opt_state=opt, rng=replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays are [accumsteps, examples, ...]: examples split over `data`."""
    return NamedSharding(mesh, P(None, "data"))
