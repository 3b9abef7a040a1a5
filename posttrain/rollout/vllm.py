"""The vLLM generation engine: fast sampling on a GPU, weights pushed in place after each update.

vLLM runs in the training process ("colocate", as TRL's `vllm_mode="colocate"`, trl/generation/
vllm_generation.py, for vLLM 0.22 to 0.31): each process holds an engine over its GPU with
`rollout.vllm_gpu_memory_utilization` of the memory, samples its own share of the prompts, and receives
the trainer's weights after every policy update through the model runner's `load_weights`, parameter by
parameter under its Hugging Face name; no restart, no reload from disk. A LoRA model is pushed merged:
the adapters are merged into the base weights for the push and unmerged after it, so the trained
adapters stay as they were. Only used where vLLM and a GPU are present (`rollout.engine: auto` picks
it there); everything else runs on `HFEngine`.

Completions follow the engine protocol: the token ids include the eos / the token completing a stop
string, the text is cut before them and keeps other special tokens.

Log-probs: vLLM reports those of the processed distribution (temperature, top-k/top-p applied) and its
kernels differ from the trainer's in low precision, so `exact_logprobs` is False and the trainer
recomputes the old log-probs of a synchronous rollout with its own forward pass.
"""

from __future__ import annotations

import os
import socket

import torch

from posttrain.rollout.engine import Completion, Sampling, eos_ids


class VLLMEngine:
    exact_logprobs = False

    def __init__(self, cfg, model, tokenizer, accelerator):
        from vllm import LLM

        # vLLM's in-process ("external_launcher") executor reads the torch.distributed layout from the env.
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or "localhost"
        if os.environ.get("MASTER_PORT", "").strip().lower() in ("", "0", "auto"):
            os.environ["MASTER_PORT"] = str(_free_port())  # two runs on one machine must not collide
        self.llm = LLM(
            model=cfg.model.path,
            tokenizer=cfg.model.tokenizer or cfg.model.path,
            trust_remote_code=cfg.model.trust_remote_code,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            max_model_len=cfg.data.max_length,
            distributed_executor_backend="external_launcher",
            seed=cfg.train.seed + accelerator.process_index,
            max_num_batched_tokens=4096,  # as TRL: vLLM's memory profiler misjudges the larger default
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",  # the sampled distribution's, as the trainer's
        )
        self._vllm_model()  # fail now, not after the first optimiser step
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, tokenizer)
        self.policy_version = 0

    def _vllm_model(self):
        """vLLM's own nn.Module, reachable in this process with the in-process executor (as TRL reaches it)."""
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            raise RuntimeError(
                "cannot reach vLLM's model at llm.llm_engine.model_executor.driver_worker.model_runner.model "
                "to push the trainer's weights: this needs vLLM's in-process engine "
                "(distributed_executor_backend='external_launcher'), as in the vLLM 0.22 to 0.31 that TRL "
                "1.16 supports"
            ) from None

    def load_weights(self, model, version: int) -> None:
        if model is not None:
            from posttrain.models import is_peft

            target, peft = self._vllm_model(), is_peft(model)
            with torch.no_grad():
                if peft:
                    model.merge_adapter()  # in place, undone below (merge_and_unload would drop the adapters)
                try:
                    target.load_weights(_named_weights(model))  # vLLM copies each tensor into its own
                finally:
                    if peft:
                        model.unmerge_adapter()
            self.llm.reset_prefix_cache()  # cached prompt keys / values were computed by the old weights
        self.policy_version = version

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0: no top-k, in vLLM as here
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=self.eos,
            skip_special_tokens=False,
            logprobs=0,  # the sampled token's only
            seed=sampling.seed,
        )
        prompts = [{"prompt_token_ids": p} for p in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        groups = []
        for out in outputs:
            group = []
            for o in out.outputs:
                ids = list(o.token_ids)
                logps = [step[token].logprob for step, token in zip(o.logprobs, ids, strict=True)]
                reason = "stop" if o.finish_reason == "stop" else "length"
                group.append(Completion(ids, logps, o.text, reason, self.policy_version))
            groups.append(group)
        return groups


def _named_weights(model):
    """(name, tensor) of each parameter under the name vLLM loads it by: the Hugging Face one. Of a PEFT
    model (its adapters merged), the base weights without the `base_model.model.` / `.base_layer` parts, no
    LoRA tensors, and a `modules_to_save` copy in place of its original (TRL's `_iter_named_params`)."""
    from posttrain.models import is_peft

    if not is_peft(model):
        for name, param in model.named_parameters():  # tied weights once, as vLLM expects
            yield name, param.detach()
        return
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if model.prefix in name or "original_module" in name:
            continue
        yield name.replace("modules_to_save.default.", ""), param.detach()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
