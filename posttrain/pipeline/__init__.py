"""Multi-stage pipelines: named stages in order, artifacts passed by name, finished stages reused.

    posttrain pipeline examples/pipeline.yaml [--until STAGE | --only STAGE] [--fresh] [--dry-run]

A pipeline file names its stages in the order they run; each writes its own run directory,
``<out>/<stage name>``::

    out: runs/pipeline
    intended_use: ...                  # optional, for the model cards (posttrain card)
    limitations: [...]                 # optional, added to the model cards' default list
    defaults:                          # merged under every training stage (the stage's keys win)
      train: {progress: false}
    stages:
      data: {kind: data, bundled: [arithmetic, tiny], rows: 2000}
      sft:                             # a training stage: a `posttrain train` config without `out`
        algorithm: sft
        model: {path: "${data.tiny}"}
        data: {train: "${data.sft_train}", max_length: 64}
        train: {max_steps: 100}
      improve:                         # a group: its stages run `repeat` times, as dpo-1, dpo-2
        repeat: 2
        stages:
          dpo:
            algorithm: dpo
            model: {path: "${prev.dpo.final|sft.final}"}   # last round's model; sft's in round 1
            data: {train: "${data.pref_train}"}
            train: {max_steps: 50, seed: "${round}"}
      eval: {kind: eval, suite: arithmetic, model: "${dpo.final}"}   # after the group: the last round
      gates: {kind: gates, gates: gates.yaml, current: "${eval.eval}"}

References, ``${STAGE.ATTR}``, name an artifact of an earlier stage. Every stage has ``run_dir``;
a training stage also ``final`` (its final/ model), ``metrics``, ``alerts``, ``samples``; a data
stage one attribute per file it holds; an eval stage ``eval`` (eval.json) and ``samples``. In a
group, ``${dpo.final}`` is this round's dpo (which must come earlier in the round),
``${prev.dpo.final}`` the previous round's, with a fallback after ``|`` for round 1, and
``${round}`` the round number (1, 2, ...). After the group, ``${dpo.final}`` is the last round's
and ``${dpo-1.final}`` names one round. Everything is resolved and every stage config validated
before anything runs: a reference to an unknown stage, a later stage or an unknown attribute is an
error naming the stage and the key.

Stage kinds: ``train`` (the default: any config with ``algorithm``), ``data`` (the bundled task
files and tiny model, and/or existing ``files: {name: path}`` to hash and name), ``eval``
(:mod:`posttrain.eval.suite`: ``suite``, ``model``, optional ``against``) and ``gates``
(:mod:`posttrain.eval.gates`: ``gates``, ``current``, optional ``baseline``; a failed gate stops
the pipeline). The eval modules are imported only when a pipeline has such a stage.

Reuse and resume. A stage's hash covers its config as written (defaults merged, round numbers in)
and the hashes of the stages it references, so a change upstream re-runs everything downstream,
while moving the whole output directory does not. A stage whose run directory holds a
``STAGE_COMPLETE`` marker with the same hash (and its final/ or outputs) is reused; one that failed
or was interrupted with the same hash resumes from its last checkpoint; a stage directory written
under another hash (its ``STAGE_STARTED`` marker says which) is deleted and the stage runs afresh
(``--fresh``: every selected stage does); a non-empty directory without that marker was not written
by a pipeline and is an error, never deleted. The hash covers configs, not file contents: after
editing a data file in place, run the stages that read it with ``--fresh``.
``<out>/pipeline.json`` records every stage's status, run directory, hash and start/finish times.

Lineage: each stage's manifest.json names the runs it read from (``parents``), so
:func:`posttrain.audit.lineage` walks back from any stage to every input file. Files a data stage
writes live in its run directory and so lead back to it; ``files:`` are used where they are (not
copied) and are hashed into the manifests of the data stage and of every stage that reads them. At
the end of a run every finished training stage gets a MODEL_CARD.md (:mod:`posttrain.audit`).
"""

from posttrain.pipeline.plan import (
    MARKER,
    STARTED,
    STATE,
    DataStage,
    EvalStage,
    GatesFailed,
    GatesStage,
    Pipeline,
    PipelineInterrupted,
    Stage,
    data_files,
    load_pipeline,
)
from posttrain.pipeline.run import State, is_complete, plan_status, run_pipeline, select

__all__ = [
    "MARKER",
    "STARTED",
    "STATE",
    "DataStage",
    "EvalStage",
    "GatesFailed",
    "GatesStage",
    "Pipeline",
    "PipelineInterrupted",
    "Stage",
    "State",
    "data_files",
    "is_complete",
    "load_pipeline",
    "plan_status",
    "run_pipeline",
    "select",
]
