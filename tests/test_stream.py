"""An edit stream (`edit_stream`, `memedit stream`) on a tiny Llama, T = 8 facts in batches of 2: the bound after the
stream for both centres, a resume after a kill equal to the uninterrupted stream, an extension, the per-batch record,
the one-line errors, and the CLI giving the edit of `edit_stream`."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from hf_memedit import EditModel, edit_stream
from hf_memedit.cli import main
from hf_memedit.experiments import stream as stream_module
from hf_memedit.experiments.stream import STREAM_PLOT, STREAM_RECORD
from hf_memedit.run_folder import verify_run

from .helpers import save_tiny_llama


SUBJECTS = ["France", "Norway", "Peru", "Greece", "Canada", "Italy", "Ontario", "Azerbaijan", "Paris", "Lima"]
TARGETS = ["Lima", "Athens", "Baku", "Oslo", "Paris", "Seine", "Ottawa", "Rome", "Oslo", "Athens"]
FACTS = [
    {"prompt": "The capital of {} is", "subject": s, "target": t, "keep": [f"The river of {s} is the"]}
    for s, t in zip(SUBJECTS, TARGETS)
]
T, B = 8, 2
# Small and fast: the recipe (KL on keep prompts, the null space of the keys, L∞) on block 1 with few steps.
FAST = {
    "edit_blocks": ["1"],
    "max_steps": 6,
    "per_device_train_batch_size": 2,
    "preserve_corpus_samples": 8,
    "preserve_corpus_length": 8,
    "per_device_eval_batch_size": 16,
    "disable_tqdm": True,
    "learning_rate": 5e-2,
    "delta": 2e-2,
}


pytestmark = pytest.mark.usefixtures("isolated_hf_home")


@pytest.fixture
def model_dir(tmp_path, bpe_tokenizer):
    """A random Llama with the tests' BPE tokenizer."""
    return save_tiny_llama(tmp_path / "base", bpe_tokenizer)


def facts_file(tmp_path, n: int, name: str = "facts.jsonl", facts=FACTS) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(f) + "\n" for f in facts[:n]), encoding="utf-8")
    return str(path)


def load(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def edit_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "edit", "memedit_edit.safetensors"))


def assert_same_edit(a, b):
    wa, wb = edit_weights(a), edit_weights(b)
    assert set(wa) == set(wb) and wa
    for name in wa:  # fresh Adam per batch in both: equal up to float reordering
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_stream_records_each_batch_stays_in_the_ball_and_reverts(tmp_path, model_dir):
    model, tokenizer = load(model_dir)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    out = str(tmp_path / "stream")
    outcome = edit_stream(model, tokenizer, facts_file(tmp_path, T), B, out, **FAST)
    record = json.loads((tmp_path / "stream" / STREAM_RECORD).read_text())
    assert [b["batch"] for b in record["batches"]] == [1, 2, 3, 4] and record["finished"]
    assert [[f["subject"] for f in b["facts"]] for b in record["batches"]] == [
        SUBJECTS[i : i + 2] for i in range(0, T, 2)
    ]
    for batch in record["batches"]:
        assert 0 <= batch["efficacy"] <= 1 and batch["finished"] and batch["train_loss"] > 0
        assert (batch["retention"] is None) == (batch["n_known"] == 0)  # the tiny random model may know none
        assert (batch["earlier_efficacy"] is None) if batch["batch"] == 1 else 0 <= batch["earlier_efficacy"] <= 1
        assert batch["distance_to_theta0"] <= FAST["delta"] * (1 + 1e-6)  # centred on θ0: the whole stream in the ball
    assert len(record["final_by_batch"]) == 4 and "gen_a_m" in record["final"]
    for batch in record["batches"]:  # by greedy generation too, both stop rules, right after each batch
        assert 0 <= batch["gen_efficacy"] <= batch["gen_efficacy_comma"] <= 1
        assert (batch["gen_earlier_efficacy_comma"] is None) == (batch["batch"] == 1)
    for key in ("gen_final_by_batch", "gen_final_by_batch_comma"):
        assert len(record[key]) == 4 and all(0 <= share <= 1 for share in record[key])
    assert sum(record["gen_final_by_batch"]) / 4 == final_gen_share(outcome)
    # the last batch's figures are the end's: the same facts, the same model
    last, final = record["batches"][-1], outcome.record.metrics
    assert last["n_known"] == final["n_known"] and last["retention"] == final["retention"]
    assert record["final_by_batch"][-1] == last["efficacy"]
    assert sum(f["correct"] for f in outcome.record.facts) / T == final["a_m"]
    assert outcome.record.metrics["n_modified"] == T and len(outcome.record.facts) == T
    assert (tmp_path / "stream" / STREAM_PLOT).stat().st_size > 0
    verify_run(out)  # sealed as a run: push, verify and revert read it as one
    fresh, _ = load(model_dir)
    applied = EditModel.from_pretrained(fresh, os.path.join(out, "edit"))
    assert applied.changed_tensors()
    applied.revert()
    outcome.edit_model.revert()
    for name, value in theta0.items():
        assert torch.equal(fresh.state_dict()[name], value) and torch.equal(model.state_dict()[name], value), name


def test_the_ball_centred_on_the_previous_state_bounds_each_batch_not_the_stream(tmp_path, model_dir):
    model, tokenizer = load(model_dir)
    edit_stream(model, tokenizer, facts_file(tmp_path, T), B, str(tmp_path / "s"), stream_center="previous", **FAST)
    batches = json.loads((tmp_path / "s" / STREAM_RECORD).read_text())["batches"]
    for k, batch in enumerate(batches, 1):
        assert batch["step_distance"] <= FAST["delta"] * (1 + 1e-6)  # each batch within δ of the state before it
        assert batch["distance_to_theta0"] <= k * FAST["delta"] * (1 + 1e-6)
    assert max(batch["distance_to_theta0"] for batch in batches) > FAST["delta"]  # the stream as a whole drifts past δ


def final_gen_share(outcome) -> float:
    return outcome.record.metrics["gen_a_m"]


def test_earlier_edits_keys_join_each_later_batchs_null_space(tmp_path, model_dir, monkeypatch):
    """AlphaEdit's sequential rule (`stream_earlier_keys`): batch k's trainer is given the token ids of the facts of
    batches 1..k−1 as trained (their training phrasings with the new objects), none for the first batch."""
    given = []

    class Recording(stream_module.ConstrainedEditTrainer):
        def __init__(self, *args, edit_keys=None, **kwargs):
            given.append(edit_keys)
            super().__init__(*args, edit_keys=edit_keys, **kwargs)

    monkeypatch.setattr(stream_module, "ConstrainedEditTrainer", Recording)
    model, tokenizer = load(model_dir)
    outcome = edit_stream(
        model,
        tokenizer,
        facts_file(tmp_path, 6),
        B,
        str(tmp_path / "s"),
        stream_center="previous",
        stream_earlier_keys=True,
        target_suffix=".",
        **FAST,
    )
    assert given[0] is None and [len(ids) for ids in given[1:]] == [2, 4]
    texts = [tokenizer.decode(ids) for ids in given[2]]
    for subject, target in zip(SUBJECTS[:4], TARGETS[:4]):  # as trained: the target suffix after the new object
        assert any(subject in text and text.endswith(f"{target}.") for text in texts), (subject, texts)
    assert outcome.stream["key"]["earlier_keys"] is True and outcome.record.config["stream"]["earlier_keys"] is True


class Killed(BaseException):
    """A kill, as the process sees it (like KeyboardInterrupt, not an Exception)."""


@pytest.mark.parametrize("kill", ["after_batch_1", "inside_batch_3"])
def test_a_killed_stream_resumes_to_the_uninterrupted_result(tmp_path, model_dir, monkeypatch, kill):
    facts = facts_file(tmp_path, T)
    model, tokenizer = load(model_dir)
    edit_stream(model, tokenizer, facts, B, str(tmp_path / "whole"), **FAST)
    commit, figures = stream_module.EditStream.commit, stream_module.EditStream.figures

    def commit_then_die(self, batch, done):
        commit(self, batch, done)
        if batch.index == 0:
            raise Killed

    def die_before_commit(self, now, earlier):
        if len(earlier) == 4:  # batch 3 trained, not yet committed
            raise Killed
        return figures(self, now, earlier)

    if kill == "after_batch_1":
        monkeypatch.setattr(stream_module.EditStream, "commit", commit_then_die)
    else:
        monkeypatch.setattr(stream_module.EditStream, "figures", die_before_commit)
    model, tokenizer = load(model_dir)
    with pytest.raises(Killed):
        edit_stream(model, tokenizer, facts, B, str(tmp_path / "killed"), **FAST)
    record = json.loads((tmp_path / "killed" / STREAM_RECORD).read_text())
    assert len(record["batches"]) == (1 if kill == "after_batch_1" else 2) and not record["finished"]
    assert not (tmp_path / "killed" / "edit").exists()  # no edit of a stream cut short
    monkeypatch.undo()
    model, tokenizer = load(model_dir)  # a new process: the base model again
    edit_stream(model, tokenizer, facts, B, str(tmp_path / "killed"), **FAST)
    assert_same_edit(tmp_path / "whole", tmp_path / "killed")
    whole = json.loads((tmp_path / "whole" / STREAM_RECORD).read_text())
    resumed = json.loads((tmp_path / "killed" / STREAM_RECORD).read_text())
    assert [b["facts"] for b in resumed["batches"]] == [b["facts"] for b in whole["batches"]]
    assert [b["efficacy"] for b in resumed["batches"]] == [b["efficacy"] for b in whole["batches"]]
    assert os.listdir(tmp_path / "killed" / "stream") == ["state-4.safetensors"]


def test_a_finished_stream_is_extended_by_a_longer_facts_file(tmp_path, model_dir):
    out = str(tmp_path / "s")
    model, tokenizer = load(model_dir)
    edit_stream(model, tokenizer, facts_file(tmp_path, 6, "six.jsonl"), B, out, **FAST)
    before = json.loads((tmp_path / "s" / STREAM_RECORD).read_text())
    six = edit_weights(out)
    assert len(before["gen_final_by_batch_comma"]) == 3
    model, tokenizer = load(model_dir)  # extended, and scored without generation this time
    outcome = edit_stream(
        model, tokenizer, facts_file(tmp_path, T, "eight.jsonl"), B, out, **{**FAST, "generation_eval": False}
    )
    after = json.loads((tmp_path / "s" / STREAM_RECORD).read_text())
    assert len(after["final_by_batch"]) == 4 and "gen_final_by_batch_comma" not in after  # no figures of 6 facts
    assert (tmp_path / "s" / STREAM_PLOT).stat().st_size > 0
    assert after["batches"][:3] == before["batches"]  # the record of the first three batches untouched
    assert [f["subject"] for f in after["batches"][3]["facts"]] == SUBJECTS[6:8] and after["finished"]
    assert outcome.record.metrics["n_modified"] == T and after["batches"][3]["distance_to_theta0"] <= FAST["delta"] * (
        1 + 1e-6
    )
    assert any(not torch.equal(six[name], value) for name, value in edit_weights(out).items())
    verify_run(out)


def folder_bytes(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_bad_input_stops_with_one_line_and_loses_nothing(tmp_path, model_dir, capsys):
    out = str(tmp_path / "s")
    model, tokenizer = load(model_dir)
    edit_stream(model, tokenizer, facts_file(tmp_path, 4), B, out, **FAST)
    kept = folder_bytes(out)
    moved = [dict(f) for f in FACTS]
    moved[0]["target"] = "Rome"  # France was edited to Lima
    reordered = [FACTS[1], FACTS[0], *FACTS[2:]]
    cases = [
        (["--batch_size", "0"], r"batch_size 0: a stream edits batches of at least one fact; give --batch_size 1"),
        (["--facts", str(tmp_path / "nowhere.jsonl")], r"nowhere\.jsonl"),
        (
            ["--facts", facts_file(tmp_path, 6, "moved.jsonl", moved)],
            r"The fact 'The capital of France is \[Y\]' was already edited to 'Lima' \(batch 1\)",
        ),
        (["--facts", facts_file(tmp_path, 6, "reordered.jsonl", reordered)], r"do not start with the 4 facts"),
        (["--delta", "0.5"], r"was started with other options: delta \(0\.02 there, 0\.5 now\)"),
        (["--stream_center", "previous"], r"was started with other options: center"),
        (["--stream_earlier_keys"], r"stream_earlier_keys .* needs stream_center previous \(not theta0\)"),
        (
            ["--stream_earlier_keys", "--stream_center", "previous", "--key_constraint", "none"],
            r"it needs key_constraint nullspace \(not none\)\.$",
        ),
    ]
    base = [
        "stream",
        "--facts",
        facts_file(tmp_path, 4),
        "--model_name_or_path",
        model_dir,
        "--output_dir",
        out,
        "--batch_size",
        "2",
        *[
            item
            for name, value in FAST.items()
            for item in (
                f"--{name}",
                *(
                    value
                    if isinstance(value, list)
                    else [str(value).lower() if isinstance(value, bool) else str(value)]
                ),
            )
        ],
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(base + argv)
        text = str(exit_info.value.code)
        assert "\n" not in text and pytest.importorskip("re").search(message, text), (argv, text)
        assert folder_bytes(out) == kept, argv
    capsys.readouterr()


def test_the_cli_gives_the_edit_of_edit_stream(tmp_path, model_dir, capsys):
    """The stream's own options are keys of its --config YAML too (and only of its own: `memedit edit` refuses
    them); the command gives the edit `edit_stream` gives."""
    import yaml

    from hf_memedit.cli import parse
    from hf_memedit.experiments.facts_edit import FACTS_RECIPE

    facts = facts_file(tmp_path, T)
    config = tmp_path / "stream.yaml"
    # A config is the whole recipe (the facts recipe is the default only without one): it holds it.
    config.write_text(yaml.safe_dump({**FACTS_RECIPE, **FAST, "batch_size": B, "stream_center": "previous"}))
    with pytest.raises(ValueError, match=r"unknown key 'batch_size'"):
        parse("edit", ["--config", str(config), "--facts", facts])
    argv = ["stream", "--config", str(config), "--facts", facts, "--model_name_or_path", model_dir]
    main([*argv, "--output_dir", str(tmp_path / "cli")])
    screen = capsys.readouterr().out
    assert "first batch: right after it" in screen and "stream.json" in screen
    model, tokenizer = load(model_dir)
    edit_stream(model, tokenizer, facts, B, str(tmp_path / "py"), stream_center="previous", **FAST)
    assert_same_edit(tmp_path / "cli", tmp_path / "py")
    cli = json.loads((tmp_path / "cli" / STREAM_RECORD).read_text())
    py = json.loads((tmp_path / "py" / STREAM_RECORD).read_text())
    assert cli["key"] == py["key"] and [b["facts"] for b in cli["batches"]] == [b["facts"] for b in py["batches"]]


def test_earlier_facts_join_every_batch_as_cross_entropy_rows_with_their_new_objects():
    import datasets

    from hf_memedit.collators import PRESERVE_KEY, WEIGHT_KEY
    from hf_memedit.experiments.stream import with_earlier

    groups = datasets.Dataset.from_list(
        [
            {"text": ["a [Y]", "k [Y]"], "object": ["A", "K"], WEIGHT_KEY: [1.0, 0.5], PRESERVE_KEY: [False, True]},
            {"text": ["b [Y]", "l [Y]"], "object": ["B", "L"], WEIGHT_KEY: [1.0, 0.5], PRESERVE_KEY: [False, True]},
        ]
    )
    earlier = datasets.Dataset.from_list([{"text": f"e{i} [Y]", "object": f"E{i}"} for i in range(3)])
    mixed = with_earlier(groups, earlier, ratio=2.0, weight=0.25, seed=0)
    added = [row["text"][2:] for row in mixed]
    assert [len(texts) for texts in added] == [2, 2]  # 2 earlier facts per edit fact of the group
    assert sorted(added[0] + added[1][:1]) == ["e0 [Y]", "e1 [Y]", "e2 [Y]"]  # round all of them before a repeat
    for row in mixed:
        assert row[PRESERVE_KEY][2:] == [False, False] and row[WEIGHT_KEY][2:] == [0.25, 0.25]  # CE, not KL to θ0
        assert row["object"][2:] == [text.split()[0].upper() for text in row["text"][2:]]  # each with its new object
    assert [row["text"][:2] for row in mixed] == groups["text"]  # the batch's own mix untouched


def test_the_replay_track_trains_every_fact_so_far_in_each_batch(tmp_path, model_dir, monkeypatch):
    trained = []
    build = stream_module.edit_train_dataset

    def recording(splits, *args, **kwargs):
        trained.append(sorted(set(splits["modified_train"]["subject"])))
        return build(splits, *args, **kwargs)

    monkeypatch.setattr(stream_module, "edit_train_dataset", recording)
    model, tokenizer = load(model_dir)
    outcome = edit_stream(
        model, tokenizer, facts_file(tmp_path, T), B, str(tmp_path / "s"), stream_replay=True, **FAST
    )
    assert trained == [sorted(SUBJECTS[:k]) for k in (2, 4, 6, 8)]
    assert outcome.stream["track"].startswith("replay") and outcome.record.config["stream"]["replay"] is True
    assert [[f["subject"] for f in b["facts"]] for b in outcome.stream["batches"]] == [
        SUBJECTS[i : i + 2] for i in range(0, T, 2)
    ]


def test_the_stream_key_names_a_newer_option_only_when_it_changes_the_edit(tmp_path):
    """Streams started before fallback_keep and target_suffix existed resume: their keys hold neither."""
    from hf_memedit.cli import parse

    def key(*extra):
        job, args, options, _ = parse(
            "stream", ["--facts", "f.jsonl", "--batch_size", "2", "--output_dir", str(tmp_path), *extra]
        )
        return stream_module.stream_key(job, args, options)

    plain = key()
    assert "fallback_keep" not in plain and "target_suffix" not in plain
    assert key("--fallback_keep", "10") == plain  # the default, given
    assert key("--fallback_keep", "0") == {**plain, "fallback_keep": 0}
    assert key("--target_suffix", ".") == {**plain, "target_suffix": "."}
