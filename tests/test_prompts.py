import json

import pytest

from avrl.prompts import PromptSpec, extract_answer, parse_letter, predicted_text, render_question, target_answer
from tests.support import compose
from tests.support.helpers import ITEM, spec


def test_r1_aqa_no_think_wording():
    assert render_question(spec("no_think"), ITEM) == (
        "What is making the sound in the audio? Please choose the answer from the following options: "
        "['dog', 'car horn', 'rain']. Output the final answer in <answer> </answer>."
    )


def test_r1_aqa_think_wording():
    assert render_question(spec("think"), ITEM).endswith(
        "['dog', 'car horn', 'rain']. Output the thinking process in <think> </think> and final answer in "
        "<answer> </answer>."
    )


def test_echoink_wording_letters_and_target():
    echo = spec("echoink")
    text = render_question(echo, ITEM)
    assert text.startswith("What is making the sound in the audio? Options:\nA. dog\nB. car horn\nC. rain\n")
    assert text.endswith(
        "Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
    )
    assert target_answer(echo, ITEM) == "B"
    assert target_answer(spec("no_think"), ITEM) == "car horn"


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<answer>dog</answer>", "dog"),
        ("<think>maybe <answer>rain</answer>?</think><answer> car horn </answer>", "car horn"),  # the last block counts
        ("<answer>\nline one\nline two\n</answer>", "line one\nline two"),
        ("the answer is dog", None),
        ("<answer>dog", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("B", 1),
        ("(B)", 1),
        ("B.", 1),
        ("B)", 1),
        ("B. car horn", 1),
        ("car horn", 1),
        ("Car Horn", 1),
        ("a", None),  # EchoInk's parser read the word "a" as option A
        ("A dog", None),  # nor is an article at the start of a sentence
        ("b", None),
        ("D", None),
        ("", None),
        ("AB", None),
    ],
)
def test_parse_letter(answer, expected):
    assert parse_letter(answer, ITEM.choices) == expected


def test_predicted_text_maps_letters_to_choice_text():
    assert predicted_text(spec("echoink"), "<think>x</think><answer>C</answer>", ITEM.choices) == "rain"
    assert predicted_text(spec("echoink"), "<answer>a</answer>", ITEM.choices) == ""
    assert predicted_text(spec("no_think"), "<answer>rain</answer>", ITEM.choices) == "rain"
    assert predicted_text(spec("no_think"), "no tags", ITEM.choices) == ""


def test_prompt_spec_rejects_unknown_answer_style():
    with pytest.raises(ValueError, match="answer_style"):
        PromptSpec(name="x", template="{question}", answer_style="number")


# ----------------------------------------------------------------------------------------------------- MMSU
MMSU_INSTRUCTION = (  # dingdongwang/MMSU_Bench, mmsu_inference.py:36
    "Choose the most suitable answer from options A, B, C, and D to respond the question in next line, **you should "
    "only choose A or B or C or D.** Do not provide any additional explanations or content."
)


def mmsu_instruction(item: dict) -> str:
    """mmsu_inference.py:35-42, as written there (an absent choice_c / choice_d is None in its f-string)."""
    choice_a, choice_b = item["choice_a"], item["choice_b"]
    choice_c, choice_d = item.get("choice_c", None), item.get("choice_d", None)
    choices = f"A. {choice_a}\nB. {choice_b}\nC. {choice_c}\nD. {choice_d}"
    return f"{MMSU_INSTRUCTION}\n\nQuestion: {item['question']}\n\n{choices}"


def mmsu_reference(response: str, record: dict) -> bool | None:
    """mmsu_evaluation.py:35-77 on one record: None where it `continue`s (the response is dropped)."""
    predict = response.strip().replace("\n", "")
    if not (predict != "None" and predict):
        raise AssertionError("empty responses take the previous record's letter: not a one-record case")
    if predict[0] in ("A", "B", "C", "D"):
        model_predict = predict[0]
    elif len(predict) > 1 and predict[-2] in ("A", "B", "C", "D"):
        model_predict = predict[-2]
    else:
        return None
    choices = {k.upper(): record.get(f"choice_{k}", "") for k in "abcd"}
    return choices[model_predict] == record.get("answer_gt", "")


MMSU_RECORDS = [
    {
        "id": "mmsu_1",
        "audio_path": "a.wav",
        "question": "What is the speaker's emotion?",
        "choice_a": "happy",
        "choice_b": "sad",
        "choice_c": "angry",
        "choice_d": "neutral",
        "answer_gt": "sad",
        "task_name": "emotion_recognition",
        "category": "Perception",
        "sub-category": "Paralinguistics",
    },
    {  # two choices: the official prompt still shows C and D, as "None"
        "id": "mmsu_2",
        "audio_path": "a.wav",
        "question": "Is the second word stressed?",
        "choice_a": "yes",
        "choice_b": "no",
        "answer_gt": "yes",
        "task_name": "stress_detection",
        "category": "Perception",
        "sub-category": "Phonology",
    },
]


def read_mmsu_records(tmp_path):
    from avrl.data.readers import read_mmsu

    (tmp_path / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "mmsu.json").write_text(json.dumps(MMSU_RECORDS))  # the script's JSON list
    items, _ = read_mmsu(tmp_path / "mmsu.json", check_audio=False)  # a stand-in clip
    return items


def test_mmsu_prompt_is_the_inference_scripts_text(tmp_path):
    mmsu = spec("mmsu")
    for item, record in zip(read_mmsu_records(tmp_path), MMSU_RECORDS, strict=True):
        assert render_question(mmsu, item) == render_question(mmsu, item, for_eval=True) == mmsu_instruction(record)
    assert (mmsu.answer_style, mmsu.reply_format, mmsu.system) == ("letter", "bare_letter", None)


@pytest.mark.parametrize(
    "response",
    [
        "A",
        "B",
        "B.",
        " B\n",
        "The answer is B.",
        "The answer is A.",
        "C",
        "D",
        "b",
        "I am not sure",
        "(B)",
        "Bb",
        "xB.",
    ],
)
@pytest.mark.parametrize("protocol", ["mmsu", "strict"])
def test_mmsu_replies_are_scored_as_mmsus_rule_scores_them(tmp_path, response, protocol):
    """eval.protocol=mmsu, and the default strict with prompt=mmsu, judge a reply as mmsu_evaluation.py does (a
    dropped reply: wrong here, and handed to the official scorer as is so that it drops it too); the `response`
    written for MMSU's scorer reads as the same letter."""
    from avrl.protocols import prediction
    from avrl.rules import mmsu as rule
    from avrl.scoring import prediction_record

    for item, record in zip(read_mmsu_records(tmp_path), MMSU_RECORDS, strict=True):
        official = mmsu_reference(response, record)
        output, correct = prediction(protocol, spec("mmsu"), response, item)
        assert correct == bool(official)
        written = prediction_record(item, {"prediction": output, "completion": response}, 1, "mmsu")
        assert mmsu_reference(written["response"], written) == official
        assert rule.score(written["response"], written) == official


def test_prompt_spec_system_and_reply_format():
    assert spec("no_think").system is None and spec("no_think").reply_format == "answer_tags"
    with pytest.raises(ValueError, match="reply_format"):
        PromptSpec(name="x", template="{question}", reply_format="json")
    with pytest.raises(ValueError, match="bare_letter"):
        PromptSpec(name="x", template="{question}", reply_format="bare_letter")  # a text answer has no letter


@pytest.mark.parametrize("has_audio, has_image", [(True, False), (True, True), (False, True)])
def test_chat_messages_render_as_the_processor_renders(has_audio, has_image):
    """templates.chat_messages (the messages with PromptSpec.system's turn) is the processor's user turn: without a
    system turn both render the same prompt, so wiring it into AudioTextProcessor.render changes no other prompt."""
    from avrl.models import load_processor, templates

    processor = load_processor(compose().model)
    text = render_question(spec("no_think"), ITEM)
    messages = templates.chat_messages(text, has_audio, has_image)
    assert processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.family.chat_template, tokenize=False, add_generation_prompt=True
    ) == processor.render(text, has_audio, has_image)
    with_system = templates.chat_messages(text, has_audio, has_image, system="Be brief.")
    assert with_system[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert with_system[1:] == messages


def test_mmsu_prompt_refuses_more_than_four_choices():
    from avrl.data.items import DataError

    five = ITEM.__class__(id="5", question="q", choices=list("vwxyz"), answer_index=0, source="mmar.jsonl:3")
    with pytest.raises(DataError, match=r"mmar.jsonl:3: 5 choices, but prompt 'mmsu' shows options A-D only"):
        render_question(spec("mmsu"), five)
