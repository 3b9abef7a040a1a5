from pathlib import Path

import pytest

from posttrain.config import apply_override, dump_config, load_config
from posttrain.errors import ConfigError

BASE = {"algorithm": "sft", "out": "runs/x", "model": {"path": "m"}, "data": {"train": "t.jsonl"}}


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(
        tmp_path, "algorithm: sft\nout: r\nmodel: {path: m}\ndata: {train: t.jsonl}\ntrain: {lr: 1.0e-3}\n"
    )
    cfg = load_config(
        p, ["train.lr=5e-4", "train.betas=[0.9, 0.99]", "data.packing=false", "train.max_steps=7"]
    )
    assert cfg.train.lr == 5e-4 and cfg.train.betas == (0.9, 0.99)
    assert cfg.data.packing is False and cfg.train.max_steps == 7
    assert cfg.train.batch_size == 32  # default filled in


def test_misspelled_key_names_key_and_suggestion(tmp_path):
    p = write(tmp_path, "algorithm: sft\nout: r\nmodel: {path: m}\ndata: {train: t}\ntrain: {lrr: 1.0e-3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "c.yaml" in msg and "unknown key 'train.lrr'" in msg and "did you mean 'train.lr'" in msg


def test_misspelled_section_and_override(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'data'"):
        load_config({**BASE, "dta": {}})
    with pytest.raises(ConfigError, match="did you mean 'train.warmup_steps'"):
        load_config(BASE, ["train.warmup_step=3"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys here: .*path"):
        load_config({**BASE, "model": {"path": "m", "zzz": 1}})


def test_bad_values_and_missing_keys():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(BASE, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config({k: v for k, v in BASE.items() if k != "model"})
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(BASE, ["train.batch_size=4", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "train.lr")


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_dump_roundtrip():
    cfg = load_config(BASE, ["train.lr=3e-4"])
    import yaml

    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg


# stage configs; examples/pipeline.yaml is a pipeline (checked in test_pipeline.py), examples/collect.yaml a
# collect project's settings (test_collect_export.py inits a project from it)
NOT_STAGES = ("pipeline.yaml", "collect.yaml")
EXAMPLES = sorted(p for p in Path(__file__).parents[1].glob("examples/*.yaml") if p.name not in NOT_STAGES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.algorithm and cfg.out


def test_an_option_the_kind_does_not_take_is_an_error_naming_what_it_takes():
    dpo = BASE | {"algorithm": "dpo"}
    with pytest.raises(ConfigError) as e:  # was accepted, and the smoothing dropped silently
        load_config(dpo | {"dpo": {"kind": "ipo", "label_smoothing": 0.2}})
    assert "kind 'ipo' does not take label_smoothing; 'ipo' takes: beta, sft_weight, ref_model" in str(
        e.value
    )
    with pytest.raises(ConfigError, match="'sigmoid' takes: beta, label_smoothing, sft_weight"):
        load_config(dpo | {"dpo": {"gamma": 1.0}})
    # an out-of-range option is caught at load time by the loss function itself, not at the first step
    with pytest.raises(ConfigError, match="exo_pair' needs label_smoothing > 0"):
        load_config(dpo | {"dpo": {"kind": "exo_pair"}})
    simpo = load_config(dpo | {"dpo": {"kind": "simpo", "gamma": 0.3}}).dpo
    assert simpo.kind_options(chosen_lengths=1, rejected_lengths=1) == {
        "gamma": 0.3, "label_smoothing": 0.0, "chosen_lengths": 1, "rejected_lengths": 1,
    }  # fmt: skip
    bco = load_config(dpo | {"dpo": {"kind": "bco_pair"}}).dpo
    assert bco.kind_options() == {"delta": 0.0}  # the loss's own default, declared once


@pytest.mark.parametrize(
    "algorithm, section, users",
    [("sft", "rl", "cispo, dapo, distill, dr_grpo, grpo, gspo, online_dpo, ppo, reinforce_pp, rloo"),
     ("sft", "dpo", "dpo, online_dpo, orpo, simpo"),
     ("grpo", "kto", "kto"), ("dpo", "rollout", "cispo, dapo, distill, dr_grpo")],
)  # fmt: skip
def test_a_section_of_another_algorithm_is_an_error(algorithm, section, users):
    with pytest.raises(ConfigError, match=f"section '{section}' is for algorithm {users}.*not '{algorithm}'"):
        load_config(BASE | {"algorithm": algorithm, section: {}})


def test_the_resolved_config_holds_the_stages_own_sections_and_the_kinds_own_options():
    import yaml

    def sections(algorithm, **extra):
        return set(yaml.safe_load(dump_config(load_config(BASE | {"algorithm": algorithm, **extra}))))

    common = {"algorithm", "out", "model", "data", "train", "monitor"}
    assert sections("sft") == common
    assert sections("dpo") == common | {"dpo"} and sections("kto") == common | {"kto"}
    assert sections("grpo") == common | {"rollout", "rl", "sandbox"} and sections("ppo") == common | {
        "rollout",
        "rl",
        "ppo",
        "sandbox",
    }
    grpo, ppo = (load_config(BASE | {"algorithm": a}) for a in ("grpo", "ppo"))
    # PPO's GAE and critic live in `ppo`; the GRPO family's advantage and aggregation in its `rl` only
    assert {"gamma", "lam", "vf_coef", "critic"}.isdisjoint(type(grpo.rl).model_fields)
    assert {"advantage", "scale", "aggregation"}.isdisjoint(type(ppo.rl).model_fields)
    with pytest.raises(ConfigError, match="unknown key 'rl.gamma'"):
        load_config(BASE | {"algorithm": "grpo", "rl": {"gamma": 0.9}})
    with pytest.raises(ConfigError, match="unknown key 'rl.aggregation'"):
        load_config(BASE | {"algorithm": "ppo", "rl": {"aggregation": "token_mean"}})
    with pytest.raises(ConfigError, match="unknown algorithm: 'grop'. Did you mean grpo"):
        load_config(BASE | {"algorithm": "grop"})
    ipo = yaml.safe_load(dump_config(load_config(BASE | {"algorithm": "dpo", "dpo": {"kind": "ipo"}})))
    assert set(ipo["dpo"]) == {"kind", "beta", "sft_weight", "ref_model"}
