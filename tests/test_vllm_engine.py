"""VLLMEngine against a fake `vllm` module (no GPU, no vLLM here): the LLM it builds, the sampling
parameters it asks for, how it reads vLLM's outputs, and the weights it pushes after an update (plain and
LoRA models, the trainer's adapters left intact)."""

import copy
import importlib.machinery
import os
import sys
import types
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import LoraConfig, load_config
from posttrain.models import add_lora, is_peft
from posttrain.rollout.engine import HFEngine, Sampling
from posttrain.tasks.tiny import build_tiny
from posttrain.train import make_engine

# Argument names of vLLM's LLM (engine args) and SamplingParams: a misspelt or removed one fails as there.
LLM_ARGS = {
    "model", "tokenizer", "trust_remote_code", "gpu_memory_utilization", "max_model_len", "seed",
    "distributed_executor_backend", "tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens",
    "enable_prefix_caching", "enable_sleep_mode", "logprobs_mode", "dtype", "quantization", "model_impl",
}  # fmt: skip
SAMPLING_ARGS = {
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
    "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "structured_outputs", "logit_bias", "allowed_token_ids", "extra_args",
}  # fmt: skip


class FakeSamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - SAMPLING_ARGS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected arguments {unknown}")
        self.kwargs = kwargs


class FakeVLLMModel:
    def __init__(self):
        self.pushed: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        # vLLM copies each tensor into its own parameters as it goes
        self.pushed.extend((name, t.detach().clone()) for name, t in weights)


def fake_outputs(prompts, n):
    """Completion j of prompt i: 1 + (i + j) % 3 tokens, ids 100*i + 10*j + k; each step's logprob dict has
    the sampled token and a decoy of rank 1; even j stopped, odd j ran out of tokens."""
    outputs = []
    for i, prompt in enumerate(prompts):
        completions = []
        for j in range(n):
            ids = [100 * i + 10 * j + k for k in range(1 + (i + j) % 3)]
            steps = [
                {
                    5: SimpleNamespace(logprob=-0.01, rank=1, decoded_token="x"),
                    t: SimpleNamespace(logprob=-(t + 1) / 1000, rank=2, decoded_token="y"),
                }
                for t in ids
            ]
            completions.append(
                SimpleNamespace(
                    index=j,
                    token_ids=tuple(ids),
                    logprobs=steps,
                    text=f"p{i}c{j}",
                    finish_reason="stop" if j % 2 == 0 else "length",
                )
            )
        outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=completions))
    return outputs


class FakeLLM:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - LLM_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected arguments {unknown}")
        self.kwargs = kwargs
        self.env = {
            k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        self.model = FakeVLLMModel()
        runner = SimpleNamespace(model=self.model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )
        self.prefix_resets = 0
        self.calls = []

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        assert isinstance(sampling_params, FakeSamplingParams) and use_tqdm is False
        self.calls.append((prompts, sampling_params))
        return fake_outputs(prompts, sampling_params.kwargs.get("n", 1))


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec("vllm") finds it
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    with mock.patch.dict(os.environ):  # the engine sets RANK, MASTER_PORT, ...: restore them after
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        yield module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("vllm") / "tiny", size="tiny")


def make_cfg(tiny, tmp_path, **rollout):
    return load_config(
        {
            "algorithm": "grpo",
            "out": str(tmp_path / "run"),
            "model": {"path": str(tiny)},
            "data": {"train": str(tmp_path / "prompts.jsonl"), "max_length": 96},
            "rollout": {"group_size": 3, "max_new_tokens": 8, "vllm_gpu_memory_utilization": 0.4, **rollout},
            "train": {"seed": 11},
        }
    )


def single_process():
    return SimpleNamespace(process_index=0, local_process_index=0, num_processes=1)


@pytest.fixture
def parts(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    return model, AutoTokenizer.from_pretrained(tiny)


def engine_for(cfg, parts, accelerator=None):
    from posttrain.rollout.vllm import VLLMEngine

    model, tokenizer = parts
    return VLLMEngine(cfg, model, tokenizer, accelerator or single_process())


def test_builds_a_colocated_llm(fake_vllm, tiny, tmp_path, parts):
    accelerator = SimpleNamespace(process_index=1, local_process_index=1, num_processes=2)
    engine = engine_for(make_cfg(tiny, tmp_path), parts, accelerator)
    kw = engine.llm.kwargs
    assert kw["model"] == kw["tokenizer"] == str(tiny)
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["gpu_memory_utilization"] == 0.4
    assert kw["max_model_len"] == 96
    assert kw["seed"] == 12  # train.seed + process index: each process samples differently
    env = engine.llm.env
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "2")
    assert env["MASTER_ADDR"] and int(env["MASTER_PORT"]) > 0
    assert engine.exact_logprobs is False
    assert parts[1].eos_token_id in engine.eos and engine.policy_version == 0


def test_keeps_a_launcher_master_port(fake_vllm, tiny, tmp_path, parts):
    os.environ["MASTER_PORT"] = "29877"
    assert engine_for(make_cfg(tiny, tmp_path), parts).llm.env["MASTER_PORT"] == "29877"


def test_sampling_params(fake_vllm, tiny, tmp_path, parts):
    engine = engine_for(make_cfg(tiny, tmp_path), parts)
    sampling = Sampling(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=0, stop=("\n", "##"), seed=3)
    engine.generate([[1, 2, 3], [4, 5]], 3, sampling)
    prompts, params = engine.llm.calls[-1]
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]
    kw = params.kwargs
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["max_tokens"], kw["seed"]) == (3, 0.7, 0.9, 5, 3)
    assert kw["top_k"] in (0, -1)  # top-k off (vLLM >= 0.22 takes 0 or -1)
    assert kw["stop"] == ["\n", "##"]
    assert kw["logprobs"] == 0  # the sampled token's log-prob, no alternatives
    assert kw["stop_token_ids"] == engine.eos
    assert kw["skip_special_tokens"] is False  # the text keeps special tokens, as HFEngine's

    engine.generate([[1]], 1, Sampling(max_new_tokens=2, temperature=0, top_k=7))
    kw = engine.llm.calls[-1][1].kwargs
    assert (kw["top_k"], kw["stop"], kw["seed"], kw["temperature"]) == (7, None, None, 0)


def test_completions_grouped_per_prompt(fake_vllm, tiny, tmp_path, parts):
    engine = engine_for(make_cfg(tiny, tmp_path), parts)
    engine.policy_version = 6
    groups = engine.generate([[1, 2], [3], [4, 5, 6]], 2, Sampling())
    assert [len(g) for g in groups] == [2, 2, 2]
    for i, group in enumerate(groups):
        for j, c in enumerate(group):
            ids = [100 * i + 10 * j + k for k in range(1 + (i + j) % 3)]
            assert c.token_ids == ids and isinstance(c.token_ids, list)
            assert c.logprobs == [-(t + 1) / 1000 for t in ids]  # the sampled token's, not the decoy's
            assert c.text == f"p{i}c{j}"
            assert c.finish_reason == ("stop" if j % 2 == 0 else "length")
            assert c.policy_version == 6


def test_pushes_every_parameter_of_a_plain_model(fake_vllm, tiny, tmp_path, parts):
    engine = engine_for(make_cfg(tiny, tmp_path), parts)
    model = parts[0]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # an "update": not what vLLM loaded from disk
    engine.load_weights(model, 4)
    pushed = engine.llm.model.pushed
    expected = list(model.named_parameters())
    assert [n for n, _ in pushed] == [n for n, _ in expected]
    assert "model.embed_tokens.weight" in dict(pushed)
    for (_, got), (_, want) in zip(pushed, expected):
        assert torch.equal(got, want)
    assert engine.policy_version == 4 and engine.llm.prefix_resets == 1

    engine.load_weights(None, 5)  # only the version
    assert len(engine.llm.model.pushed) == len(expected) and engine.llm.prefix_resets == 1
    assert engine.policy_version == 5


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_pushes_merged_lora_weights_and_keeps_the_adapters(fake_vllm, tiny, tmp_path, parts):
    engine = engine_for(make_cfg(tiny, tmp_path), parts)
    model = add_lora(parts[0], LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # trained adapters: merged weights differ from the base
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.tensor([[1, 5, 7, 9]])
    logits_before = model(input_ids=x).logits.detach()
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())

    engine.load_weights(model, 1)
    pushed = dict(engine.llm.model.pushed)
    assert list(pushed) == list(merged)  # base names, each once, in order
    assert not [n for n in pushed if "lora" in n or "base_layer" in n or n.startswith("base_model")]
    for name, want in merged.items():
        torch.testing.assert_close(pushed[name], want, rtol=0, atol=1e-6)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny).named_parameters())
    assert [n for n in merged if not torch.allclose(pushed[n], base[n])]  # the adapters' deltas went in
    assert engine.policy_version == 1 and engine.llm.prefix_resets == 1

    # the trainer's model is still the unmerged, trainable PEFT model it was
    assert is_peft(model) and lora_layers(model) and not any(m.merged for m in lora_layers(model))
    assert {n for n, _ in model.named_parameters()} == set(before)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)
        assert p.requires_grad == ("lora_" in n)
    torch.testing.assert_close(model(input_ids=x).logits, logits_before, rtol=0, atol=1e-5)


def test_unreachable_model_runner_is_a_clear_error(fake_vllm, tiny, tmp_path, parts):
    class MultiprocessLLM(FakeLLM):  # the engine core in another process: no model_executor here
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.llm_engine = SimpleNamespace()

    fake_vllm.LLM = MultiprocessLLM
    with pytest.raises(RuntimeError, match="external_launcher"):
        engine_for(make_cfg(tiny, tmp_path), parts)


def test_make_engine_auto_is_hf_without_cuda(fake_vllm, tiny, tmp_path, parts, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, tokenizer = parts
    engine = make_engine(make_cfg(tiny, tmp_path, engine="auto"), model, tokenizer, single_process())
    assert isinstance(engine, HFEngine) and engine.model is model


def test_make_engine_picks_vllm(fake_vllm, tiny, tmp_path, parts, monkeypatch):
    from posttrain.rollout.vllm import VLLMEngine

    model, tokenizer = parts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine = make_engine(make_cfg(tiny, tmp_path, engine="vllm"), model, tokenizer, single_process())
    assert isinstance(engine, VLLMEngine) and isinstance(engine.llm, FakeLLM)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = make_engine(make_cfg(tiny, tmp_path, engine="auto"), model, tokenizer, single_process())
    assert isinstance(engine, VLLMEngine)
