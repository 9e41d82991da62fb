"""The on-disk compilation cache: a second process loads what the first compiled; it can be turned off."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROGRAM = """
import json, jax, jax.numpy as jnp
from jax._src import monitoring
from colbert_jax.runtime import enable_compilation_cache
events = []
monitoring.register_event_listener(lambda event, **kw: events.append(event))
enable_compilation_cache()
print(json.dumps({"y": float(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).sum()),
                  "hits": sum(e.endswith("cache_hits") for e in events),
                  "misses": sum(e.endswith("cache_misses") for e in events)}))
"""


def run(cache: Path, **env) -> dict:
    environ = {**os.environ, "COLBERT_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu", **env}
    environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=environ, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_first_ones_programs(tmp_path):
    first = run(tmp_path)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert any((tmp_path / "xla").iterdir())
    second = run(tmp_path)
    assert second["hits"] == first["misses"] and second["misses"] == 0
    assert second["y"] == first["y"]


def test_turned_off_by_the_environment(tmp_path):
    out = run(tmp_path, COLBERT_JAX_COMPILATION_CACHE="0")
    assert out["hits"] == 0 and not (tmp_path / "xla").exists()
