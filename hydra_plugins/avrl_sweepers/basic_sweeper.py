"""avrl's basic sweeper: conf/hydra/sweeper/basic.yaml shadows Hydra's own `hydra/sweeper=basic` with it, so every
`python run.py -m` uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from avrl.redaction import scrub
from avrl.sweeps import parent_run
from avrl.sweeps import summary as sweep


class AvrlBasicSweeper(BasicSweeper):
    """Hydra's cartesian-product sweeper. Overrides that do not compose (an unknown option) still stop the sweep
    before any job starts; a job that raises is recorded and the others run. At the end: a summary (printed and
    in sweep_summary.json), the parent MLflow run closed (FAILED if any job failed), and `SweepFailed` (exit 1)."""

    def sweep(self, arguments: list[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        arguments = seed_sweep(self.config, parser, self._parse_config() + list(arguments))
        self.overrides = self.split_arguments(parser.parse_overrides(arguments), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        scrub(sweep_dir)  # the overrides as given, secrets included: masked here, in the jobs' .hydra at the end

        returns, rows = [], []
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=len(rows))
            for ret in results:
                failed = ret.status != JobStatus.COMPLETED
                # A SLURM job that left the queue without a result carries SLURM's state (CANCELLED, ...).
                status = getattr(ret._return_value, "state", None) if failed else None
                rows.append(
                    sweep.job_row(
                        len(rows),
                        status or ret.status.name,
                        ret.overrides or [],
                        None if failed else _number(ret.return_value),
                        ret._return_value if failed else None,
                    )
                )
            returns.append(results)

        sweep.write_summary(sweep_dir, rows, self.config.objective)
        scrub(sweep_dir, pickles=True)
        failed = [r for r in rows if r["status"] != "COMPLETED"]
        if failed:  # (Hydra's on_multirun_end, which writes the report, runs only when the sweep returns)
            parent_run.write_sweep_report(self.config)
            parent_run.end_sweep_run(self.config, "FAILED")
            raise sweep.SweepFailed(
                f"{len(failed)} of {len(rows)} jobs failed (jobs "
                f"{', '.join(str(r['job']) for r in failed)}); "
                f"see {sweep_dir / sweep.SUMMARY_FILE}"
            )
        return returns


def seed_sweep(config, parser, arguments: list[str]) -> list[str]:
    """`seeds=N`: every job of the sweep with seeds seed, seed + 1, ..., seed + N - 1 (a seed swept by hand, e.g.
    seed=1,2,3, is kept as given); the runs of one arm then differ only by seed, and the report pools them."""
    count = int(config.seeds)
    if count < 1:
        raise ValueError(f"seeds must be >= 1, got {count}")
    parsed = parser.parse_overrides(arguments)
    if count == 1 or any(o.key_or_group == "seed" and o.is_sweep_override() for o in parsed):
        return arguments
    kept = [a for a, o in zip(arguments, parsed, strict=True) if o.key_or_group != "seed"]  # seed=7: the base
    return [*kept, "seed=" + ",".join(str(config.seed + k) for k in range(count))]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
