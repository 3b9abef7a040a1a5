"""The vLLM generation engine: fast sampling on a GPU, weights pushed in place after each update.

vLLM runs in the training process ("colocate", as TRL's `vllm_mode="colocate"`): each process holds an
engine over its GPU with `rollout.vllm_gpu_memory_utilization` of the memory, samples its own share of
the prompts, and receives the trainer's weights through the model runner's `load_weights` after every
policy update; no restart, no reload from disk. Only used where vLLM and a GPU are present
(`rollout.engine: auto` picks it there); everything else runs on `HFEngine`.

Log-probs: vLLM reports those of the processed distribution (temperature, top-k/top-p applied) and its
kernels differ from the trainer's in low precision, so `exact_logprobs` is False and the trainer
recomputes the old log-probs of a synchronous rollout with its own forward pass.
"""

from __future__ import annotations

import os

from posttrain.rollout.engine import Completion, Sampling, eos_ids


class VLLMEngine:
    exact_logprobs = False

    def __init__(self, cfg, model, tokenizer, accelerator):
        from vllm import LLM

        # vLLM's in-process ("external_launcher") executor reads the torch.distributed layout from the env.
        os.environ.setdefault("RANK", str(accelerator.process_index))
        os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index))
        os.environ.setdefault("WORLD_SIZE", str(accelerator.num_processes))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        self.llm = LLM(
            model=cfg.model.path,
            tokenizer=cfg.model.tokenizer or cfg.model.path,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            max_model_len=cfg.data.max_length,
            distributed_executor_backend="external_launcher",
            seed=cfg.train.seed + accelerator.process_index,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            trust_remote_code=cfg.model.trust_remote_code,
        )
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, tokenizer)
        self.policy_version = 0

    def load_weights(self, model, version: int) -> None:
        if model is not None:
            from posttrain.models import is_peft

            net = model.merge_and_unload() if is_peft(model) else model  # vLLM serves the merged weights
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            runner.model.load_weights((name, p.detach()) for name, p in net.state_dict().items())
            self.llm.reset_prefix_cache()
        self.policy_version = version

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0,
            seed=sampling.seed,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        groups = []
        for out in outputs:
            group = []
            for o in out.outputs:
                ids = list(o.token_ids)
                logps = [step[token].logprob for step, token in zip(o.logprobs or [], ids)]
                reason = "stop" if o.finish_reason == "stop" else "length"
                group.append(Completion(ids, logps, o.text, reason, self.policy_version))
            groups.append(group)
        return groups
