"""What an agent run's manifest records about its environment, so that a replay can tell whether the
environment or its grader changed since the run (``posttrain replay`` compares them):

    "env": {"name": "guess", "version": "1", "class": "posttrain.agents.envs.guess:GuessEnv",
            "sources": {"posttrain/agents/envs/guess.py": "<sha256>", "posttrain/agents/env.py": ...},
            "tasks": 256, "tasks_sha256": "<sha256 of the sorted task hashes>", "eval_tasks": 64,
            "eval_tasks_sha256": ..., "all_tasks_sha256": ..., "trajectories": "trajectories.jsonl"}

``sources`` hashes the source file of every class in the environment's MRO (its tools and grader live
there) that is not from the standard library or a third-party package; paths are relative to the
package's root where they can be, else just the file name (no machine paths in a manifest).
"""

from __future__ import annotations

import hashlib
import inspect
import sysconfig
from pathlib import Path

from posttrain.agents.trajectory import task_hash

_ROOT = Path(__file__).resolve().parents[2]
_LIBRARIES = {
    Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")
}


def _label(path: Path) -> str:
    try:
        return path.resolve().relative_to(_ROOT).as_posix()
    except ValueError:
        return path.name


def env_sources(cls) -> dict[str, str]:
    """sha256 of the source file of each class of ``cls``'s MRO outside the standard library / site-packages."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            path = Path(inspect.getsourcefile(klass) or "")
        except TypeError:  # a built-in
            continue
        if not path.is_file() or any(path.resolve().is_relative_to(p) for p in _LIBRARIES):
            continue
        out.setdefault(_label(path), hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def tasks_digest(tasks: list[dict]) -> str:
    """One sha256 over the sorted distinct task hashes (the order of the rows does not matter)."""
    return hashlib.sha256("\n".join(sorted({task_hash(t) for t in tasks})).encode()).hexdigest()


def env_audit(env_cfg, tasks: list[dict], eval_tasks: list[dict]) -> dict:
    """The manifest's ``env`` block of a run (module docstring)."""
    from posttrain.agents.envs import get_env

    cls = get_env(env_cfg.name)
    return {
        "name": env_cfg.name,
        "version": str(getattr(cls, "version", "")),
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "options": dict(env_cfg.options),
        "sources": env_sources(cls),
        "tasks": len(tasks),
        "tasks_sha256": tasks_digest(tasks),
        "eval_tasks": len(eval_tasks),
        "eval_tasks_sha256": tasks_digest(eval_tasks),
        "all_tasks_sha256": tasks_digest(tasks + eval_tasks),
        "trajectories": "trajectories.jsonl",
    }


def changed_sources(manifest_env: dict, cls) -> list[str]:
    """The environment source files whose hash differs from the run's manifest (or that are new / gone)."""
    then, now = dict(manifest_env.get("sources") or {}), env_sources(cls)
    return sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))


def record_trajectories(run) -> None:
    """Add the trajectories file's sha256 and episode count to the manifest's ``env`` block (end of a run)."""
    from posttrain.audit.hashes import sha256_file

    path = run.path / "trajectories.jsonl"
    manifest_path = run.path / "manifest.json"
    if not run.write or not path.is_file() or not manifest_path.is_file():
        return
    import json

    block = dict(json.loads(manifest_path.read_text()).get("env") or {})
    with open(path) as f:
        episodes = sum(1 for line in f if line.strip())
    run.update_manifest(env={**block, "trajectories_sha256": sha256_file(path), "episodes": episodes})
