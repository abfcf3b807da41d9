"""docs/measurements.md from the measured figures: `python benchmarks/measurements.py [--check]`.

The figures are read from the benchmarks' JSON results beside this file (speed.json, gpu.json when a GPU run has
written it, reliability.json, suite_under_load.json) and from manual.json, the figures that no script writes (a run
or a suite timed by hand). Every row of the page says when, on which machine, what was measured and the command
that measured it. The page is generated: rerun a benchmark or edit manual.json, then run this again (tests check
that the page is what this writes). `--check` writes nothing and exits 1 when the page is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "docs" / "measurements.md"


@dataclass(frozen=True)
class Row:
    date: str
    machine: str
    what: str
    figure: str
    command: str


def load(folder: Path, name: str) -> dict | None:
    """A result file, or None where it does not exist. A `--smoke` run's figures mean nothing: refused."""
    path = folder / name
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    if report.get("smoke"):
        raise SystemExit(f"{path} holds a --smoke run's figures, which mean nothing: rerun it without --smoke")
    return report


# ------------------------------------------------------------------------------------------------ formatting
def megabytes(mb: float) -> str:
    return f"{mb:,.0f} MB"


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def machine_text(machine: dict | str, note: str | None = None) -> str:
    """One line for a result's machine record (the benchmarks write a dict, a hand-written record a sentence)."""
    if isinstance(machine, str):
        text = machine
    else:
        cpus = machine.get("cpu_count") or machine.get("cpus")
        parts = [machine["gpu"]] if machine.get("gpu") else []
        parts.append(f"{cpus} CPUs" + (f" ({machine['processor']})" if machine.get("processor") else ""))
        parts += [f"torch {machine['torch']}", f"Python {machine['python']}"]
        parts += [
            f"{package} {machine[package]}"
            for package in ("transformers", "lightning", "trl", "deepspeed")
            if machine.get(package)
        ]
        text = ", ".join(parts)
    return f"{text}; {note}" if note else text


def phases(result: dict) -> str:
    by_phase = result["seconds_by_phase"]
    return (
        f"rollout {by_phase['rollout']:.2f}, reference log-probs {by_phase['reference_logps']:.2f}, "
        f"update {by_phase['update']:.2f}"
    )


# ------------------------------------------------------------------------------------------------ sections
def speed_rows(report: dict) -> list[Row]:
    """benchmarks/speed.json: avrl against TRL, the shared prefix on the audio model, the scaling grid, the
    encoder once per prompt."""
    date, machine, command = report["date"][:10], machine_text(report["machine"]), report["command"]
    rows = []

    def row(what: str, figure: str) -> None:
        rows.append(Row(date, machine, what, figure, command))

    for name, shape in report.get("trl", {}).items():
        settings, avrl, repeated, trl = shape["settings"], shape["avrl"], shape["avrl_repeated_prefix"], shape["trl"]
        row(
            f"avrl / TRL, {name.replace('_', ' ')}",
            f"time **{shape['time_ratio_avrl_over_trl']:.2f}**, memory **{shape['memory_ratio_avrl_over_trl']:.2f}** "
            f"({settings['prompts']} prompts x G {settings['G']}, {avrl['prompt_tokens']}-token prompts, "
            f"{settings['length']}-token completions, beta {settings['beta']}, loss {settings['loss_type']}); "
            f"seconds per step and peak memory: avrl {avrl['median_step_seconds']:.2f} s, "
            f"{megabytes(avrl['peak_memory_mb'])}; avrl with the repeated prefix "
            f"{repeated['median_step_seconds']:.2f} s, {megabytes(repeated['peak_memory_mb'])} (time "
            f"{shape['time_ratio_avrl_repeated_prefix_over_trl']:.2f}, memory "
            f"{shape['memory_ratio_avrl_repeated_prefix_over_trl']:.2f} of TRL's); TRL's GRPOTrainer "
            f"{trl['median_step_seconds']:.2f} s, {megabytes(trl['peak_memory_mb'])}",
        )
    for prefix in report.get("prefix", {}).get("rows", []):
        shared, repeated = prefix["shared_prefix"], prefix["repeated_prefix"]
        row(
            f"shared / repeated prefix, Qwen2-Audio on {prefix['audio_seconds']} s of audio, G {prefix['G']}",
            f"time **{prefix['time_ratio_shared_over_repeated']:.2f}**, memory "
            f"**{prefix['memory_ratio_shared_over_repeated']:.2f}** ({prefix['prompt_tokens']} prompt tokens, "
            f"{prefix['completion_tokens']}-token completions); shared {shared['step_seconds']:.2f} s a step "
            f"({phases(shared)}), {megabytes(shared['peak_memory_mb'])}; repeated {repeated['step_seconds']:.2f} s "
            f"({phases(repeated)}), {megabytes(repeated['peak_memory_mb'])}",
        )
    scaling = report.get("scaling", {})
    for tokens in dict.fromkeys(r["prompt_tokens"] for r in scaling.get("rows", [])):
        grid = [r for r in scaling["rows"] if r["prompt_tokens"] == tokens]
        largest = grid[-1]
        row(
            f"step time by G, text-only Qwen2, {tokens}-token prompt",
            "seconds per step, shared / repeated prefix: "
            + ", ".join(
                f"G {r['G']} {r['shared']['median_step_seconds']:.2f} / {r['repeated']['median_step_seconds']:.2f}"
                for r in grid
            )
            + f"; peak memory at G {largest['G']} "
            f"{megabytes(largest['shared']['peak_memory_mb'])} / {megabytes(largest['repeated']['peak_memory_mb'])}"
            f" ({scaling['prompts']} prompt, {scaling['completion_tokens']}-token completions)",
        )
    for audio in report.get("audio", {}).get("rows", []):
        once, copies = audio["once_per_prompt"], audio["repeated_G_times"]
        row(
            f"the audio encoder once per prompt / on G copies, {audio['audio_seconds']} s clip, G {audio['G']}",
            f"forward+backward {once['seconds']:.2f} s, {megabytes(once['peak_memory_mb'])} against "
            f"{copies['seconds']:.2f} s, {megabytes(copies['peak_memory_mb'])}: "
            f"**{copies['seconds'] / once['seconds']:.1f}x** faster",
        )
    return rows


def gpu_rows(report: dict) -> list[Row]:
    """benchmarks/gpu.json: each 7B shape's LoRA GRPO step by phase, both prefix paths, and the memory plan of full
    fine-tuning."""
    date, machine, command = report["date"][:10], machine_text(report["machine"]), report["command"]
    setup = (
        f"{report['prompts']} prompts x G {report['G']}, {report['completion_tokens']} completion tokens, "
        f"{report['dtype'].removeprefix('torch.')}, LoRA r {report['lora_r']}, gradient checkpointing"
    )
    low, high = report["paper_gpu_hours"]
    rows = []
    for name, shape in report.items():
        if not (isinstance(shape, dict) and "shared_prefix" in shape):
            continue
        for path in ("shared_prefix", "repeated_prefix"):
            r = shape[path]
            rows.append(
                Row(
                    date,
                    machine,
                    f"{name}, {path.replace('_', ' ')}",
                    f"**{r['step_seconds']:.2f} s** a step ({phases(r)}), peak {r['peak_memory_mb'] / 1024:.1f} GiB, "
                    f"{r['completion_tokens_per_second']:,.0f} completion tokens/s, "
                    f"~{r['gpu_hours_per_1000_steps_on_8_gpus']:,.0f} GPU-hours per 1,000 steps on 8 GPUs (R1-AQA: "
                    f"{low}-{high}); {shape['parameters'] / 1e9:.2f}B parameters, {shape['media_per_prompt']} per "
                    f"prompt ({shape['prompt_tokens']} prompt tokens), {setup}",
                    command,
                )
            )
    for name, plan in report.get("full_fine_tuning", {}).items():
        rows.append(
            Row(
                date,
                machine,
                f"{name}, full fine-tuning's memory (DeepSpeed's estimators)",
                f"{plan['parameters'] / 1e9:.2f}B parameters: {plan['verdict']}"
                if "verdict" in plan
                else plan.get("error", ""),
                command,
            )
        )
    return rows


def reliability_rows(report: dict) -> list[Row]:
    """benchmarks/reliability.json: a crash-safe checkpoint and spooled logging against the plain ones."""
    date, command = report["date"][:10], report["command"]
    machine = machine_text(report["machine"], report.get("note"))
    rows = []
    for name, r in report["checkpoint"].items():
        rows.append(
            Row(
                date,
                machine,
                f"one checkpoint save, {name} ({r['megabytes']} MB of weights and AdamW moments)",
                f"**{r['avrl_safe_ms']:.1f} ms** written safely (beside the target, fsynced, renamed, the previous "
                f"kept) against {r['lightning_ms']:.1f} ms as Lightning writes it: "
                f"{r['extra_per_step_ms_at_every_50']:+.2f} ms a step at checkpoint_every_n_steps=50",
                command,
            )
        )
    log = report["logging"]
    rows.append(
        Row(
            date,
            machine,
            "log_metrics of 20 metrics into a SQLite MLflow store",
            f"**{log['spooling_client_up_ms']:.1f} ms** through avrl's spooling client against "
            f"{log['mlflow_client_ms']:.1f} ms through MLflow's; {log['spooled_to_disk_ms']:.1f} ms spooled to disk "
            f"while the server is away",
            command,
        )
    )
    return rows


def suite_under_load_rows(report: dict) -> list[Row]:
    """benchmarks/suite_under_load.json (`python -m tests.support.load --out ...`): the suite under CPU load."""
    runs = report["runs"]
    outcome = (
        "exit 0 in each"
        if all(r["exit_code"] == 0 for r in runs)
        else "exit codes " + ", ".join(str(r["exit_code"]) for r in runs)
    )
    command = (
        f"python -m tests.support.load --runs {len(runs)} --workers {report['workers']} "
        f"--out benchmarks/suite_under_load.json -- {' '.join(report['command'])}"
    )
    return [
        Row(
            report["date"][:10],
            machine_text(report["machine"], f"commit {report['commit']}"),
            f"the whole suite {len(runs)} times in a row under {report['workers']} busy processes",
            f"{outcome} ({report['result']}): " + ", ".join(duration(r["seconds"]) for r in runs),
            command,
        )
    ]


def eval_throughput_rows(report: dict) -> list[Row]:
    """benchmarks/eval_throughput.py: items/s by batch size, and one item's peak memory by clip length."""
    note = "; ".join(x for x in (report.get("note"), f"commit {report['commit']}") if x)
    machine = machine_text(report["machine"], note)
    command = report["command"].strip()
    sizes = " / ".join(str(r["batch_size"]) for r in report["rows"])
    rows = [
        Row(
            report["date"][:10],
            machine,
            f"task=eval's throughput by batch size: {report['model']}, {report['items']} synthetic items, greedy, up "
            f"to {report['max_new_tokens']} new tokens",
            f"items/s at batch {sizes}: "
            + " / ".join(f"{r['items_per_s']:.1f}" for r in report["rows"])
            + "; generated tokens/s: "
            + " / ".join(f"{r['tokens_per_s']:.0f}" for r in report["rows"]),
            command,
        )
    ]
    if report.get("memory"):

        def one(r: dict) -> str:
            cuda = f", CUDA max allocated {megabytes(r['cuda_max_allocated_mb'])}" if r["cuda_max_allocated_mb"] else ""
            return (
                f"{duration(r['clip_seconds'])}: {r['audio_tokens']:,} audio tokens, peak RSS "
                f"{megabytes(r['peak_rss_mb'])}{cuda}"
            )

        loaded = megabytes(report["memory"][0]["rss_after_load_mb"])
        rows.append(
            Row(
                report["date"][:10],
                machine,
                f"task=eval's peak memory on one item by clip length: {report['memory_model']}, the whole clip "
                f"encoded, each length in a fresh process ({loaded} RSS after loading the model)",
                "; ".join(one(r) for r in report["memory"]),
                command,
            )
        )
    return rows


# (key, title, what it is, the result file and its rows; manual.json's rows name their section by its key)
SECTIONS = (
    (
        "speed",
        "The GRPO step's speed and memory (CPU)",
        "`python -m benchmarks.speed` (benchmarks/speed.py; the models and settings of each job: "
        "[benchmarks.md](benchmarks.md)). Ratios below 1 favour avrl, or the shared prefix; peak memory is the "
        "process's peak RSS on CPU, CUDA's max allocated on a GPU.",
        "speed.json",
        speed_rows,
    ),
    (
        "gpu",
        "The 7B models' GRPO step (GPU)",
        "`python -m benchmarks.gpu`; on an offline GPU machine `bash benchmarks/gpu_checks.sh run bench` "
        "([gpu.md](gpu.md)).",
        "gpu.json",
        gpu_rows,
    ),
    (
        "reliability",
        "What crash safety costs",
        "`python benchmarks/reliability.py` ([reliability.md](reliability.md)).",
        "reliability.json",
        reliability_rows,
    ),
    (
        "tests",
        "The test suite",
        "Durations of the suite and its tiers, and runs under an artificial CPU load, one busy process per core "
        "([testing.md](testing.md)): no test's outcome depends on the machine's speed.",
        "suite_under_load.json",
        suite_under_load_rows,
    ),
    (
        "eval",
        "Evaluation",
        "`python -m benchmarks.eval_throughput` ([benchmarks.md](benchmarks.md)): task=eval's scoring loop.",
        "eval_throughput.json",
        eval_throughput_rows,
    ),
    ("runs", "Runs", "`python run.py` and its presets, timed by hand.", None, None),
    ("sweeps", "Sweeps and searches", "On the embedded default ([sweeps.md](sweeps.md)).", None, None),
)


def manual_rows(folder: Path) -> dict[str, list[Row]]:
    """manual.json's rows by section; each must say when, where, what, the figure and the command."""
    by_section: dict[str, list[Row]] = {key: [] for key, *_ in SECTIONS}
    for entry in json.loads((folder / "manual.json").read_text())["rows"]:
        missing = [k for k in ("section", "date", "machine", "what", "figure", "command") if not entry.get(k)]
        if missing or entry["section"] not in by_section:
            raise SystemExit(f"manual.json: row {entry} lacks {missing} or names no section of {list(by_section)}")
        by_section[entry["section"]].append(
            Row(entry["date"], entry["machine"], entry["what"], entry["figure"], entry["command"])
        )
    return by_section


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(folder: Path = HERE) -> str:
    """The page, from the result files in `folder`."""
    manual = manual_rows(folder)
    lines = [
        "# Measured figures",
        "",
        "<!-- Generated by `python benchmarks/measurements.py` from benchmarks/*.json: edit those, not this. -->",
        "",
        "Each row: the date, the machine, what was measured, and the command that measured it. The benchmarks "
        "write their results as JSON in `benchmarks/`; `benchmarks/manual.json` holds the figures no script "
        "writes. Rerun a benchmark (or add a measurement to manual.json), then `python "
        "benchmarks/measurements.py` rewrites this page.",
    ]
    for key, title, about, source, rows_of in SECTIONS:
        report = load(folder, source) if source else None
        rows = (rows_of(report) if report else []) + manual[key]
        lines += ["", f"## {title}", "", about, ""]
        if source and report is None:
            lines += [f"No figures yet: no run has written `benchmarks/{source}`."]
        if rows:
            lines += ["| date | machine | figure | command |", "|---|---|---|---|"]
            lines += [
                f"| {row.date} | {cell(row.machine)} | **{cell(row.what)}**: {cell(row.figure)} | "
                f"`{cell(row.command)}` |"
                for row in rows
            ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page is out of date")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        stale = not PAGE.exists() or PAGE.read_text() != page
        print(f"{PAGE} is out of date: run python benchmarks/measurements.py" if stale else f"{PAGE} is up to date")
        return int(stale)
    PAGE.write_text(page)
    print(f"written to {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
