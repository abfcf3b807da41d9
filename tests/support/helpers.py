"""Shared test data and independent references (test modules import these, never each other)."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq

from avrl.data.items import QAItem
from tests.support import compose

# The short GRPO run whose final weights the equivalence tests compare across strategies (DDP, ZeRO, GPU).
EQUIVALENCE_RUN = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "data.val_size=4",
    "algorithm.num_generations=4",
    "algorithm.max_completion_length=8",
    "algorithm.beta=0.04",
    "algorithm.temperature=1.5",
    "algorithm.loss_type=grpo",
    "trainer.enable_progress_bar=false",
    "logger=none",
]
# The same with a clipping norm that binds (DeepSpeed clips in its engine) and two updates per rollout.
STRATEGY_RUN = [*EQUIVALENCE_RUN, "optim.max_grad_norm=0.001", "algorithm.num_iterations=2"]

ITEM = QAItem(
    id="1", question="What is making the sound in the audio?", choices=["dog", "car horn", "rain"], answer_index=1
)


def spec(name):
    from avrl.prompts import prompt_spec

    return prompt_spec(compose([f"prompt={name}"]))


def avqa_record(i, audio="audio/1.wav", **extra):
    return {
        "id": i,
        "video_name": f"v{i}",
        "video_id": i,
        "question_text": "What is the man in the video playing?",
        "multi_choice": ["guitar", "piano", "drum", "flute"],
        "answer": 1,
        "question_relation": "View",
        "question_type": "Come From",
        "dataset_name": "AVQA",
        "audio_path": audio,
        **extra,
    }


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def mmau_reference(prediction, answer, choices):
    # Written from the rule: tokens are the set of \b\w+\b in lower case; correct iff the prediction holds every
    # answer token and none of the tokens of other choices that the answer lacks; empty is wrong.
    def toks(s):
        return {w.lower() for w in re.findall(r"\b\w+\b", s)}

    p = toks(prediction)
    if len(p) == 0:
        return False
    a = toks(answer)
    for c in choices:
        if toks(c) == a:
            continue
        for t in toks(c):
            if t not in a and t in p:
                return False
    return all(t in p for t in a)


# Stand-in benchmark records in each published format (field names from the benchmarks' own files).
def mmar_record(i, **extra):
    return {
        "id": f"r{i}",
        "audio_path": f"./audio/r{i}.wav",
        "question": "What type of natural environment might this music originate from",
        "choices": ["Mountain Canyon", "Dense Forest", "Open Grassland", "City Streets"],
        "answer": "Open Grassland",
        "modality": ["music", "speech", "mix-sound-speech"][i % 3],
        "category": ["Cultural Layer", "Perception Layer"][i % 2],
        "sub-category": ["Professional Knowledge and Reasoning", "Counting and Statistics"][i % 2],
        "language": None,
        "thinking": "...",
        "cue": ["Throat Singing"],
        "rubric": [],
        **extra,
    }


def mmsu_record(i, **extra):
    return {
        "id": f"s{i}",
        "audio_path": f"audio/s{i}.wav",
        "question": "What emotion does the speaker express?",
        "choice_a": "happy",
        "choice_b": "sad",
        "choice_c": "angry",
        "choice_d": "neutral",
        "answer_gt": ["sad", "happy", "neutral"][i % 3],
        "task_name": ["emotion_recognition", "speaker_gender"][i % 2],
        "category": ["Perception", "Reasoning"][i % 2],
        "sub-category": ["Paralinguistics", "Linguistics"][i % 2],
        "sub-sub-category": "Speaking style",
        "linguistics_sub_discipline": "None",
        **extra,
    }


def mmau_pro_record(i, **extra):
    closed = {
        "choices": ["A dog barking", "A cat meowing", "Rain falling"],
        "answer": "A cat meowing",
        "category": ["sound", "music", "multi"][i % 3],
    }
    kinds = [
        closed,
        {"choices": None, "answer": "A calm piano piece.", "category": "open"},
        {"choices": None, "answer": "", "category": "instruction following"},
    ]
    return {
        "id": f"p{i}",
        "audio_path": [f"audio/p{i}.wav"] + ([f"audio/p{i}b.wav"] if i % 4 == 3 else []),
        "question": "What is heard?",
        **(closed if i % 5 < 3 else kinds[1 + i % 2]),
        **extra,
    }


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path
