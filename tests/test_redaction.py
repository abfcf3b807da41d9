"""Secrets in the forms users write them: URIs, query strings, overrides, YAML; and the settings that only look
like secrets (token counts and ids) left alone."""

import pytest

from avrl.redaction import is_secret_name, redact, redact_param, scrub


@pytest.mark.parametrize(
    "text, clean",
    [
        ("postgresql://bob:pw456@db.example/optuna", "postgresql://bob:***@db.example/optuna"),
        ("https://ghp_TOKEN123@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
        ("http://h:5000/api?password=abc&x=1", "http://h:5000/api?password=***&x=1"),
        ("https://h/?token=t0k&user=me", "https://h/?token=***&user=me"),
        ("hydra.sweeper.storage=postgresql://u:pw@h/db", "hydra.sweeper.storage=postgresql://u:***@h/db"),
        ("+db.password=pw123", "+db.password=***"),
        ("a=1,+hub_token=xyz,b=2", "a=1,+hub_token=***,b=2"),  # Hydra's override_dirname
        ("hf_key=hf_abc auth_header='Bearer x'", "hf_key=*** auth_header=***"),
        ("db:\n  password: pw123\n  user: bob\n", "db:\n  password: ***\n  user: bob\n"),
        ("endpoint=https://h/v1?api_key=zz", "endpoint=https://h/v1?api_key=***"),
        ("- +notes=https\\://tok@h/x", "- +notes=https\\://***@h/x"),  # as Hydra writes an override, colon escaped
        ('"storage=postgresql\\\\://u\\\\:pw@h"', '"storage=postgresql\\\\://u\\\\:***@h"'),  # the same in JSON
    ],
)
def test_secrets_in_each_form_are_masked(text, clean):
    assert redact(text) == clean


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://postgres@127.0.0.1:5432/db",
        "sqlite:////tmp/x.db",
        "http://server:5000/x",
        "pad_token_id: 151643",
        "max_new_tokens: 256",
        "monkey=3",
        "key_field=4",
        "password: null",
        "token_file=/data/tokens.txt",
    ],
)
def test_what_only_looks_like_a_secret_is_kept(text):
    assert redact(text) == text


def test_params_by_name():
    assert [
        is_secret_name(n)
        for n in (
            "hub_token",
            "db.password",
            "hf_key",
            "auth_header",
            "api_key",
            "pad_token_id",
            "max_new_tokens",
            "reward.weights.format",
        )
    ] == [True] * 5 + [False] * 3
    assert redact_param("hub_token", "hf_x") == "***" and redact_param("hub_token", None) is None
    assert redact_param("notes", "see https://tok@h/x") == "see https://***@h/x"


def test_scrub_rewrites_where_overrides_land_and_never_a_models_files(tmp_path):
    job = tmp_path / "sweep/0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra/overrides.yaml").write_text("- +db.password=pw123\n- seed=1\n")
    (job / "run.log").write_text("[INFO] storage postgresql://u:pw123@h/db\n")
    (job / "final_model").mkdir()
    (job / "final_model/tokenizer.json").write_text('{"added": "password=pw123"}')  # a vocabulary holds anything
    pickle, running = tmp_path / "sweep/.submitit/7/7_submitted.pkl", tmp_path / "sweep/.submitit/8/8_submitted.pkl"
    for path in (pickle, running):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"pw123")
    (pickle.parent / "7_0_result.pkl").write_bytes(b"done")
    assert {p.name for p in scrub(tmp_path / "sweep")} == {"overrides.yaml", "run.log"}
    assert "pw123" not in (job / ".hydra/overrides.yaml").read_text() + (job / "run.log").read_text()
    assert "pw123" in (job / "final_model/tokenizer.json").read_text() and pickle.exists()
    scrub(tmp_path / "sweep", pickles=True)
    assert not pickle.exists() and running.exists()  # job 8 has no result yet: a requeue would need its pickle


SECRETS = ("Pw-s3cret-1", "hf_s3cret2", "tok3nS3cret")


@pytest.mark.slow
def test_a_secret_in_a_multirun_override_reaches_no_output_file_and_nothing_in_mlflow(tmp_path):
    """Secrets in three forms given on a sweep's command line: no byte of them in any file of the sweep folder
    (configs, logs, checkpoints, summaries, report) or of the MLflow store (its database and artifacts)."""
    from tests.support import run_cli

    run_cli(
        "-m",
        "algorithm=grpo,sft",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.val_size=4",
        "data.batch_size=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        f"+db.password={SECRETS[0]}",
        f"+hub_token={SECRETS[1]}",
        f"+notes=https://{SECRETS[2]}@example.org/x",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"logger.artifact_location={tmp_path}/artifacts",
        tmp_path=tmp_path,
    )
    files = [p for folder in ("sweep", "artifacts") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    files.append(tmp_path / "mlruns.db")
    assert len(files) > 20 and (tmp_path / "sweep/0/.hydra/overrides.yaml").exists()
    found = [(str(p), s) for p in files for s in SECRETS if s.encode() in p.read_bytes()]
    assert found == []
