"""DPO family and reward models on the tiny model: the maths at step 0, LoRA, reward models."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from posttrain.engine.run import read_metrics
from posttrain.rewards.model import RewardModel
from posttrain.tasks import arithmetic, preference
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    build_tiny(root / "tiny", size="tiny")
    files = preference.write_preference_files(root / "data", n_train=2000)
    return root, files


def config(task, out, algorithm="dpo", **train):
    root, files = task
    return {
        "algorithm": algorithm,
        "out": str(out),
        "model": {"path": str(root / "tiny")},
        "data": {"train": str(files["pref_train"]), "max_length": 128},
        "train": {
            "lr": 1e-3,
            "batch_size": 16,
            "max_steps": 3,
            "progress": False,
            "tensorboard": False,
            **train,
        },
    }


def first_loss(run_dir):
    return read_metrics(run_dir)[0]["loss"]


def test_dpo_first_step_loss_is_log2_and_ref_is_cached(task, tmp_path):
    # At step 0 the policy IS the reference: every log-ratio is 0, so the sigmoid loss is log 2
    # and the implicit rewards are 0. This fails if chosen/rejected are mis-paired, if the
    # reference pass differs from the training forward (packing, masks), or if it is stale.
    res = train(config(task, tmp_path / "dpo"))
    m = read_metrics(res.run_dir)[0]
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(0, abs=1e-5) and m["rewards/margin"] == pytest.approx(
        0, abs=1e-5
    )
    assert read_metrics(res.run_dir)[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # and it trains
    cache = torch.load(res.run_dir / "ref_logps.train.pt")
    assert len(cache["refs"]) == 3 * 16  # only the pairs the 3 steps use were scored


LN2, BETA = math.log(2), 0.1
# Each reference-based kind's loss where the policy IS the reference (every log-ratio 0), from its formula
# in the paper at h = Δ_c = Δ_r = 0, β = 0.1; the options are set from the config as a user would.
AT_STEP_ZERO = {
    "sigmoid": ({}, LN2),
    "sigmoid_norm": ({}, LN2),
    "ipo": ({}, (0 - 1 / (2 * BETA)) ** 2),
    "hinge": ({}, 1.0),
    "robust": ({"label_smoothing": 0.1}, LN2),  # (−0.9·log σ(0) + 0.1·log σ(0)) / 0.8
    "exo_pair": ({"label_smoothing": 1e-3}, -LN2 - 0.5 * math.log(0.999 * 1e-3)),
    "bco_pair": ({"delta": 0.0}, 2 * LN2),  # crashed with KeyError: 'delta' before
    "sppo_hard": ({}, 2 * (1 / (2 * BETA)) ** 2),
    "nca_pair": ({}, 2 * LN2),
    "apo_zero": ({}, 1.0),
    "apo_down": ({}, 1.0),
    "aot": ({"label_smoothing": 0.2}, LN2),
    "aot_unpaired": ({}, LN2),
    "discopop": ({"tau": 0.05}, 0.5 * LN2 + 0.5),  # m = σ(0) = ½: ½·log 2 + ½·exp(0)
}


def test_every_kind_is_checked_at_step_zero():
    from posttrain.losses import PREFERENCE_KINDS, REFERENCE_FREE_KINDS

    assert set(AT_STEP_ZERO) == set(PREFERENCE_KINDS) - set(REFERENCE_FREE_KINDS)


@pytest.mark.parametrize("kind", sorted(AT_STEP_ZERO))
def test_every_kind_trains_a_step_from_a_config(task, tmp_path, kind):
    options, expected = AT_STEP_ZERO[kind]
    cfg = config(task, tmp_path / kind, max_steps=1, batch_size=8) | {"dpo": {"kind": kind, **options}}
    assert first_loss(train(cfg).run_dir) == pytest.approx(expected, rel=1e-5)


def test_lora_dpo_reference_is_the_base(task, tmp_path):
    cfg = config(task, tmp_path / "lora")
    cfg["model"]["lora"] = {"r": 4, "alpha": 8}
    res = train(cfg)
    assert first_loss(res.run_dir) == pytest.approx(math.log(2), abs=1e-5)
    assert (res.final / "adapter" / "adapter_config.json").exists()


def test_reference_free_presets(task, tmp_path):
    simpo = train(config(task, tmp_path / "simpo", algorithm="simpo"))
    orpo = train(config(task, tmp_path / "orpo", algorithm="orpo"))
    assert not (simpo.run_dir / "ref_logps.train.pt").exists()  # no reference model, ever
    assert json.loads((orpo.run_dir / "manifest.json").read_text())["algorithm"] == "orpo"
    assert all(math.isfinite(m["loss"]) for m in read_metrics(simpo.run_dir) + read_metrics(orpo.run_dir))


def test_unknown_kind_is_a_config_error(task, tmp_path):
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="sigmoid"):
        train(config(task, tmp_path / "x") | {"dpo": {"kind": "sigmod"}})


def test_reward_model_learns_and_loads_with_transformers(task, tmp_path):
    root, files = task
    cfg = config(task, tmp_path / "rm", algorithm="reward", max_steps=150, batch_size=32, lr=2e-3)
    res = train(cfg)
    assert read_metrics(res.run_dir)[0]["loss"] == pytest.approx(
        math.log(2), abs=0.05
    )  # fresh head: scores ~0
    hf = AutoModelForSequenceClassification.from_pretrained(res.final)
    assert hf.config.num_labels == 1
    rm = RewardModel.from_pretrained(str(res.final))
    rows = preference.preference_eval_rows(n_per_level=50)
    chosen = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    assert accuracy > 0.7, accuracy  # chance is 0.5
    # the HF model's own pooled score equals ours on an unpadded sequence
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    assert rm.model(input_ids=ids).logits.item() == pytest.approx(
        rm(
            {"input_ids": ids, "position_ids": torch.arange(5)[None], "example_index": torch.zeros_like(ids)}
        ).item(),
        abs=1e-5,
    )
    assert arithmetic.LEVELS  # the task module is importable alongside


def test_kto_first_step_is_half_and_trains(task, tmp_path):
    root, files = task
    cfg = config(task, tmp_path / "kto", algorithm="kto", max_steps=4)
    cfg["data"]["train"] = str(files["feedback_train"])
    res = train(cfg)
    rows = read_metrics(res.run_dir)
    # policy == reference at step 0: r = 0 and z = 0, so each example's loss is 1 - sigmoid(0)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert rows[-1]["loss"] != pytest.approx(0.5, abs=1e-4)
    assert (res.run_dir / "ref_logps.train.pt").exists()
