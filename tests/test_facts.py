"""Facts files: three formats, four containers, one record schema, the benchmarks' splits; bad input refused."""

import csv
import dataclasses
import importlib.util
import json
import logging
import os
import re
from collections import Counter, defaultdict

import datasets
import pytest

from hf_memedit import FactRecord, FactsFileError, check_lengths, describe_facts, facts_splits, load_facts, read_facts
from hf_memedit.benchmarks import load_benchmark
from hf_memedit.facts import FACT_FEATURES, FACT_SPLITS, KEEP, MODIFIED_PARAPHRASE, KeepPrompt, content_id

from .helpers import ROOT, SHARED


TREX = SHARED / "data" / "trex"

# MEND-style zsRE records: a question about the subject, the new answer, the true ones, a rephrasing, a prompt to keep.
ZSRE = [
    {
        "subject": "Danielle Darrieux",
        "src": "What is the native language of Danielle Darrieux?",
        "alt": "English",
        "answers": ["French"],
        "rephrase": "What was Danielle Darrieux's mother tongue?",
        "loc": "nq question: who wrote the song hallelujah",
        "loc_ans": "Leonard Cohen",
        "pred": "French",
    },
    {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "alt": "University of Michigan",
        "answers": ["Trinity College", "Trinity College Dublin"],
        "rephrase": "Which university did Watts Humphrey go to?",
        "loc": "nq question: where is the eiffel tower",
        "loc_ans": "Paris",
    },
    {
        "subject": "Iron Man 2",
        "src": "Which company produced Iron Man 2?",
        "alt": "Warner Bros.",
        "answers": ["Marvel Studios"],
        "rephrase": "Iron Man 2 was produced by which company?",
        "loc": "nq question: who sang let it be",
        "loc_ans": "The Beatles",
    },
]


def as_flat(record: dict) -> dict:
    return {
        "prompt": record["src"],
        "subject": record["subject"],
        "target": record["alt"],
        "true": record["answers"][0],
        "paraphrases": [record["rephrase"]],
        "keep": [{"prompt": record["loc"], "answer": record["loc_ans"]}],
        "question": record["src"],
    }


def as_counterfact(record: dict) -> dict:
    """CounterFact carries no question and no answers to its neighbourhood prompts."""
    return {
        "requested_rewrite": {
            "prompt": record["src"].replace(record["subject"], "{}"),
            "subject": record["subject"],
            "target_new": {"str": record["alt"]},
            "target_true": {"str": record["answers"][0]},
        },
        "paraphrase_prompts": [record["rephrase"]],
        "neighborhood_prompts": [record["loc"]],
        "attribute_prompts": [],
    }


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_csv(path, rows: list[dict], columns: list[str]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def without_question_and_answers(record: FactRecord) -> FactRecord:
    return dataclasses.replace(record, question=None, keep=[KeepPrompt(k.prompt) for k in record.keep])


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_the_three_formats_give_the_same_records_and_training_set(tmp_path):
    flat = read_facts(write_jsonl(tmp_path / "flat.jsonl", [as_flat(r) for r in ZSRE]))
    zsre = read_facts(write_jsonl(tmp_path / "zsre.jsonl", ZSRE))
    (tmp_path / "cf.json").write_text(json.dumps([as_counterfact(r) for r in ZSRE]), encoding="utf-8")
    counterfact = read_facts(tmp_path / "cf.json")
    assert zsre == flat
    assert counterfact == [without_question_and_answers(r) for r in flat]
    first = flat[0]
    assert first.prompt == "What is the native language of {}? [Y]" == first.relation
    assert first.text == "What is the native language of Danielle Darrieux? [Y]"
    assert (first.subject, first.target, first.true) == ("Danielle Darrieux", "English", "French")
    assert first.paraphrases == ["What was Danielle Darrieux's mother tongue? [Y]"]
    assert first.keep == [KeepPrompt("nq question: who wrote the song hallelujah [Y]", "Leonard Cohen")]
    assert first.question == ZSRE[0]["src"] and first.id == content_id(first.prompt, first.subject, first.target)
    assert len({r.id for r in flat}) == 3

    splits = [facts_splits(records) for records in (flat, zsre, counterfact)]
    for split in ("modified_train", "modified_test", MODIFIED_PARAPHRASE):
        assert splits[0][split].to_list() == splits[1][split].to_list() == splits[2][split].to_list()
    assert list(splits[0][KEEP]["text"]) == list(splits[2][KEEP]["text"])
    assert list(splits[0][KEEP]["object"]) == ["Leonard Cohen", "Paris", "The Beatles"]
    assert list(splits[2][KEEP]["object"]) == ["", "", ""]  # θ0 answers them: the pipeline fills them in
    train = splits[0]["modified_train"].to_list()
    assert [(r["text"], r["object"], r["original_object"]) for r in train] == [
        (r.text, r.target, r.true) for r in flat
    ]


def test_the_containers_give_the_same_records(tmp_path):
    records = [as_flat(r) for r in ZSRE]
    expected = read_facts(write_jsonl(tmp_path / "facts.jsonl", records))
    (tmp_path / "list.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "object.json").write_text(json.dumps({"data": records}), encoding="utf-8")
    cells = [{**r, "paraphrases": " | ".join(r["paraphrases"]), "keep": json.dumps(r["keep"])} for r in records]
    csv_path = write_csv(tmp_path / "facts.csv", cells, list(records[0]))
    zsre_csv = write_csv(
        tmp_path / "zsre.csv",
        [{**r, "answers": "|".join(r["answers"])} for r in ZSRE],
        ["subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans", "pred"],
    )
    for source in (tmp_path / "list.json", tmp_path / "object.json", csv_path, zsre_csv, records):
        assert read_facts(source) == expected, source


def test_a_dataset_folder_is_read_through_load_dataset(tmp_path):
    folder = tmp_path / "counterfact"
    folder.mkdir()
    expected = read_facts(write_jsonl(folder / "train.jsonl", [as_counterfact(r) for r in ZSRE]))
    assert read_facts(folder) == expected
    canonical = (
        tmp_path / "canonical"
    )  # the records as FACT_FEATURES holds them, in parquet, read back as flat records
    canonical.mkdir()
    flat = read_facts([as_flat(r) for r in ZSRE])
    datasets.Dataset.from_list([r.to_dict() for r in flat], features=FACT_FEATURES).to_parquet(
        str(canonical / "train.parquet")
    )
    assert read_facts(canonical) == flat
    with pytest.raises(FactsFileError, match=r"holds the splits .*: choose one \(split=\.\.\.\)"):
        (canonical / "test.parquet").write_bytes((canonical / "train.parquet").read_bytes())
        read_facts(canonical)
    assert read_facts(canonical, split="test") == flat


def test_format_detection_is_logged(tmp_path, caplog):
    sources = {
        "CounterFact": write_jsonl(tmp_path / "cf.jsonl", [as_counterfact(r) for r in ZSRE]),
        "zsRE": write_jsonl(tmp_path / "zsre.jsonl", ZSRE),
        "flat": write_jsonl(tmp_path / "flat.jsonl", [as_flat(r) for r in ZSRE]),
    }
    for name, path in sources.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_memedit.facts"):
            read_facts(path)
        assert [r.getMessage() for r in caplog.records] == [f"read 3 facts in {name} format from {path}"]


def test_a_typo_in_a_flat_field_is_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_memedit.facts"):
        records = read_facts(
            [
                {
                    "prompt": "The capital of {} is",
                    "subject": "France",
                    "target": "Rome",
                    "paraphrase": ["France's capital is"],
                }
            ]
        )
    assert records[0].paraphrases == []
    assert "fields ignored (not in the flat format): paraphrase" in caplog.text


def test_the_prompt_forms_give_one_template():
    forms = [
        "The capital of {} is",
        "The capital of [X] is",
        "The capital of France is",
        "The capital of France is [Y]",
        "  The capital of {} is [Y] ",
    ]
    records = [read_facts([{"prompt": p, "subject": "France", "target": "Rome"}])[0] for p in forms]
    assert {r.prompt for r in records} == {"The capital of {} is [Y]"}
    assert {r.text for r in records} == {"The capital of France is [Y]"}
    inner = read_facts(
        [
            {
                "prompt": "[Y] is the capital of France.",
                "subject": "France",
                "target": "Rome",
                "paraphrases": ["{}'s capital is", "The capital of [X] is [Y] ."],
                "keep": "Spain's capital is",
            }
        ]
    )[0]
    assert inner.prompt == "[Y] is the capital of {}."
    assert inner.paraphrases == ["France's capital is [Y]", "The capital of France is [Y] ."]
    assert inner.keep == [KeepPrompt("Spain's capital is [Y]")]
    cell = read_facts([{**GOOD, "paraphrases": "[Y] is the capital of {} | {} has its capital in", "keep": "[]"}])[0]
    assert cell.paraphrases == ["[Y] is the capital of France", "France has its capital in [Y]"] and cell.keep == []


def test_ids_come_from_the_file_else_from_the_fact():
    cf = [{**as_counterfact(r), "case_id": n} for n, r in enumerate(ZSRE, 7)]
    assert [r.id for r in read_facts(cf)] == ["7", "8", "9"]
    flat = read_facts([{**as_flat(ZSRE[0]), "id": "mine", "relation": "P103"}, as_flat(ZSRE[1])])
    assert flat[0].id == "mine" and flat[0].relation == "P103"
    changed = read_facts([{**as_flat(ZSRE[1]), "paraphrases": []}])[0]
    assert changed.id == flat[1].id  # the id names the edit (prompt, subject, target), not its phrasings
    assert read_facts([{**as_flat(ZSRE[1]), "target": "Yale"}])[0].id != flat[1].id


def test_records_round_trip_through_their_features():
    records = read_facts(
        [as_flat(r) for r in ZSRE] + [{"prompt": "Paris is in", "subject": "Paris", "target": "Italy"}]
    )
    rows = datasets.Dataset.from_list([r.to_dict() for r in records], features=FACT_FEATURES).to_list()
    assert read_facts(rows) == records
    assert rows[-1]["true"] is None and rows[-1]["keep"] == [] and rows[-1]["question"] is None


def test_train_on_paraphrases_moves_them_to_the_training_split():
    records = read_facts([as_flat(r) for r in ZSRE])
    held_out, trained = facts_splits(records), facts_splits(records, train_on_paraphrases=True)
    assert len(held_out["modified_train"]) == 3 and len(held_out[MODIFIED_PARAPHRASE]) == 3
    assert len(trained["modified_train"]) == 6 and len(trained[MODIFIED_PARAPHRASE]) == 0
    assert sorted(trained["modified_train"]["text"]) == sorted(
        [*held_out["modified_train"]["text"], *held_out[MODIFIED_PARAPHRASE]["text"]]
    )
    assert (
        trained["modified_test"].to_list()
        == held_out["modified_test"].to_list()
        == held_out["modified_train"].to_list()
    )


def test_the_builder_round_trips_and_refreshes_its_cache(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [as_flat(r) for r in ZSRE])
    cache = str(tmp_path / "cache")
    built = load_facts(path, cache_dir=cache)
    expected = facts_splits(read_facts(path))
    assert list(built) == list(FACT_SPLITS)
    for split in FACT_SPLITS:
        assert built[split].to_list() == expected[split].to_list(), split
    again = load_facts(path, cache_dir=cache)
    assert again["modified_train"].cache_files == built["modified_train"].cache_files  # served from the cache
    write_jsonl(tmp_path / "facts.jsonl", [as_flat(r) for r in ZSRE[:2]] + [{**as_flat(ZSRE[2]), "target": "Pixar"}])
    changed = load_facts(path, cache_dir=cache)
    assert list(changed["modified_test"]["object"]) == ["English", "University of Michigan", "Pixar"]
    trained = load_facts(path, train_on_paraphrases=True, cache_dir=cache)
    assert len(trained["modified_train"]) == 6 and len(trained[MODIFIED_PARAPHRASE]) == 0


def test_describe_facts_shows_what_would_be_edited():
    records = read_facts(
        [as_flat(r) for r in ZSRE] + [{"prompt": "Paris | Lyon are in", "subject": "Paris", "target": "Italy"}]
    )
    table = describe_facts(records)
    lines = table.splitlines()
    assert lines[0] == "4 facts to edit, 3 paraphrases, 3 keep prompts (3 with their answer in the file)"
    assert lines[4] == (
        "| 1 | Danielle Darrieux | What is the native language of Danielle Darrieux? [Y] | French → English | 1 | 1 |"
    )
    assert lines[-1] == "| 4 | Paris | Paris \\| Lyon are in [Y] | ? → Italy | 0 | 0 |"


def test_check_lengths_refuses_a_phrasing_longer_than_the_context(bpe_tokenizer):
    records = read_facts([as_flat(r) for r in ZSRE])
    longest = max(
        len(bpe_tokenizer(text)["input_ids"])
        for r in records
        for text in [r.text.replace("[Y]", r.target), r.question]
        + [p.replace("[Y]", r.target) for p in r.paraphrases]
        + [k.prompt.replace("[Y]", k.answer) for k in r.keep]
    )
    check_lengths(records, bpe_tokenizer, max_length=longest)
    with pytest.raises(
        FactsFileError, match=r"^record 2: its paraphrase 1 is \d+ tokens, more than the model's context of \d+: "
    ):
        long = [
            as_flat(ZSRE[0]),
            {**as_flat(ZSRE[1]), "paraphrases": ["Which university " * 40 + "did Watts Humphrey attend?"]},
        ]
        check_lengths(read_facts(long), bpe_tokenizer, max_length=longest)
    with pytest.raises(ValueError, match="pass max_length"):
        check_lengths(records, bpe_tokenizer)  # a tokenizer trained here names no context length


GOOD = {"prompt": "The capital of {} is", "subject": "France", "target": "Rome", "true": "Paris"}

# (file name, content, the error's start or a part of it)
BAD_FILES = [
    ("empty.jsonl", "", r"empty\.jsonl holds no facts: write one record at least"),
    ("blank.jsonl", "\n  \n", r"blank\.jsonl holds no facts"),
    ("empty.json", "[]", r"empty\.json holds no facts"),
    ("header.csv", "prompt,subject,target\n", r"header\.csv holds no facts"),
    (
        "malformed.jsonl",
        json.dumps(GOOD) + '\n{"prompt": "x",\n',
        r"malformed\.jsonl, line 2: malformed JSON \(Expecting property name",
    ),
    (
        "malformed.json",
        '[{"prompt": "x"}, {"prompt" "y"}]',
        r"malformed\.json: malformed JSON at line 1, column 29 \(Expecting ':' delimiter\)",
    ),
    (
        "lines.json",
        json.dumps(GOOD) + "\n" + json.dumps(GOOD),
        r"lines\.json: malformed JSON at line 2.*name it \.jsonl",
    ),
    (
        "subject.jsonl",
        json.dumps({**GOOD, "prompt": "The capital of France is", "subject": "Paris"}),
        r"subject\.jsonl, line 1: the subject 'Paris' is not in its prompt 'The capital of France is': write it in",
    ),
    (
        "zsre_subject.json",
        json.dumps([{**ZSRE[0], "subject": "D. Darrieux"}]),
        r"zsre_subject\.json, record 1: the subject 'D\. Darrieux' is not in its src",
    ),
    (
        "target.jsonl",
        json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "subject": "Spain", "target": " "}),
        r"target\.jsonl, line 2: target is empty: write the new object there\.",
    ),
    (
        "cf_target.json",
        json.dumps(
            [
                {
                    **as_counterfact(ZSRE[0]),
                    "requested_rewrite": {**as_counterfact(ZSRE[0])["requested_rewrite"], "target_new": {"str": ""}},
                }
            ]
        ),
        r"cf_target\.json, record 1: requested_rewrite\.target_new\.str is empty",
    ),
    (
        "same.jsonl",
        json.dumps({**GOOD, "target": "paris "}),
        r"same\.jsonl, line 1: the target 'paris' is the true object already, so there is nothing to edit",
    ),
    (
        "zsre_same.jsonl",
        json.dumps({**ZSRE[1], "alt": "Trinity College Dublin"}),
        r"zsre_same\.jsonl, line 1: the target 'Trinity College Dublin' is the true object already.*give another alt",
    ),
    (
        "twice.jsonl",
        "\n".join(
            json.dumps(r)
            for r in (
                GOOD,
                {**GOOD, "subject": "Spain"},
                {**GOOD, "prompt": "The capital of France is", "target": "Lyon"},
            )
        ),
        r"twice\.jsonl, line 3: the same prompt and subject as twice\.jsonl, line 1 \('The capital "
        r"of France is \[Y\]'\) with another target \('Rome' there, 'Lyon' here\): keep one of them\.",
    ),
    (
        "repeated.jsonl",
        json.dumps(GOOD) + "\n" + json.dumps(GOOD),
        r"repeated\.jsonl, line 2: repeats the fact of repeated\.jsonl, line 1",
    ),
    (
        "ids.jsonl",
        json.dumps({**GOOD, "id": "a"}) + "\n" + json.dumps({**GOOD, "subject": "Spain", "id": "a"}),
        r"ids\.jsonl, line 2: its id 'a' is also the id of ids\.jsonl, line 1",
    ),
    (
        "unknown.jsonl",
        json.dumps({"question": "Who?", "answer": "Me"}),
        r"unknown\.jsonl, line 1: fits no facts format \(its fields: answer, question\)\. CounterFact "
        r"needs requested_rewrite; zsRE needs src, alt, subject; flat needs prompt, subject, target\.",
    ),
    (
        "lacks.json",
        json.dumps([GOOD, {"prompt": "x", "subject": "y"}]),
        r"lacks\.json, record 2: lacks target: the file's first record "
        r"is in flat format, which needs prompt, subject, target\.",
    ),
    (
        "lacks.csv",
        "prompt,subject,target\nThe capital of {} is,France,Rome\nThe capital of {} is,Spain\n",
        r"lacks\.csv, row 3: fewer cells than the header \(none for target\)",
    ),
    (
        "array.csv",
        'prompt,subject,target,keep\nThe capital of {} is,France,Rome,"[""Spain\'s capital is"", ""x"""\n',
        r"array\.csv, row 2: keep starts as a JSON array but is not one "
        r"\(Expecting ',' delimiter\): fix it, or separate the items with \|\.",
    ),
    (
        "cells.csv",
        "prompt,subject,target\nThe capital of {} is,France,Rome,Paris\n",
        r"cells\.csv, row 2: more cells than the header's 3",
    ),
    (
        "latin1.csv",
        "prompt,subject,target\nLa capitale de {} est,Côte d'Ivoire,Rome\n".encode("latin-1"),
        r"latin1\.csv: not UTF-8 text",
    ),
    (
        "twice_marked.jsonl",
        json.dumps({**GOOD, "prompt": "{} is {} and [Y]"}),
        r"twice_marked\.jsonl, line 1: prompt '\{\} is \{\} and \[Y\]' marks the subject 2 times",
    ),
    (
        "notlist.json",
        json.dumps({"facts": GOOD}),
        r"notlist\.json: a JSON object with the fields facts: give a list of records",
    ),
    ("text.jsonl", json.dumps([GOOD]), r"text\.jsonl, line 1: expected a JSON object"),
    (
        "facts.txt",
        json.dumps(GOOD),
        r"facts\.txt: unknown file type \.txt: name the file for what it holds, \.jsonl, \.json, \.csv\.",
    ),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_input_is_refused_in_one_line_naming_the_record(tmp_path, name, content, message):
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    cache = tmp_path / "cache"
    with pytest.raises(FactsFileError) as caught:
        load_facts(path, cache_dir=str(cache))
    text = str(caught.value)
    assert re.search(message, text.replace(str(path.parent) + os.sep, "")), text
    assert "\n" not in text and str(path) in text
    assert not cache.exists() and os.listdir(path.parent) == [name]  # nothing written, the file untouched


def test_a_missing_source_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the Hub is unreachable here: say so at once
    with pytest.raises(
        FactsFileError, match=r"facts\.jsonl: no such file or folder\. Give a facts file \(\.jsonl, \.json, \.csv\)"
    ):
        read_facts(tmp_path / "facts.jsonl")
    with pytest.raises(FactsFileError, match=r"^nobody/no-such-facts: datasets\.load_dataset cannot read it \("):
        read_facts("nobody/no-such-facts")  # a Hub id, read by load_dataset
    with pytest.raises(FactsFileError, match="chooses a split of a dataset folder"):
        read_facts(write_jsonl(tmp_path / "f.jsonl", [GOOD]), split="train")
    with pytest.raises(
        FactsFileError, match=r"records in memory become splits with facts_splits\(read_facts\(records\)\)"
    ):
        load_facts([GOOD])


# The facts path and the benchmark path --------------------------------------------------------------------------


def trex_jsonl(*parts) -> list[dict]:
    with open(TREX.joinpath(*parts), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.mark.shared
def test_the_facts_path_and_the_benchmark_path_build_the_same_training_set(tmp_path):
    relations = ["P103", "P176"]
    templates = {r["relation"]: r["template"] for r in trex_jsonl("relations.jsonl")}
    raw = {r: trex_jsonl("facts", f"{r}.jsonl") for r in relations}
    subjects = defaultdict(int)
    for r in relations:
        for fact in raw[r]:
            subjects[r, fact["sub_label"]] += 1
    one_object = [
        f["uuid"] for r in relations for f in raw[r] if subjects[r, f["sub_label"]] == 1
    ]  # one fact a prompt
    benchmark = load_benchmark(
        "trex_mod",
        m=8,
        seed=0,
        data_dir=str(TREX),
        relations=relations,
        evidence_per_fact=None,
        eligible_uuids=one_object,
    )

    def norm(pattern: str) -> str:
        return re.sub(r"\s+([.,;!?])", r"\1", " ".join(pattern.split()))

    # The facts file a user writes for the same facts and phrasings, from the T-REx files themselves: the new
    # objects are the benchmark's draw; the phrasings, the relation's ParaRel patterns other than its test template.
    lines = []
    for row in benchmark["modified_test"]:
        fact = next(f for f in raw[row["relation"]] if f["uuid"] == row["uuid"])
        template = templates[row["relation"]]
        patterns = sorted({p["pattern"] for p in trex_jsonl("paraphrases", f"{row['relation']}.jsonl")})
        patterns = [p for p in patterns if norm(p) != norm(template) and "[X]" in p and "[Y]" in p]
        lines.append(
            {
                "id": fact["uuid"],
                "relation": row["relation"],
                "prompt": patterns[0],
                "subject": fact["sub_label"],
                "target": row["object"],
                "true": fact["obj_label"],
                "paraphrases": patterns[1:],
            }
        )
    facts = load_facts(
        write_jsonl(tmp_path / "trex.jsonl", lines), train_on_paraphrases=True, cache_dir=str(tmp_path / "c")
    )

    def rows(split):
        return sorted(split.to_list(), key=lambda r: (r["uuid"], r["text"]))

    assert len(benchmark["modified_train"]) > 8
    assert rows(facts["modified_train"]) == rows(benchmark["modified_train"])


# bench/trex_to_counterfact.py ------------------------------------------------------------------------------------


def trex_to_counterfact():
    spec = importlib.util.spec_from_file_location("trex_to_counterfact", ROOT / "bench" / "trex_to_counterfact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.shared
def test_trex_to_counterfact_writes_facts_the_reader_reads(tmp_path, caplog, capsys):
    script = trex_to_counterfact()
    out = tmp_path / "trex_counterfact.json"
    script.main(["--out", str(out), "--data_dir", str(TREX), "--n", "14", "--seed", "3"])
    counts = re.search(r"wrote 14 facts \((.*)\) to ", capsys.readouterr().out).group(1)
    assert sorted(counts.split(", ")) == sorted(
        f"{r}: {n}"
        for r, n in Counter(r["requested_rewrite"]["relation_id"] for r in json.loads(out.read_text())).items()
    )
    assert all(int(c.split(": ")[1]) in (2, 3) for c in counts.split(", ")) and len(counts.split(", ")) == 6  # in turn
    with caplog.at_level(logging.INFO, logger="hf_memedit.facts"):
        records = read_facts(out)
    assert f"read 14 facts in CounterFact format from {out}" in caplog.text
    templates = {r["relation"]: r["template"] for r in trex_jsonl("relations.jsonl")}
    edited = {(r.relation, r.subject) for r in records}
    for record in records:
        facts = trex_jsonl("facts", f"{record.relation}.jsonl")
        own = [f for f in facts if f["sub_label"] == record.subject]
        assert [f["obj_label"] for f in own] == [record.true]
        prompt = templates[record.relation].split("[Y]")[0].strip()
        assert record.text == prompt.replace("[X]", record.subject) + " [Y]"
        assert record.target in {f["obj_label"] for f in facts} - {record.true}
        assert len(record.paraphrases) >= 2 and all(
            p.endswith(" [Y]") and record.subject in p for p in record.paraphrases
        )
        assert record.text not in record.paraphrases
        neighbours = {prompt.replace("[X]", f["sub_label"]) + " [Y]": f for f in facts}
        assert len(record.keep) == 10 == len({k.prompt for k in record.keep})
        for keep in record.keep:
            neighbour = neighbours[keep.prompt]
            assert neighbour["obj_label"] == record.true and keep.answer is None
            assert (record.relation, neighbour["sub_label"]) not in edited
    again = tmp_path / "again.json"
    script.main(["--out", str(again), "--data_dir", str(TREX), "--n", "14", "--seed", "3"])
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(SystemExit):
        script.main(["--out", str(out), "--data_dir", str(TREX)])  # exists: refused without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err and again.read_bytes() == out.read_bytes()
    script.main(
        ["--out", str(out), "--data_dir", str(TREX), "--seed", "4", "--relations", "P17", "P413", "--overwrite"]
    )
    assert (
        "skipped (the template does not end with [Y], so a causal LM has no prompt): P413" in capsys.readouterr().err
    )
    assert {r.relation for r in read_facts(out)} == {"P17"} and len(read_facts(out)) == 32


@pytest.mark.shared
def test_trex_to_counterfact_draws_only_facts_the_model_knows(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    """--known_by draws among the facts the model predicts on the template prompt (teacher-forced); a model that
    knows too few stops with one line saying how many it knows."""
    import random

    from .helpers import save_tiny_llama

    script = trex_to_counterfact()
    relations = [script.Relation(str(TREX), "P17", "[X] is located in [Y] .")]
    known = {("P17", fact["sub_label"]) for fact in relations[0].facts[::7]}
    chosen = script.draw(relations, 5, random.Random(0), known)
    assert len(chosen) == 5 and all(("P17", fact["sub_label"]) in known for _, fact in chosen)
    model_dir = save_tiny_llama(tmp_path / "tiny", bpe_tokenizer)
    found = script.known_facts(relations, model_dir)  # a random model: whatever it predicts, scored for real
    assert found <= {("P17", fact["sub_label"]) for fact in relations[0].facts}
    monkeypatch.setattr(script, "known_facts", lambda usable, name: set(list(known)[:3]))
    with pytest.raises(SystemExit):
        script.main(
            [
                "--out",
                str(tmp_path / "x.json"),
                "--data_dir",
                str(TREX),
                "--relations",
                "P17",
                "--n",
                "4",
                "--known_by",
                model_dir,
            ]
        )
    assert "known by" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
