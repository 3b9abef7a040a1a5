"""The audit trail: lineage of a run back to every input file, model cards and data cards.

from posttrain.audit import lineage, model_card, data_card
lineage("runs/pipeline/dpo").all_inputs()      # {path: sha256} of every input of every ancestor
model_card("runs/pipeline/dpo")                # runs/pipeline/dpo/MODEL_CARD.md
data_card("gen.jsonl", sources=[...], filters=[("dedup", 3)], protocol="judge")

posttrain card RUN_DIR [--out FILE] [--intended-use TEXT] [--limitation TEXT]
posttrain lineage RUN_DIR [--json]
"""

from __future__ import annotations

from posttrain.audit.data_card import data_card
from posttrain.audit.lineage import LineageNode, lineage
from posttrain.audit.model_card import eval_metrics, key_hyperparameters, model_card

__all__ = [
    "LineageNode",
    "data_card",
    "eval_metrics",
    "key_hyperparameters",
    "lineage",
    "model_card",
]
