"""sha256 of files, of every file under a directory, and of the files that define a model directory:
what a run's manifest, the lineage and the cards record of their inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["MODEL_FILES", "hash_inputs", "model_files", "sha256_file"]

# Files that identify a model directory; weights are hashed so lineage survives a copy.
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_inputs(paths: list[str | Path]) -> dict[str, str]:
    """sha256 of every file named (directories: every file in them, recursively)."""
    out = {}
    for p in map(Path, paths):
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = sha256_file(f)
    return out


def model_files(path: str | Path) -> list[Path]:
    """The files that define a local model directory (weights included); [] for a hub name."""
    p = Path(path)
    if not p.is_dir():
        return []
    names = set(MODEL_FILES)
    return sorted(
        f for f in p.iterdir() if f.is_file() and (f.name in names or f.suffix in (".safetensors", ".bin"))
    )
