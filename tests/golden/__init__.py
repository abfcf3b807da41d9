"""Golden values of the GRPO step: a 3-step fp32 run on CPU whose per-step train/loss, train/kl and train/reward are
pinned in grpo_3_steps.json (as torchtune pins its recipes' losses), so a sign or scale change anywhere in the
rollout -> score -> update path fails a fast test.

Regenerate only on purpose (a deliberate change of the numbers), and say why in the commit:
    python -m tests.golden --write            # rewrites tests/golden/grpo_3_steps.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lightning.pytorch.callbacks import Callback

FILE = Path(__file__).with_name("grpo_3_steps.json")
KEYS = ("train/loss", "train/kl", "train/reward")
# beta > 0 (a reference model, the KL term), two micro-batches, temperature 1.5 so that groups disagree.
OVERRIDES = [
    "logger=none",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=3",
    "data.batch_size=4",
    "data.val_size=2",
    "algorithm.num_generations=4",
    "algorithm.max_completion_length=8",
    "algorithm.temperature=1.5",
    "algorithm.beta=0.04",
    "algorithm.micro_batch_prompts=2",
    "algorithm.validate_at_start=false",
    "seed=7",
]


class RecordMetrics(Callback):
    """Appends KEYS after every training step to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {"step": trainer.global_step}
        row.update({k: float(trainer.callback_metrics[k]) for k in KEYS if k in trainer.callback_metrics})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run(out_dir: Path) -> list[dict]:
    """The golden run, in this process; its recorded rows."""
    from avrl.train import train
    from tests.support import compose

    record = out_dir / "metrics.jsonl"
    callback = [f"+callbacks.golden._target_={__name__}.RecordMetrics", f"+callbacks.golden.path={record}"]
    cfg = compose([*OVERRIDES, *callback], output_dir=str(out_dir / "out"))
    train(cfg)
    return [json.loads(line) for line in record.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description="Print (or --write) the golden GRPO values.")
    parser.add_argument("--write", action="store_true", help=f"rewrite {FILE}")
    parser.add_argument("--out", help="write to this file instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(Path(tmp))
    text = json.dumps({"overrides": OVERRIDES, "steps": rows}, indent=2) + "\n"
    print(text)
    if args.write or args.out:
        Path(args.out or FILE).write_text(text)


if __name__ == "__main__":
    main()
