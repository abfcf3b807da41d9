"""avrl's benchmarks, run from the repository root; they use avrl as a user does (its public functions and classes).

    python -m benchmarks.speed [trl|audio|prefix|scaling]   # the GRPO step's speed and memory on CPU -> speed.json
    python -m benchmarks.gpu                                # the 7B models' GRPO step on a GPU      -> gpu.json
    python benchmarks/reliability.py                        # what crash safety costs a step        -> reliability.json
    python benchmarks/measurements.py                       # docs/measurements.md from the results

Each writes its figures as JSON beside it (`--smoke` runs the code path and writes only where `--out` says);
manual.json holds the figures no script writes, suite_under_load.json the suite's runs under CPU load
(`python -m tests.support.load --out ...`), gpu_checks.sh runs the GPU checks on an offline GPU machine.
"""
