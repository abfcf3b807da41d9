"""MMAU-Pro's official scorers as code paths: instruction-following checks and the judge's score parsing pinned on
cases from sonalkum/MMAUPro's evaluate_mmau_pro_comprehensive.py; the embedding matcher and the judge run with tiny
randomly initialised models built here, offline; task=eval with them configured reports the official figures."""

import re
import statistics

import pyarrow.parquet as pq
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from avrl.evaluation import evaluate
from avrl.models.tiny import build_tokenizer
from avrl.rules import mmau_pro
from avrl.scoring import EmbeddingMatcher, TextJudge
from tests.test_evaluation import stand_in

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_text_models(tmp_path_factory):
    """(encoder folder, chat model folder): a 2-layer Qwen2 of width 32 with a byte-level BPE tokenizer, random."""
    root = tmp_path_factory.mktemp("tiny_text")
    tokenizer = build_tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = CHAT
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    for name, cls in (("encoder", Qwen2Model), ("judge", Qwen2ForCausalLM)):
        cls(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "encoder", root / "judge"


@pytest.mark.parametrize(
    "task,kwargs,response,expected",
    [
        ("Number Words (at least)", {"N": 3}, "one two three", True),
        ("Number Words (at most)", {"N": 2}, "one two three", False),
        ("Number Words (range)", {"N1": 2, "N2": 3}, "one two", True),
        ("Include Keywords", {"keywords": "piano, rain"}, "Rain on a PIANO", True),
        ("Forbidden Words", {"forbidden_words": "dog, cat"}, "a category", False),  # a substring, as there
        ("Keyword Frequency", {"keyword": "bell", "N": 2}, "Bell, bells, bell.", True),  # whole words only
        ("Number Paragraphs", {"N": 2}, "first *** second *** ", True),
        ("Number Bullets", {"N": 2}, "* one\n* two\nthree", True),
        ("Title", {}, "<<A Title>> text", True),
        ("Postscript", {"postscript_marker": "P.S."}, "Hi. p.s. bye", True),
        ("Start Checker", {"start_phrase": "Hello, world"}, "hello world! ok", True),
        ("End Checker", {"end_phrase": "The end"}, "story... the end.", True),
        ("Quotation", {}, ' "quoted" ', True),
        ("No Commas", {}, "a, b", False),
        ("All Uppercase", {}, "LOUD NOISE", True),
        ("All-capital Words (at least)", {"N": 2}, "A LOUD noise HERE", True),
        ("Minimum Number Highlighted Section", {"N": 2}, "*one* and *two*", True),
        ("Multiple Sections", {"N": 2, "section_splitter": "SECTION"}, "SECTION a SECTION b", True),
        ("Two Responses", {}, "yes****** no", True),
        ("Number Placeholder", {"N": 1}, "at [address]", True),
        ("Number Sentences (at most)", {"N": 2}, "One. Two! Three?", False),
        ("Not a check", {}, "anything", False),  # unknown identifiers fail, as there
        ("Number Words (at least)", None, "", True),  # kwargs missing: N defaults to 0
    ],
)
def test_instruction_following_checks(task, kwargs, response, expected):
    record = {"category": "instruction following", "task_identifier": task, "kwargs": kwargs, "question": "Q"}
    assert mmau_pro.follows_instruction(response, record) is expected


def test_repeat_prompt_uses_the_question():
    record = {"task_identifier": "Repeat Prompt", "question": "Describe the sound."}
    assert mmau_pro.follows_instruction("describe the sound. It is rain.", record)


def judge_reference(reply):
    """extract_scores_from_evaluation, written from its text."""
    out = {}
    for key, pattern in (("correctness", r"CORRECTNESS:\s*(\d+)"), ("relevance", r"RELEVANCE:\s*(\d+)"),
                         ("completeness", r"COMPLETENESS:\s*(\d+)"), ("clarity", r"CLARITY:\s*(\d+)"),
                         ("overall", r"OVERALL:\s*(\d+(?:\.\d+)?)")):  # fmt: skip
        m = re.search(pattern, reply, re.IGNORECASE)
        out[key] = float(m.group(1)) if m else 3.0
    if out["overall"] == 3.0:
        out["overall"] = statistics.mean([out[k] for k in ("correctness", "relevance", "completeness", "clarity")])
    return out


@pytest.mark.parametrize(
    "reply",
    [
        "CORRECTNESS: 4 - ok\nRELEVANCE: 5 - ok\nCOMPLETENESS: 2 - no\nCLARITY: 5 - ok\nOVERALL: 4.5 - good",
        "correctness: 5\nrelevance: 5\ncompleteness: 5\nclarity: 5\nOVERALL: 3 - odd",  # 3 replaced by the mean
        "no scores at all",
        "CORRECTNESS: 1",
    ],
)
def test_judge_scores_are_read_as_the_official_script_reads_them(reply):
    assert mmau_pro.judge_scores(reply) == judge_reference(reply)


def test_the_judge_prompt_is_the_official_one():
    prompt = mmau_pro.judge_prompt("What plays?", "A piano.", "piano")
    assert prompt.startswith("You are an expert evaluator for general open-ended question answering tasks.")
    assert "Question: What plays?\n\nReference Answer: A piano.\n\nModel Response: piano\n\n" in prompt
    assert prompt.endswith("OVERALL: [average score] - [overall assessment]")


def test_embedding_matcher_picks_the_nearest_choice(tiny_text_models):
    encoder, _ = tiny_text_models
    matcher = EmbeddingMatcher(str(encoder))
    model = Qwen2Model.from_pretrained(encoder).eval()
    tokenizer = matcher.tokenizer

    def embed(text):  # one text alone (no padding): the mean of its last hidden states, unit length
        ids = tokenizer(text or tokenizer.eos_token, return_tensors="pt").input_ids  # "": the end token alone
        with torch.no_grad():
            v = model(ids).last_hidden_state[0].mean(0)
        return v / v.norm()

    choices = ["A dog barking", "A cat meowing", "Rain falling on a roof"]
    for response in ("cat", "It is raining", "dog dog dog", ""):
        sims = [float(embed(response) @ embed(c)) for c in choices]
        assert matcher(response, choices) == max(range(3), key=sims.__getitem__)


def test_eval_on_mmau_pro_with_the_scorers_configured_reports_the_official_figures(
    cfg_factory, tmp_path, tiny_text_models, capsys
):
    encoder, judge = tiny_text_models
    path, _ = stand_in(tmp_path, "mmau_pro", n=10)
    metrics = evaluate(cfg_factory("task=eval", "eval.benchmarks=[mmau_pro]", f"+eval.data.mmau_pro.test_path={path}",
                                   f"eval.mmau_pro.embedding_model={encoder}", f"eval.mmau_pro.judge_model={judge}",
                                   "eval.mmau_pro.judge_max_new_tokens=12", "eval.max_new_tokens=6",
                                   "logger=none"))  # fmt: skip

    rows = pq.read_table(tmp_path / "out/mmau_pro/predictions.parquet").to_pylist()
    matcher, replies = EmbeddingMatcher(str(encoder)), TextJudge(str(judge), 12, 0.1, 42)
    closed = [r for r in rows if mmau_pro.is_closed(r)]
    right = [r["choices"][matcher(r["model_output"], list(r["choices"]))] == r["answer"] for r in closed]
    assert metrics["eval/mmau_pro/official/accuracy"] == pytest.approx(sum(right) / len(right))
    opens = [r for r in rows if r["category"] == "open"]
    texts = replies([mmau_pro.judge_prompt(r["question"], r["answer"], r["model_output"]) for r in opens])
    overall = statistics.mean(judge_reference(t)["overall"] for t in texts)
    assert metrics["eval/mmau_pro/judge/avg_overall"] == pytest.approx(overall)
    assert "eval/mmau_pro/weighted_performance" in metrics and "eval/mmau_pro/string_rule/accuracy" not in metrics
    printed = capsys.readouterr().out
    assert "| mmau_pro |" in printed and "(not official)" not in printed
