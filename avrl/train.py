"""`task=train`: compose data, model, algorithm, logger and Trainer from the config, then fit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import optuna
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from avrl import console, final_eval, preemption, resume, spool, strategies, tracking
from avrl.checkpoint_sweep import KeepCheckpoints, base_generation_config
from avrl.checkpoints import SafeCheckpointIO
from avrl.datamodule import AudioQADataModule, SkippedItems
from avrl.models import load_processor
from avrl.prompts import PromptSpec, prompt_mix, prompt_spec
from avrl.redaction import redact, scrub
from avrl.scoring import accuracy_metrics
from avrl.sweeps import optuna_search

log = logging.getLogger(__name__)


def reward_functions(cfg: DictConfig) -> tuple[dict, dict]:
    functions = {name: instantiate(fn) for name, fn in cfg.reward.functions.items()}
    weights = {name: float(w) for name, w in cfg.reward.weights.items()}
    return functions, weights


def build_module(cfg: DictConfig, processor, prompt: PromptSpec, model=None):
    functions, weights = reward_functions(cfg)
    module_cls = instantiate({"_target_": cfg.algorithm._target_, "_partial_": True})
    return module_cls(
        model_cfg=cfg.model,
        algorithm=cfg.algorithm,
        optim=cfg.optim,
        processor=processor,
        prompt=prompt,
        reward_functions=functions,
        reward_weights=weights,
        model=model,
        rollout=cfg.rollout,
    )


def build_trainer(cfg: DictConfig, logger, extra_callbacks=()) -> L.Trainer:
    out = Path(cfg.output_dir)
    callbacks = [
        ModelCheckpoint(  # the best by val/accuracy (and last.ckpt at each validation)
            dirpath=out / "checkpoints",
            monitor="val/accuracy",
            mode="max",
            save_top_k=1,
            save_last=True,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        ModelCheckpoint(  # last.ckpt every N steps: the full training state to resume from (ckpt_path=last)
            dirpath=out / "checkpoints",
            save_top_k=0,
            save_last=True,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            enable_version_counter=False,
        ),
        resume.ResumeState(),
        *keep_checkpoints(cfg, out),
        tracking.completions_callback(cfg.algorithm.log_completions_every_n_steps),
        *extra_callbacks,
        *(instantiate(c) for c in cfg.callbacks.values()),  # the user's own (config key `callbacks`)
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(console.progress_bar())
    if cfg.trainer.enable_model_summary:
        callbacks.append(console.model_summary())  # Lightning's, without its FLOPs (always 0 here)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(trainer_args.get("strategy"), dict):
        trainer_args["strategy"] = strategies.build(trainer_args["strategy"], cfg)
    # The datamodule's EpochSampler splits the data over ranks itself (so that resume is exact under DDP too).
    trainer = L.Trainer(
        **trainer_args,
        logger=logger if logger else False,
        callbacks=callbacks,
        default_root_dir=out,
        use_distributed_sampler=False,
    )
    if not isinstance(trainer.strategy, strategies.DeepSpeedStrategy):  # DeepSpeed writes its own (strategies.py)
        trainer.strategy.checkpoint_io = SafeCheckpointIO()
    return trainer


def keep_checkpoints(cfg: DictConfig, out: Path) -> list[KeepCheckpoints]:
    """The weights every `keep_checkpoints_every_n_steps` steps, all kept (avrl/checkpoint_sweep.py); none if null."""
    every = cfg.keep_checkpoints_every_n_steps
    return [KeepCheckpoints(every, out, cfg.model)] if every is not None else []


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; returns the last validation's val/* metrics. Any failure after the MLflow run exists
    marks it FAILED with the traceback as an artifact, then propagates (a non-zero exit, a FAILED sweep job)."""
    strategies.check(cfg)  # before any folder, MLflow run or model exists
    strategies.apply_global_batch(cfg)  # algorithm.prompts_per_step -> data.batch_size on this run's devices
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scrub(out / ".hydra")  # the overrides Hydra saved there, secrets included
    done = resume.completed_result(out) if cfg.ckpt_path == "auto" else None
    if done is not None:
        resume.check_same_job(out)  # a requeued job, or a sweep run again into its folder, after it had finished
        log.info(
            "%s holds a finished run: its result is returned, nothing is trained again (a fresh run: another "
            "hydra.run.dir, or ckpt_path=null)",
            out,
        )
        return done
    ckpt_path = resume.resolve_ckpt_path(cfg.ckpt_path, out)
    logger = open_run(cfg, out, ckpt_path)
    try:
        return _train(cfg, out, logger, ckpt_path)
    except optuna.TrialPruned:
        raise  # not a failure: the run finished cleanly and the sweeper records the trial as pruned
    except preemption.Stopped as stop:  # not a failure: preempted or out of time, its checkpoint saved
        preemption.hand_over(stop, logger)  # marks the MLflow run, then requeues or exits
    except BaseException as error:
        tracking.record_failure(logger, error)
        raise
    finally:
        spool.finish(logger)  # what waited for an absent MLflow server is sent, or its place is printed


def open_run(cfg: DictConfig, out: Path, ckpt_path: str | None):
    """The job's MLflow logger (None with logger=none). A resumed run (and, with ckpt_path=auto, a run killed
    before its first checkpoint) logs into the MLflow run of its output folder, each metric step once, counting
    its resumes; a fresh run records its run there. Writes wait on disk while the server is away (spool.py)."""
    if ckpt_path:
        console.resuming()
    run_id = resume.resumed_run_id(out) if ckpt_path or cfg.ckpt_path == "auto" else None
    logger = tracking.make_logger(cfg, run_id=run_id)
    spool.attach(logger, out, cfg.logger.tracking_uri or "")
    if logger is not None and run_id is None:
        resume.save_run_info(out, logger.run_id)
    elif logger is not None:
        resume.log_each_step_once(logger)
        count = int(logger.experiment.get_run(run_id).data.tags.get("resume_count", "0")) + 1
        logger.experiment.set_tag(run_id, "resume_count", str(count))
    return logger


def _train(cfg: DictConfig, out: Path, logger, ckpt_path: str | None) -> dict[str, float]:
    processor = load_processor(cfg.model)
    prompt = prompt_spec(cfg)

    # Data first: a bad file stops the run before any model is loaded.
    datamodule = AudioQADataModule(
        cfg.data,
        processor,
        prompt,
        splits=("train", "val"),
        shuffle_seed=cfg.seed,
        keep_media=cfg.rollout.backend == "vllm",  # vLLM encodes the raw audio itself
        prompt_mix=prompt_mix(cfg),
    )
    datamodule.setup()
    datamodule.write_skipped(out)
    if logger is not None and datamodule.skipped:
        logger.log_metrics({"data/skipped": len(datamodule.skipped)}, step=0)
        tracking.log_file(logger, out / "skipped_items.json")

    trial, pruning = None, []
    if cfg.trial is not None:  # set when the Optuna sweeper launched this job
        trial = optuna_search.job_trial(cfg.trial)
        pruning = [optuna_search.pruning_callback(trial, cfg.objective)] if trial else []
    if trial and logger is not None:
        trial.set_user_attr("mlflow_run_id", logger.run_id)
    if trial and "SLURM_JOB_ID" in os.environ:  # a trial failed as stale has its job cancelled (optuna_search.py)
        trial.set_user_attr("slurm_job", preemption.slurm_job_id())

    module = build_module(cfg, processor, prompt)
    stopper = preemption.StopOnSignal(out / "checkpoints" / "last.ckpt")
    trainer = build_trainer(cfg, logger, [SkippedItems(datamodule, out), stopper, *pruning])
    # weights_only: a checkpoint is read as tensors and plain values, never as arbitrary pickled objects.
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if pruning and pruning[0].pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at step {pruning[0].pruned_at}")
    if module.last_validated_step != trainer.global_step and trainer.limit_val_batches != 0:
        # The last step was not a validation step (max_steps not a multiple of val_check_interval): validate the
        # trained model once more, so that val/* (the run's result, a sweep's objective) is the final model's.
        module.validate_now()

    # The final model's val/* from its scored items (exact; the callback metrics are float32 copies).
    metrics = accuracy_metrics(module.last_val_results, "val") if module.last_val_results else {}
    metrics.update(final_eval.run(cfg, trainer, module, datamodule, out, metrics.get("val/accuracy")))
    for keeper in (c for c in trainer.callbacks if isinstance(c, KeepCheckpoints)):
        keeper.record_final(trainer, trainer.global_step, metrics.get("val/accuracy"))
    if cfg.save_final_model:
        save_model(trainer, module, processor, out / "final_model")
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if logger is not None:
        logger.experiment.set_tag(logger.run_id, "best_checkpoint", best)
        logger.experiment.set_tag(logger.run_id, "final_model", str(out / "final_model"))
        if (out / final_eval.FILE).exists():
            tracking.log_file(logger, out / final_eval.FILE)
    if trainer.is_global_zero:
        resume.save_run_info(out, logger.run_id if logger is not None else None, completed=metrics)
        # No in-training validation ran (max_steps below trainer.val_check_interval): no best checkpoint was kept.
        print(f"\noutputs: {out}\ncheckpoint (best val/accuracy): {best or 'none (no validation during training)'}")
    if logger is not None:
        uri = redact(cfg.logger.tracking_uri)
        print(
            f"MLflow: run {logger.run_id} in experiment {logger.experiment_id} at {uri}\n"
            f"  view with: mlflow ui --backend-store-uri {uri}"
        )
    return metrics


def save_model(trainer: L.Trainer, module, processor, path: Path) -> None:
    """The trained weights (or LoRA adapters) as a transformers folder that `model.name_or_path=` can load.
    Called on every rank: under ZeRO-3 the ranks gather the partitioned weights together; rank 0 writes."""
    with strategies.full_weights(trainer.strategy, module.model):
        if not trainer.is_global_zero:
            return
        module.model.save_pretrained(path)  # adapters only, for a LoRA model
        processor.save_pretrained(path)
        lora = module.algo.lora
        if not lora:  # the base's sampling settings, as in the kept checkpoints (eval.decoding=checkpoint reads them)
            base_generation_config(module.model_cfg, path)
        if lora and lora.merge_on_save:
            merged = path.with_name(path.name + "_merged")
            module.model.merge_and_unload().save_pretrained(merged)
            processor.save_pretrained(merged)
            base_generation_config(module.model_cfg, merged)
    log.info("saved the trained model to %s", path)
