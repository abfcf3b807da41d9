"""Tiny, randomly initialised models of the real architecture classes, built offline.

`python -m avrl.models.tiny OUT_DIR --family qwen2_audio` writes a checkpoint folder that loads with the same code
as Qwen/Qwen2-Audio-7B-Instruct: config, safetensors weights, a byte-level BPE tokenizer trained here on the
project's prompts (with the real special tokens and chat template) and a Whisper feature extractor.
The tiny audio window is 2 s (the real one is 30 s) so that CPU runs take minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from avrl.data.synthetic import QUESTIONS
from avrl.models import families
from avrl.models.processing import AudioTextProcessor
from avrl.models.tiny_sizes import feature_extractor

PROMPT_TEMPLATES = [
    "{question} Please choose the answer from the following options: {choices}. "
    "Output the final answer in <answer> </answer>.",
    "{question} Please choose the answer from the following options: {choices}. "
    "Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
    "{question} Options:\n{options}\nPlease think about this question as if you were a human pondering deeply. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between "
    "the <answer> </answer> tags. Please provide only the single option letter (e.g., A, B, C, D, etc.) "
    "within the <answer> </answer> tags.",
]


def _corpus() -> list[str]:
    texts = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: ",
        "<|im_end|>\n<|im_start|>assistant\n",
    ]
    for question, choices in QUESTIONS.values():
        options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
        for template in PROMPT_TEMPLATES:
            texts.append(template.format(question=question, choices=str(choices), options=options))
        for i, choice in enumerate(choices):
            texts += [
                f"<answer>{choice}</answer>",
                f"<answer>{chr(65 + i)}</answer>",
                f"<think>The audio sounds {choice}.</think><answer>{choice}</answer>",
            ]
    return texts * 20


def build_tokenizer(special_tokens: tuple[str, ...], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the project's prompts; the first three special tokens are <|endoftext|>,
    <|im_start|>, <|im_end|> in every family, the rest are its media placeholders."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    fast.add_special_tokens({"additional_special_tokens": list(special_tokens[3:])})
    return fast


def build(out_dir: str | Path, family: str = "qwen2_audio", seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` to `out_dir` and return the path."""
    torch.manual_seed(seed)
    out = Path(out_dir)
    spec = families.get(family)
    tokenizer = build_tokenizer(spec.special_tokens)
    model, image_processor = spec.build_tiny(tokenizer)
    model.save_pretrained(out)
    AudioTextProcessor(tokenizer, feature_extractor(), image_processor, spec).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_audio", choices=sorted(families.REGISTRY))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out_dir, args.family, args.seed))


if __name__ == "__main__":
    main()
