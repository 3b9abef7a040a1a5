"""SFT end to end on the tiny model: it learns, LoRA works, the CLI reports bad input, a killed
run resumes exactly, and two processes under `accelerate launch` match one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.engine.run import read_metrics
from posttrain.errors import ConfigError
from posttrain.eval.generation import accuracy
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    build_tiny(root / "tiny", size="tiny")
    rows = arithmetic.sft_rows(3000, seed=0, levels=("add1", "add2"))
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(task, out, **train):
    return {
        "algorithm": "sft",
        "out": str(out),
        "model": {"path": str(task / "tiny")},
        "data": {"train": str(task / "sft.jsonl"), "max_length": 64},
        "train": {
            "lr": 3e-3,
            "batch_size": 32,
            "max_steps": 8,
            "progress": False,
            "tensorboard": False,
            **train,
        },
    }


def weights(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_sft_raises_held_out_accuracy(task, tmp_path):
    rows = arithmetic.eval_rows(levels=("add1",), n_per_level=100)
    tiny = task / "tiny"
    model = AutoModelForCausalLM.from_pretrained(tiny)
    from transformers import AutoTokenizer

    before = accuracy(model, AutoTokenizer.from_pretrained(tiny), rows)
    cfg = config(
        task, tmp_path / "sft", max_steps=250, batch_size=64, warmup_steps=10, lr=3e-3, betas=[0.9, 0.98]
    )
    res = train(cfg)
    after = accuracy(
        AutoModelForCausalLM.from_pretrained(res.final), AutoTokenizer.from_pretrained(res.final), rows
    )
    assert before < 0.05 and after > before + 0.4, (before, after)
    manifest = json.loads((res.run_dir / "manifest.json").read_text())
    assert str(task / "sft.jsonl") in manifest["inputs"] and manifest["versions"]["torch"]
    assert (res.run_dir / "config.yaml").exists() and len(read_metrics(res.run_dir)) == 250


def test_lora_trains_adapter_and_writes_merged_model(task, tmp_path):
    cfg = config(task, tmp_path / "lora", max_steps=4, lr=1e-2)
    cfg["model"]["lora"] = {"r": 4, "alpha": 8}
    res = train(cfg)
    assert (res.final / "adapter" / "adapter_config.json").exists()
    merged, base = weights(res.final), weights(task / "tiny")
    assert merged.shape == base.shape and not torch.equal(merged, base)


def test_packing_and_padding_give_the_same_training(task, tmp_path):
    packed = train(config(task, tmp_path / "p", max_steps=3))
    padded = train(
        config(task, tmp_path / "q", max_steps=3)
        | {
            "data": {
                "train": str(task / "sft.jsonl"),
                "max_length": 64,
                "packing": False,
                "group_by_length": False,
            }
        }
    )
    lp = [m["loss"] for m in read_metrics(packed.run_dir)]
    lq = [m["loss"] for m in read_metrics(padded.run_dir)]
    assert lp == pytest.approx(lq, rel=1e-4)


def test_cli_bad_inputs_exit_2_with_clear_messages(task, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(arithmetic.sft_rows(1)[0])
    bad.write_text(
        good
        + "\n"
        + '{"messages": [{"role": "user", "content": "1+1"}, {"role": "asistant", "content": "2"}]}\n'
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(task, tmp_path / "r") | {"data": {"train": str(bad)}}))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "role" in err

    cfg.write_text(
        yaml.safe_dump(config(task, tmp_path / "r") | {"model": {"path": str(tmp_path / "missing")}})
    )
    assert main(["train", str(cfg)]) == 2
    assert "model path not found" in capsys.readouterr().err

    long_row = {"messages": [{"role": "user", "content": "1+" * 40}, {"role": "assistant", "content": "3"}]}
    bad.write_text(good + "\n" + json.dumps(long_row) + "\n")
    cfg.write_text(
        yaml.safe_dump(config(task, tmp_path / "r") | {"data": {"train": str(bad), "max_length": 32}})
    )
    assert main(["train", str(cfg)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err

    assert main(["train", str(cfg), "--set", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_data_validate_cli(task, capsys):
    assert (
        main(
            [
                "data",
                "validate",
                str(task / "sft.jsonl"),
                "--tokenizer",
                str(task / "tiny"),
                "--max-length",
                "12",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3000 valid sft rows" in out and "longer than 12" in out


def _cli(*args, env=None):
    return [sys.executable, "-m", "posttrain", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sigkill_then_resume_matches_uninterrupted(task, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(task, tmp_path / "whole", max_steps=30, save_every=5)))
    subprocess.run(_cli("train", str(cfg)), check=True, env=_env(), capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _cli("train", str(cfg), "--out", str(cut)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "step-10" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to save anything: resume must use step-10 (or later)
    proc.wait()
    assert not (cut / "final").exists()
    done = subprocess.run(
        _cli("train", str(cfg), "--out", str(cut), "--resume"), env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout + done.stderr
    assert torch.equal(weights(tmp_path / "whole" / "final"), weights(cut / "final"))
    assert [m["step"] for m in read_metrics(cut)] == list(range(1, 31))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_match_one(task, tmp_path):
    cfg = tmp_path / "c.yaml"
    # global batch 32 either way: one process x 2 micro-batches of 16, or two processes x 1
    cfg.write_text(yaml.safe_dump(config(task, tmp_path / "one", max_steps=6, micro_batch_size=16)))
    subprocess.run(_cli("train", str(cfg)), check=True, env=_env(), capture_output=True)
    # On a machine without GPUs, `--multi_gpu` makes accelerate start torchrun; posttrain's
    # Accelerator(cpu=True) then joins a gloo process group. (`--cpu --num_processes 2` alone
    # starts ONE process unless an MPI hostfile is given.)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "posttrain", "train", str(cfg), "--out", str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = [m["loss"] for m in read_metrics(tmp_path / "one")]
    two = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(one) == 6 and one == pytest.approx(two, rel=1e-5)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2


def test_gradient_checkpointing_and_bf16_autocast(task, tmp_path):
    plain = train(config(task, tmp_path / "plain", max_steps=3))
    cfg = config(task, tmp_path / "gc", max_steps=3, tensorboard=True)
    cfg["model"]["gradient_checkpointing"] = True
    ckpt = train(cfg)
    lp = [m["loss"] for m in read_metrics(plain.run_dir)]
    assert lp == pytest.approx(
        [m["loss"] for m in read_metrics(ckpt.run_dir)], rel=1e-5
    )  # recompute, same maths
    assert any((ckpt.run_dir / "tensorboard").iterdir())
    bf16 = train(config(task, tmp_path / "bf16", max_steps=3, precision="bf16"))
    lb = [m["loss"] for m in read_metrics(bf16.run_dir)]
    assert lb == pytest.approx(lp, rel=2e-2) and lb != lp  # autocast really on: close, not equal


def test_frozen_parameters_do_not_move(task, tmp_path):
    cfg = config(task, tmp_path / "frozen", max_steps=3)
    cfg["model"]["freeze"] = ["*embed_tokens*", "model.layers.0.*"]
    res = train(cfg)
    before = AutoModelForCausalLM.from_pretrained(task / "tiny").state_dict()
    after = AutoModelForCausalLM.from_pretrained(res.final).state_dict()
    frozen = [k for k in before if "embed_tokens" in k or k.startswith("model.layers.0.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(
        before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"]
    )
    cfg["model"]["freeze"] = ["*no_such_weight*"]
    with pytest.raises(ConfigError, match="matches no parameter"):
        train({**cfg, "out": str(tmp_path / "bad")})
