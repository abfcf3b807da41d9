"""Each benchmark's official scoring rule, as avrl code: one module per benchmark, each following the benchmark's
own evaluation script (named in its docstring), quirks included.

- `mmau`: MMAU (Sakshi113/MMAU, evaluation.py): test-mini and the answerless test set; key `model_output`.
- `mmar`: MMAR (ddlBoJack/MMAR, code/evaluation.py): MMAU's token rule; key `answer_prediction`.
- `mmsu`: MMSU (dingdongwang/MMSU_Bench, mmsu_evaluation.py): a letter read from `response`; the official accuracy
  drops unreadable responses from its denominator, the strict one counts them wrong.
- `mmau_pro`: MMAU-Pro (sonalkum/MMAUPro, evaluate_mmau_pro_comprehensive.py): key `model_output`; its official
  closed-ended matching embeds the answer (NV-Embed-v2), open answers go to an LLM judge, instruction following to
  regex checks: the models plug in as callables (avrl/scoring.py builds them from `eval.mmau_pro`); without an
  embedding model the closed-ended subset is scored by a string rule, labelled as not the official figure.

Every module exposes `NAME`, `PREDICTION_KEY` (the key the official script reads the prediction from),
`ANSWER_KEY`, `PREDICTIONS_FILE` (the file the official script reads: a JSON list, JSONL or parquet), `BREAKDOWN`
(the record fields whose accuracy the official script prints, with its titles), `score(response, record)` (one
response against one record: True, False, or None where the official script counts it nowhere) and
`report(records)` (a predictions file's records -> `tally.Report`: metrics and the official script's table).
"""

from avrl.rules import mmar, mmau, mmau_pro, mmsu

BENCHMARKS = {"mmau": mmau, "mmar": mmar, "mmsu": mmsu, "mmau_pro": mmau_pro}

__all__ = ["BENCHMARKS", "mmar", "mmau", "mmau_pro", "mmsu"]
