"""What every stage does around its loop, offline, online or agentic: its config checked in full, the result
it returns, the files of a data spec, its health monitor, its generation engine, its sandbox, the loop over a
rollout source, final/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import RunConfig, load_config
from posttrain.engine.run import Run
from posttrain.errors import ConfigError, disk_full


def load_stage(config: RunConfig | str | Path | dict, overrides=()) -> RunConfig:
    """A stage's config, validated (``load_config``) and checked against the names only the layers above the
    config know: an agent environment, its tool format and budgets (posttrain/agents/config.py). Every
    problem is a ConfigError before a model is loaded or a file written."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if getattr(cfg, "env", None) is not None:
        from posttrain.agents.config import check_env_config

        try:
            check_env_config(cfg.env)
        except ValueError as e:
            raise ConfigError(f"{cfg.out}: invalid config\n  env: {e}") from None
    return cfg


@dataclass
class StageResult:
    run_dir: Path
    final: Path | None  # None when the run was interrupted before the end
    step: int
    metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    interrupted: str | None = None


def files(spec: str | list[str] | None) -> list[str]:
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)


def build_monitor(cfg: RunConfig, run: Run, accelerator):
    """The health monitor of the stage (None when disabled); only the main process writes alerts."""
    main = accelerator.is_main_process
    return cfg.monitor.build(
        "online" if cfg.online else "offline",
        alerts_path=run.path / "alerts.jsonl" if main else None,
        echo=accelerator.print,
    )


def finish(result, algo, model, tokenizer, run: Run, accelerator) -> StageResult:
    """final/ (main process) and the result in the manifest, unless the run was interrupted."""
    final = None
    if result.interrupted is None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = run.final
            with disk_full(f"step {result.step}: writing the final model to {final}"):
                algo.save_final(accelerator.unwrap_model(model), tokenizer, final)
            run.update_manifest(result={"step": result.step, **result.metrics, **result.eval_metrics})
        accelerator.wait_for_everyone()
    return StageResult(
        run_dir=run.path,
        final=final,
        step=result.step,
        metrics=result.metrics,
        eval_metrics=result.eval_metrics,
        interrupted=result.interrupted,
    )


def run_source(
    cfg: RunConfig,
    algo,
    source,
    *,
    model,
    tokenizer,
    accelerator,
    run: Run,
    evaluator,
    resume: bool,
    after_close: Callable[[], None] | None = None,
) -> StageResult:
    """Train on a rollout source (the online and agent stages): the loop, then the source closed (its
    engine and workers) and `after_close` called whatever happened, then final/ (:func:`finish`)."""
    from posttrain.engine.loop import train_loop

    try:
        result = train_loop(
            cfg.train,
            accelerator=accelerator,
            model=model,
            objective=algo.Objective(cfg),
            data=source,
            evaluator=evaluator,
            run=run,
            monitor=build_monitor(cfg, run, accelerator),
            resume=resume,
        )
    finally:
        source.close()
        if after_close is not None:
            after_close()
    return finish(result, algo, model, tokenizer, run, accelerator)


def make_engine(cfg: RunConfig, model, tokenizer, accelerator):
    """The generation engine: vLLM when asked for (or 'auto' with vLLM and a GPU), else HF."""
    import importlib.util

    import torch

    from posttrain.rollout.engine import HFEngine

    kind = cfg.rollout.engine
    if kind == "auto":
        kind = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    if kind == "vllm":
        from posttrain.rollout.vllm import VLLMEngine

        return VLLMEngine(cfg, model, tokenizer, accelerator)
    if (
        cfg.rollout.dtype != "same"
    ):  # a sampler copy in another precision: its log-probs are not the trainer's
        engine = HFEngine.copy_of(model, tokenizer, batch_size=cfg.rollout.generation_batch_size)
        engine.model.to(getattr(torch, cfg.rollout.dtype))
        engine.exact_logprobs = False
        return engine
    return HFEngine(model, tokenizer, batch_size=cfg.rollout.generation_batch_size)


def sandbox_for(cfg: RunConfig, run: Run) -> dict:
    """The sandbox of this run's untrusted code (code rewards, agent tools): its backend, logged to
    sandbox.jsonl in the run directory; the manifest records it. A weak backend is said out loud."""
    from posttrain import sandbox

    try:
        info = sandbox.configure(cfg.sandbox.backend, log_dir=run.path, cgroup_parent=cfg.sandbox.cgroup)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except sandbox.SandboxUnavailable as e:
        specs = [*cfg.rl.rewards, *(cfg.rl.eval_rewards or [])]
        if getattr(cfg, "env", None) is None and not any(_runs_code(spec) for spec in specs):
            return {"backend": None, "reason": "no reward runs code"}
        raise ConfigError(f"sandbox.backend: {e}") from None
    if info["weak"]:
        print("warning: sandbox.backend is `process`: untrusted code runs without OS-level isolation")
    return info


def _runs_code(spec) -> bool:
    name = spec if isinstance(spec, str) else spec.get("name", "")
    return "code" in str(name)


def online_models(cfg: RunConfig, algo, accelerator):
    """(the trained module: the policy, with its critic for PPO; the frozen reference on the device when the
    algorithm has one (`algo.reference`: a KL term, online DPO), else None)."""
    from posttrain.models import load_model

    model = algo.load_model(cfg)
    reference, reference_cfg = None, algo.reference(cfg)
    if reference_cfg is not None:
        reference = load_model(reference_cfg, trainable=False)
        reference.to(accelerator.device)
    return model, reference


def model_paths(cfg: RunConfig) -> list[str]:
    """Every model a stage reads, for the manifest: the policy, a DPO reference, PPO's critic."""
    extra = {"dpo": ("dpo", "ref_model"), "online_dpo": ("dpo", "ref_model"), "ppo": ("ppo", "critic")}.get(
        cfg.algorithm
    )
    path = getattr(getattr(cfg, extra[0]), extra[1]) if extra else None
    return [cfg.model.path] + ([path] if path else [])


def record_start(
    run: Run, cfg: RunConfig, accelerator, model, *, what: str, inputs: list, data: dict, **extra
):
    """Say what trains (``what``, then the model's parameter counts), write config.yaml and manifest.json."""
    from posttrain.config import dump_config
    from posttrain.models import count_parameters

    trainable, total = count_parameters(model)
    accelerator.print(f"{what}, model {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable)")
    run.write_text("config.yaml", dump_config(cfg))
    run.write_manifest(
        config=cfg.model_dump(mode="json"),
        seed=cfg.train.seed,
        inputs=inputs,
        models=model_paths(cfg),
        data=data,
        parameters={"total": total, "trainable": trainable},
        processes=accelerator.num_processes,
        **extra,
    )
