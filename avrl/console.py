"""A console without noise: what `python run.py` prints is where outputs go, val/accuracy as it moves, the MLflow
run, and real warnings. Each line once; the libraries' tips, deprecation notices about their own internals and
CPU-only hardware notes are dropped here (and only here).

`quiet()` runs at the start of every `python run.py` job (after Hydra has set up logging); `progress_bar()` is the
training bar (steps, not "Epoch 0/-2", and no v_num); `model_summary()` is Lightning's model summary without FLOPs;
`quiet_deepspeed()` runs where avrl's DeepSpeed strategy is built.
"""

from __future__ import annotations

import builtins
import importlib
import logging
import os
import warnings

from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from rich import get_console
from rich.table import Table
from transformers.utils import logging as hf_logging

# Python warnings from libraries about their own code, not the user's (message regexes).
LIBRARY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # torch's pytree API, used by Lightning
    r"You have overridden `transfer_batch_to_device`",  # avrl's module moves its batches (items are not tensors)
    r"`is_gradient_checkpointing` is deprecated",  # PEFT reading a transformers attribute
    # GRPO steps its optimizer by hand and checkpoints the state after the step on purpose (what resume needs);
    # Lightning said so with a code sample at every checkpoint.
    r"Using ModelCheckpoint with manual optimization",
    # Lightning on any machine with SLURM's client installed (a login node); avrl's jobs reach SLURM through
    # hydra/launcher=slurm, which starts them with srun.
    r"The `srun` command is available on your system but is not used",
    # Resuming mid-epoch: Lightning cannot see that avrl's sampler skips the batches already trained on
    # (avrl.resume.EpochSampler; tests/test_resume.py checks the resumed run ends where an uninterrupted one ends).
    r"You're resuming from a checkpoint that ended before the epoch ended",
    # torch on DeepSpeed's own collectives (deepspeed/comm/torch.py), at every ZeRO step on every rank.
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
)
# Log records dropped, by logger name and a substring of the message.
NOISE = {
    "lightning.pytorch.utilities.rank_zero": (
        "litlogger",  # a tip
        "available: False",  # "GPU available: False"
        "Skipping setting a default `ModelSummary`",  # Lightning on avrl's summary (model_summary()), which replaces it
    ),
    "DeepSpeed": ("Setting accelerator to CPU",),  # said on import on every CPU machine
}
# transformers' own tqdm bars (transformers.utils.logging.tqdm), by description: "Loading weights" is drawn for every
# from_pretrained (core_model_loading.py: convert_and_load_state_dict_in_model; twice per run: the policy and the
# reference model, on every rank), "Writing model shards" for every save_pretrained (modeling_utils.py:
# save_pretrained; the final model). Both are over in a moment for the models avrl trains and are followed by
# avrl's own line where it matters ("saved the trained model to ..."). Hub download bars (huggingface_hub's
# own tqdm) are kept: a first download of a 7B model takes minutes.
TRANSFORMERS_BARS = ("Loading weights", "Writing model shards")


_QUIET = [False]


def quiet() -> None:
    if _QUIET[0]:  # a sweep runs its jobs in one process
        return
    _QUIET[0] = True
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning attaches its own stream handlers on import (`lightning` always; `lightning.pytorch` when logging
    # is not configured yet, as when this module is imported): every Lightning line then came twice, once through
    # Hydra's handler. One handler is left: Hydra's.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for name, fragments in NOISE.items():
        logging.getLogger(name).addFilter(lambda record, f=fragments: not any(x in record.getMessage() for x in f))
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("compilers.C.base").setLevel(logging.WARNING)  # the gcc lines of DeepSpeed's CPU op builds
    _quiet_transformers_bars()


def _quiet_transformers_bars() -> None:
    """TRANSFORMERS_BARS off through transformers' tqdm hook (transformers.utils.logging.set_tqdm_hook), every other
    bar as it was. transformers.utils.logging.disable_progress_bar() would turn the hub's download bars off too;
    transformers releases without the hook (5.0) keep the two bars."""
    if not hasattr(hf_logging, "set_tqdm_hook"):
        return
    previous = None

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in TRANSFORMERS_BARS:
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)


def quiet_deepspeed() -> None:
    """DeepSpeed's "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", dropped: a bare print()
    to stdout from every rank (deepspeed/comm/torch.py: build_shm_op, when TorchBackend starts: every CPU run of
    trainer=deepspeed_*), whether the op was just compiled or loaded from the cache; no logger or switch governs it.
    Only that module's print is replaced and only that message dropped: the op is still built and used, a failed
    build still raises, and DeepSpeed's logger (warnings included) is untouched. Called where avrl builds its
    DeepSpeed strategy (DeepSpeed is imported then anyway; importing it in quiet() would cost every run seconds)."""
    # By name: the attribute deepspeed.comm.torch is the torch package (deepspeed.comm re-exports it).
    comm = importlib.import_module("deepspeed.comm.torch")

    def print_(*args, **kwargs):
        if len(args) == 1 and isinstance(args[0], str) and args[0].endswith(" built successfully"):
            return
        builtins.print(*args, **kwargs)

    comm.print = print_


def resuming() -> None:
    """A resumed run writes into its own checkpoint folder: Lightning's "exists and is not empty" is expected."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def quiet_launcher() -> None:
    """The sweep process's own console, with hydra/launcher=slurm (called when run.py is imported, before Hydra
    starts). submitit prints each of its messages three times (its stdout and stderr handlers, then Hydra's), and
    on a cluster without SLURM accounting it warns at every poll that sacct failed: once through Hydra's handler,
    and that warning once, saying what it means."""
    os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")  # read when submitit is imported: no own handlers
    said = []

    def once(record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if said:
            return False
        said.append(True)
        record.msg, record.args = (
            (
                "SLURM accounting is off on this cluster (sacct fails; the line above is sacct's "
                "own): submitit follows the jobs through their result files instead"
            ),
            None,
        )
        return True

    logging.getLogger("submitit").addFilter(once)


def progress_bar():
    """Lightning's rich bar, described by step (max_epochs is -1: Lightning's "Epoch 0/-2"), without v_num."""

    class StepBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            return "train" if current_epoch == 0 else f"train (epoch {current_epoch + 1})"

        def get_metrics(self, trainer, pl_module):
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

    return StepBar()


def model_summary():
    """Lightning's rich model summary (the parameter counts) without its FLOPs column and "Total FLOPs" line.
    Lightning 2.6 counts FLOPs only by running the module's forward on its `example_input_array`; avrl's module has
    none (a GRPO step is generation and scoring, not one forward call), so the column was all 0 and the total
    "Total FLOPs: 0", which reads as a measurement. Lightning has no option to leave them out: this is its
    RichModelSummary.summarize with those two left out."""

    class Summary(RichModelSummary):
        @staticmethod
        def summarize(
            summary_data,
            total_parameters,
            trainable_parameters,
            model_size,
            total_training_modes,
            total_flops=0,
            **summarize_kwargs,
        ) -> None:
            columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
            table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
            for name, _ in columns:
                if name == " ":
                    table.add_column(name, style="dim")
                elif name == "Name":
                    table.add_column(name, justify="left", no_wrap=True)
                elif name in ("Type", "Mode"):
                    table.add_column(name)
                else:  # Params, Params per Device (ZeRO-3), In sizes, Out sizes
                    table.add_column(name, justify="right")
            for row in zip(*(values for _, values in columns)):
                table.add_row(*row)
            console = get_console()
            console.print(table)
            grid = Table.grid(expand=True)
            grid.add_column()
            for label, value in (
                ("Trainable params", get_human_readable_count(int(trainable_parameters))),
                ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
                ("Total params", get_human_readable_count(int(total_parameters))),
                ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                ("Modules in train mode", total_training_modes["train"]),
                ("Modules in eval mode", total_training_modes["eval"]),
            ):
                grid.add_row(f"[bold]{label}[/]: {value}")
            console.print(grid)

    return Summary()
