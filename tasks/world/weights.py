"""Where the world's trained models are, and their identity for the stage hashes (torch-free).

The weights ship in the repository (``tasks/world/weights/``, safetensors, written by
``python -m tasks.world.build``): ``diffusion/`` (a diffusers ``StableDiffusionPipeline`` folder),
``clip/`` (an ``open_clip_config.json`` folder) and ``lm/`` (a transformers causal LM folder), and
``build.json``, the build's manifest: seeds, steps, losses, timings, library versions and the sha256
of every file. The model registry (:mod:`tasks.common.models`) loads them as it loads real local
weights; ``models.<kind>_path`` points a ``world`` preset at another build.

:func:`identity` is what the render, fine-tune and train hashes cover for a ``world`` model (the sha256
of its files as the manifest lists them), so a rebuilt model writes new stage versions instead of
reusing outputs of the old one.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path

KINDS = ("diffusion", "clip", "lm")
MANIFEST = "build.json"
PRESET = "world"


def weights_dir() -> Path:
    return Path(str(resources.files("tasks.world").joinpath("weights")))


def model_dir(kind: str, root: Path | None = None) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown world model {kind!r}; expected one of {KINDS}")
    return (root or weights_dir()) / kind


@cache
def _manifest(root: str) -> dict:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def identity(kind: str, path: str | None = None) -> str:
    """A short content hash of the ``kind`` world model (the shipped one, or the folder ``path``)."""
    if path is None:
        files = _manifest(str(weights_dir())).get("files", {})
        picked = {name: sha for name, sha in files.items() if name.startswith(f"{kind}/")}
        if picked:
            return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
        path = str(model_dir(kind))
    return folder_hash(Path(path))


def folder_hash(folder: Path) -> str:
    if folder.is_file():
        return hashlib.sha256(folder.read_bytes()).hexdigest()[:16]
    if not folder.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(
            f.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest()
        )
    return digest.hexdigest()[:16]


def hash_extra(cfg, kinds: tuple[str, ...]) -> dict:
    """``{"world_models": {kind: identity}}`` for the ``kinds`` the config sets to ``world`` ({} otherwise,
    so no other config's hash changes)."""
    m = cfg.models
    found = {kind: identity(kind, getattr(m, f"{kind}_path")) for kind in kinds if getattr(m, kind) == PRESET}
    return {"world_models": found} if found else {}
