"""The reproduction presets are the papers' experiments: rewards, prompts, recipes and evaluation protocols checked
against the released code (xiaomi-research/r1-aqa, HarryHsing/EchoInk). The reference rules below are written out
from those files; avrl's implementations are separate code."""

import json
import re

import pytest

from avrl.data.readers import read_avqa, read_avqa_r1
from avrl.protocols import prediction
from avrl.rewards import echoink_accuracy, echoink_format, r1_aqa_accuracy, r1_aqa_format
from tests.support import compose
from tests.support.helpers import ITEM, spec


# ---------------------------------------------------------------------------------------------------- rewards
def r1_aqa_reference(content: str, gold: str) -> tuple[float, float]:
    """src/utils/rewards.py, accuracy then format, for solution f"<answer>{gold}</answer>"."""
    from math_verify import parse, verify

    sol, reward = f"<answer>{gold}</answer>", 0.0
    try:
        if float(verify(parse(content), parse(sol))) > 0:
            reward = 1.0
    except Exception:
        pass
    if reward == 0.0:
        m = re.search(r"<answer>(.*?)</answer>", sol)
        truth = m.group(1).strip() if m else sol.strip()
        m = re.search(r"<answer>(.*?)</answer>", content)
        reward = float((m.group(1).strip() if m else content.strip()) == truth)
    return reward, float(re.fullmatch(r"<answer>.*?</answer>", content, re.DOTALL) is not None)


R1_AQA_CASES = [  # (completion, gold, accuracy, format)
    ("<answer>car horn</answer>", "car horn", 1.0, 1.0),
    (" <answer>car horn</answer>", "car horn", 1.0, 0.0),  # no strip before the format match
    ("<answer>\ncar horn</answer>", "car horn", 0.0, 1.0),  # no DOTALL: a block across lines is no block
    ("<answer>dog</answer><answer>car horn</answer>", "car horn", 0.0, 1.0),  # the first block counts
    ("car horn", "car horn", 1.0, 0.0),  # untagged: the whole completion
    ("<answer>Car horn</answer>", "car horn", 0.0, 1.0),  # exact string match
    ("answer: 4", "four, 4", 1.0, 0.0),  # math_verify: 4 == 4
]


@pytest.mark.parametrize("completion, gold, accuracy, fmt", R1_AQA_CASES)
def test_r1_aqa_rewards_follow_the_released_rules(completion, gold, accuracy, fmt):
    item = ITEM.__class__(id="1", question="q", choices=["dog", gold], answer_index=1)
    assert r1_aqa_reference(completion, gold) == (accuracy, fmt)  # the cases say what the released code does
    assert (
        r1_aqa_accuracy([completion], [item], spec("no_think"))[0],
        r1_aqa_format([completion], [item], spec("no_think"))[0],
    ) == (accuracy, fmt)


ECHOINK_FORMAT = re.compile(
    r"^(?!.*<think>.*<think>)(?!.*<answer>.*<answer>)"
    r"<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$"
)

ECHOINK_CASES = [  # (completion, accuracy against gold "B", format)
    ("<think>it honks</think><answer>B</answer>", 1.0, 1.0),
    ("  <think>x</think>\n<answer> B </answer>\n", 1.0, 1.0),  # stripped, inside and out
    ("<think></think><answer>B</answer>", 1.0, 0.0),  # the think block must not be empty
    ("<answer>\nB\n</answer>", 1.0, 0.0),  # DOTALL answer; no think block
    ("<think>x</think><answer>B</answer><answer>C</answer>", 1.0, 0.0),  # two answers on one line
    ("<think>x\n</think><answer>B</answer>\n<answer>C</answer>", 1.0, 1.0),  # ... on two lines pass (no DOTALL)
    ("<think>x</think><answer>b</answer>", 0.0, 1.0),  # the letter exactly
    ("B", 0.0, 0.0),  # no block, no answer
]


@pytest.mark.parametrize("completion, accuracy, fmt", ECHOINK_CASES)
def test_echoink_rewards_follow_the_released_rules(completion, accuracy, fmt):
    m = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S).search(completion)  # grpo.py's extract_answer
    assert (
        float((m.group(1).strip() if m else "") == "B"),
        float(bool(ECHOINK_FORMAT.fullmatch(completion.strip()))),
    ) == (accuracy, fmt)
    echo = spec("echoink")
    assert (echoink_accuracy([completion], [ITEM], echo)[0], echoink_format([completion], [ITEM], echo)[0]) == (
        accuracy,
        fmt,
    )


def test_each_preset_selects_its_papers_rewards():
    for experiment, source in (("r1_aqa", "r1_aqa"), ("echoink_r1", "echoink")):
        functions = compose([f"experiment={experiment}"]).reward.functions
        assert functions.accuracy._target_ == f"avrl.rewards.{source}_accuracy"
        assert functions.format._target_ == f"avrl.rewards.{source}_format"
    assert compose().reward.functions.accuracy._target_ == "avrl.rewards.accuracy_reward"  # avrl's MMAU rule


# ---------------------------------------------------------------------------------------------------- prompts
def test_r1_aqa_prompt_is_the_released_text_for_a_real_avqa_record(tmp_path):
    record = {
        "id": 7,
        "video_name": "-HG3Omg_89c_30",
        "video_id": 341,
        "question_text": "What happened in the video? Are the videos loud?",
        "multi_choice": ["motorboat", "Yacht consignment", "Sailboat set sail", "Consignment car"],
        "answer": 1,
        "question_relation": "View",
        "question_type": "Happening",
        "dataset_name": "AVQA",
        "audio_path": "a.wav",
    }
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    (item,), _ = read_avqa(tmp_path / "train.jsonl", check_audio=False)  # a stand-in clip: its header is no audio
    # src/dataset/dataset.py, _handle_avqa: a plain str.replace ("videos" -> "audios") and the list's repr.
    choice_str = f"Please choose the answer from the following options: {record['multi_choice']}."
    question = record["question_text"].replace("video", "audio")
    expected = f"{question} {choice_str} Output the final answer in <answer> </answer>."
    from avrl.models import load_processor
    from avrl.prompts import render_question

    assert render_question(spec("no_think"), item) == expected
    processor = load_processor(compose().model)
    assert processor.render(expected) == (  # Qwen2-Audio-Instruct's chat template, audio first
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n{expected}<|im_end|>\n<|im_start|>assistant\n"
    )


QUESTION_TEMPLATE = (  # EchoInk's grpo.py and omniInstruct-v1_eval_valid.py
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Make sure to carefully consider both the visual and audio information before answering. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between "
    "the <answer> </answer> tags."
)
MULTIPLE_CHOICE = (
    " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
)


def avqa_r1_record(folder, file_name: str):
    """A real AVQA-R1-6K multiple-choice record (its options as the file writes them, "B.  Violin" included) in
    `folder`/`file_name` with stand-in media, and the item avrl reads from it."""
    record = {
        "problem_id": 3,
        "problem": "What is the source of the sound?",
        "data_type": "image_audio",
        "problem_type": "multiple choice",
        "options": ["A. Piano", "B.  Violin", "C. Drum", "D. Flute"],
        "solution": "<answer>B</answer>",
        "path": {"image": "i.jpg", "audio": "a.wav"},
        "data_source": "AVQA",
    }
    for name in ("i.jpg", "a.wav"):
        (folder / name).write_bytes(b"x")
    (folder / file_name).write_text(json.dumps([record]))
    (item,), _ = read_avqa_r1(folder / file_name, check_audio=False)  # stand-in media
    return record, item


def test_echoink_prompts_are_the_released_text_for_a_real_avqa_r1_record(tmp_path):
    record, item = avqa_r1_record(tmp_path, "omni_rl_format_train.json")
    from avrl.prompts import render_question

    train = QUESTION_TEMPLATE.format(Question=record["problem"] + " Options:\n" + "\n".join(record["options"]))
    evaluation = QUESTION_TEMPLATE.format(Question=record["problem"] + "\n" + "\n".join(record["options"]))
    assert render_question(spec("echoink"), item) == train + MULTIPLE_CHOICE  # options as written ("B.  Violin")
    assert render_question(spec("echoink"), item, for_eval=True) == evaluation + MULTIPLE_CHOICE


BASE_QUESTION_TEMPLATE = (  # omniInstruct-v1_eval_valid.py:37-40, BASE_MODEL=True
    "{Question}\nPlease answer the following question based on the given image and audio."
)


def test_echoink_base_prompt_is_the_eval_scripts_text_and_conversation(tmp_path):
    """prompt=echoink_base: the string omniInstruct-v1_eval_valid.py builds for the base model (:120-121), and the
    conversation it renders (:124-131, :142: an explicit system turn, image, audio, text) through Qwen2.5-Omni's
    chat template equals what avrl renders, with the system turn and without it (the template's default)."""
    from avrl.models import load_processor, templates
    from avrl.prompts import render_question

    record, item = avqa_r1_record(tmp_path, "omni_rl_format_valid.json")
    question_text = record["problem"] + "\n" + "\n".join(record["options"])
    upstream = BASE_QUESTION_TEMPLATE.format(Question=question_text) + MULTIPLE_CHOICE
    base = spec("echoink_base")
    assert render_question(base, item) == render_question(base, item, for_eval=True) == upstream
    assert base.system == "You are a helpful assistant."

    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "i.jpg"},
                {"type": "audio", "audio": "a.wav"},
                {"type": "text", "text": upstream},
            ],
        },
    ]
    tokenizer = load_processor(compose().model).tokenizer

    def render(messages):
        return tokenizer.apply_chat_template(
            messages, chat_template=templates.QWEN2_5_OMNI, tokenize=False, add_generation_prompt=True
        )

    expected = render(conversation)
    assert expected.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert render(templates.chat_messages(upstream, True, True, base.system)) == expected
    assert render(templates.chat_messages(upstream, True, True)) == expected  # the default system turn is the same


def test_echoink_base_eval_preset_is_the_base_rows_protocol():
    """experiment=echoink_base_eval: echoink_r1's inputs and parser, the base model, prompt=echoink_base and the
    base's decoding (:152-160 thinker_do_sample=False, repetition_penalty=1.0, the thinker's 1024-token default)."""
    base, trained = flat(compose(["experiment=echoink_base_eval"])), flat(compose(["experiment=echoink_r1"]))
    changed = {key for key in base.keys() | trained.keys() if base.get(key) != trained.get(key)}
    assert {key for key in changed if not key.startswith("prompt.")} == {
        "run_name",
        "task",
        "ckpt_path",
        "eval.do_sample",
    }
    assert (base["task"], base["ckpt_path"], base["prompt.name"]) == ("eval", None, "echoink_base")
    assert (base["eval.do_sample"], base["eval.repetition_penalty"], base["eval.decoding"]) == (False, 1.0, "config")
    assert (base["eval.max_new_tokens"], base["eval.protocol"]) == (1024, "echoink")
    assert (base["data.max_audio_seconds"], base["data.image_max_pixels"]) == (10, 200704)


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize(
    "protocol, completion, output, correct",
    [
        ("r1_aqa", "<answer>car horn</answer> then <answer>dog</answer>", "car horn", True),  # the first block
        ("r1_aqa", "It is a car horn.", "It is a car horn.", True),  # no block: the raw output, MMAU's rule
        ("r1_aqa", "<answer>\ncar horn</answer>", "<answer>\ncar horn</answer>", True),  # no DOTALL: raw output
        ("r1_aqa", "<answer>dog or car horn</answer>", "dog or car horn", False),  # MMAU: a wrong choice's token
        ("echoink", "<think>x</think><answer> b </answer>", "car horn", True),  # any case, spaces allowed
        ("echoink", "I think it is a car horn", "dog", False),  # the article "a" reads as A
        ("echoink", "<answer>E</answer> C", "rain", False),  # A-D only; then the loose letter C
        ("echoink", "no idea", "?", False),
        ("strict", "<answer>dog</answer><answer>car horn</answer>", "car horn", True),  # avrl's: the last block
        ("strict", "car horn", "", False),  # avrl's: no block, no answer
    ],
)
def test_evaluation_protocols_parse_as_the_papers_scripts(protocol, completion, output, correct):
    prompt = spec("echoink" if protocol == "echoink" else "no_think")
    assert prediction(protocol, prompt, completion, ITEM) == (output, correct)


# ------------------------------------------------------------------------------------------------- recipes
R1_AQA = {  # key: value (source in xiaomi-research/r1-aqa)
    "model.name_or_path": "Qwen/Qwen2-Audio-7B-Instruct",
    "model.freeze_audio_encoder": False,
    "model.gradient_checkpointing": False,
    "seed": 42,  # src/train.py
    "algorithm.num_generations": 8,
    "algorithm.temperature": 1.0,  # src/train.py
    "algorithm.top_p": 1.0,
    "algorithm.top_k": 50,  # fresh GenerationConfig
    "algorithm.max_completion_length": 256,
    "algorithm.beta": 0.04,
    "optim.lr": 1e-6,  # TRL 0.15.2 defaults
    "algorithm.kl_clamp": None,
    "algorithm.loss_type": "grpo",
    "algorithm.scale_rewards": "group",
    "algorithm.num_iterations": 1,
    "algorithm.micro_batch_prompts": 1,
    "algorithm.prompts_per_step": 16,  # src/train.py:52-53, 1 x accum 2, on 8 GPUs
    "data.batch_size": 2,  # its share on 8 GPUs
    "optim.scheduler": "linear",
    "optim.warmup_ratio": 0.0,
    "optim.weight_decay": 0.0,  # HF defaults
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "optim.max_grad_norm": 1.0,
    "trainer.max_steps": 1000,
    "trainer.devices": -1,
    "trainer.precision": "bf16-mixed",
    "checkpoint_every_n_steps": 100,
    "prompt.name": "no_think",
    "reward.name": "r1_aqa",
    "data.name": "avqa",
    "eval.protocol": "r1_aqa",
    "eval.max_new_tokens": 256,
    "eval.do_sample": False,
    "eval.decoding": "checkpoint",  # test_mmau.py:104: generate() with the checkpoint's generation config
    "data.eval_batch_size": 32,
    "data.version": "2025-01-28",
    "data.audio_channel": 0,  # dataset.py:17, test_mmau.py:40 waveform[0]
    "keep_checkpoints_every_n_steps": 100,  # train.py:61 save_steps=100, no save_total_limit
}
ECHOINK = {  # key: value (source in HarryHsing/EchoInk)
    "model.name_or_path": "Qwen/Qwen2.5-Omni-7B",
    "model.freeze_audio_encoder": False,
    "model.freeze_vision_encoder": False,
    "model.gradient_checkpointing": True,
    "seed": 42,
    "algorithm.num_generations": 16,
    "algorithm.max_completion_length": 1024,  # generate()'s thinker_max_new_tokens default beat the script's 768
    "algorithm.beta": 0.001,  # script
    "algorithm.temperature": 1.0,
    "algorithm.top_p": 0.95,
    "algorithm.top_k": 50,  # grpo_trainer.py
    "algorithm.kl_clamp": 10.0,
    "algorithm.loss_type": "grpo",
    "algorithm.scale_rewards": "group",
    "algorithm.num_iterations": 1,
    "algorithm.prompts_per_step": 8,  # script:8,20,21: 8 GPUs x 1 x accum 1
    "data.batch_size": 1,
    "optim.lr": 1e-6,
    "optim.scheduler": "cosine",
    "optim.warmup_ratio": 0.0,
    "optim.weight_decay": 0.01,
    "optim.max_grad_norm": 5.0,
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "trainer.max_epochs": 1,
    "trainer.max_steps": -1,
    "trainer.devices": -1,
    "trainer.precision": "bf16-mixed",
    "checkpoint_every_n_steps": 100,
    "prompt.name": "echoink",
    "reward.name": "echoink",
    "data.name": "avqa_r1",
    "eval.protocol": "echoink",
    "eval.do_sample": True,
    "eval.top_p": 0.95,
    "eval.temperature": 1.0,
    "eval.max_new_tokens": 1024,
    # qwen_omni_utils: vision_process.py:25-27, audio_process.py:9
    "data.image_factor": 28,
    "data.image_min_pixels": 4 * 28 * 28,
    "data.image_max_pixels": 256 * 28 * 28,
    "data.max_audio_seconds": 10,
    "data.audio_channel": None,  # librosa.load's mono: the mean of the channels
}


def flat(cfg, prefix=""):
    """Every leaf of a config as {"a.b.c": value}, interpolations unresolved."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    if isinstance(node, dict):
        return {k: v for key, inner in node.items() for k, v in flat(inner, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def value(cfg, key):
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


@pytest.mark.parametrize("experiment, table", [("r1_aqa", R1_AQA), ("echoink_r1", ECHOINK)])
def test_presets_pin_every_value_of_the_papers_recipe(experiment, table):
    cfg = compose([f"experiment={experiment}"])
    assert {key: value(cfg, key) for key in table} == table


def test_presets_carry_the_papers_deepspeed_configs():
    r1 = json.loads(open(compose(["experiment=r1_aqa"]).trainer.strategy.config).read())
    echo = json.loads(open(compose(["experiment=echoink_r1"]).trainer.strategy.config).read())
    assert compose(["experiment=r1_aqa", "trainer=gpu"]).trainer.strategy == "auto"  # one GPU without DeepSpeed
    assert r1["zero_optimization"]["stage"] == echo["zero_optimization"]["stage"] == 3
    # R1-AQA's conf/ds_zero3.json offloads parameters and optimizer to CPU; EchoInk's zero3.json does not.
    assert [r1["zero_optimization"][k]["device"] for k in ("offload_optimizer", "offload_param")] == ["cpu", "cpu"]
    assert [echo["zero_optimization"][k]["device"] for k in ("offload_optimizer", "offload_param")] == ["none"] * 2
    assert "data/AVQA-R1-6K/train/omni_rl_format_train.json" in compose(["experiment=echoink_r1"]).data.train_path


def test_mmau_version_selects_the_metadata_file():
    assert compose(["data=mmau"]).data.test_path.endswith("/mmau-test-mini.json")
    assert compose(["data=mmau", "data.version=original"]).data.test_path.endswith("/mmau-test-mini-original.json")
    assert compose(["data=mmau", "data.version=2025-01-28"]).data.test_path.endswith("/mmau-test-mini-2025-01-28.json")
    # R1-AQA's evaluation: the file in the MMAU repository when its paper and code came out (../shared/data/README.md)
    for experiment in ("r1_aqa", "r1_aqa_paper"):
        path = compose([f"experiment={experiment}", "data=mmau"]).data.test_path
        assert path.endswith("/mmau-test-mini-2025-01-28.json")


def test_r1_aqa_paper_variant_differs_from_the_code_only_in_the_tables_values():
    """experiment=r1_aqa_paper: the paper's Table 1 (500 steps, 512 response tokens) where the released code has
    1000 steps (src/train.py:59) and 256 tokens (TRL 0.15.2's default); every other key is the code's."""
    code, paper = flat(compose(["experiment=r1_aqa"])), flat(compose(["experiment=r1_aqa_paper"]))
    changed = {
        key: (code.get(key), paper.get(key)) for key in code.keys() | paper.keys() if code.get(key) != paper.get(key)
    }
    assert changed == {
        "run_name": ("r1_aqa", "r1_aqa_paper"),
        "algorithm.max_completion_length": (256, 512),
        "trainer.max_steps": (1000, 500),
    }
