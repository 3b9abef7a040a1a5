"""Lineage: from a run back to every file that went into it, through the runs that made its inputs.

Every run's manifest.json lists the sha256 of its inputs (data files, model files) and its
``parents``: the run directories that produced any of them (a model at ``RUN/final``, a data file
written inside a data stage's run). Following parents recursively gives a tree whose leaves are the
runs that started from outside files (a hub model, a dataset you brought):

    tree = lineage("runs/pipeline/dpo")
    for node in tree.walk():                       # ancestors first, each run once
        print(node.name, node.algorithm, len(node.inputs))
    tree.all_inputs()                              # {path: sha256} of every input of every run

A parent directory that no longer exists (moved, deleted) is kept as a node with ``missing=True``:
the hashes in the child's manifest still say what it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain.audit.run_dir import RunDir


@dataclass
class LineageNode:
    """One run of the tree."""

    run_dir: Path
    manifest: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # config.yaml (the resolved config), else {}
    parents: list[LineageNode] = field(default_factory=list)
    missing: bool = False  # the directory (or its manifest) is gone

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def algorithm(self) -> str | None:
        return self.manifest.get("algorithm") or self.config.get("algorithm")

    @property
    def inputs(self) -> dict[str, str]:
        """{path: sha256} of every input file of this run (data and model files)."""
        return dict(self.manifest.get("inputs") or {})

    @property
    def models(self) -> list[str]:
        return list(self.manifest.get("models") or [])

    def model_inputs(self) -> dict[str, str]:
        """The inputs that are files of a model directory this run loaded."""
        roots = [Path(m) for m in self.models]
        return {p: h for p, h in self.inputs.items() if any(_under(Path(p), r) for r in roots)}

    def data_inputs(self) -> dict[str, str]:
        """The inputs that are not model files: datasets, suites, ..."""
        models = self.model_inputs()
        return {p: h for p, h in self.inputs.items() if p not in models}

    def walk(self) -> list[LineageNode]:
        """Every run in the tree once, ancestors before the runs they fed (this run last)."""
        order: list[LineageNode] = []
        seen: set[Path] = set()

        def visit(node: LineageNode) -> None:
            if node.run_dir in seen:
                return
            seen.add(node.run_dir)
            for p in node.parents:
                visit(p)
            order.append(node)

        visit(self)
        return order

    def all_inputs(self) -> dict[str, str]:
        """{path: sha256} over the whole tree."""
        out: dict[str, str] = {}
        for node in self.walk():
            out.update(node.inputs)
        return out

    def to_dict(self) -> dict:
        """A JSON-able tree: run, algorithm, created, seed, inputs, config, parents."""
        return {
            "run_dir": str(self.run_dir),
            "algorithm": self.algorithm,
            "created": self.manifest.get("created"),
            "seed": self.manifest.get("seed"),
            "missing": self.missing,
            "models": self.models,
            "inputs": self.inputs,
            "config": self.config,
            "parents": [p.to_dict() for p in self.parents],
        }

    def format(self, indent: str = "") -> str:
        """The tree as indented text: one line per run, one per input file."""
        head = f"{indent}{self.name} ({self.algorithm or '?'}){' [missing]' if self.missing else ''}  {self.run_dir}"
        lines = [head]
        for path, digest in self.inputs.items():
            lines.append(f"{indent}    {digest[:12]}  {path}")
        lines += [p.format(indent + "  ") for p in self.parents]
        return "\n".join(lines)


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def lineage(run_dir: str | Path) -> LineageNode:
    """The lineage tree of a run directory (see the module docstring).

    A run reached along two paths (the SFT run that fed both a reward model and DPO) is one node
    object shared by both; a cycle (impossible from real runs, possible from hand-edited manifests)
    is cut where it closes.
    """
    nodes: dict[Path, LineageNode] = {}

    def build(path: Path, stack: tuple[Path, ...]) -> LineageNode:
        path = path.resolve()
        if path in nodes:
            return nodes[path]
        run = RunDir(path)
        node = LineageNode(run_dir=path, manifest=run.manifest, config=run.config, missing=not run.manifest)
        manifest = run.manifest
        nodes[path] = node
        for parent in manifest.get("parents") or []:
            parent = Path(parent).resolve()
            if parent not in stack and parent != path:
                node.parents.append(build(parent, (*stack, path)))
        return node

    return build(run_of(run_dir), ())


def run_of(path: str | Path) -> Path:
    """The run directory of a path: itself, or the run holding it when given a model (RUN/final)."""
    return RunDir.of(path).path
