import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from datasets import load_dataset

from hf_memedit.benchmarks import SPLITS, benchmark_facts, export_benchmark, load_benchmark
from hf_memedit.benchmarks.common import modify_facts
from hf_memedit.preservation import no_split

from .helpers import SHARED


TREX = str(SHARED / "data" / "trex")
LAMA = str(Path(__file__).parent / "fixtures" / "lama")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test builds into its own cache: `datasets` reads HF_DATASETS_CACHE once, at import, into
    `datasets.config`, so the module attribute is what must change (the variable is for subprocesses)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _check_modification(dataset, facts_by_uuid):
    modified = dataset["modified_test"]
    for row in modified:
        fact = facts_by_uuid[row["uuid"]]
        assert row["original_object"] == fact.object != row["object"]
        relation_objects = {f.object for f in facts_by_uuid.values() if f.relation == fact.relation}
        assert row["object"] in relation_objects
    train_uuids = set(dataset["modified_train"]["uuid"])
    assert train_uuids == set(modified["uuid"])
    assert all(r["object"] != r["original_object"] for r in dataset["modified_train"])
    assert all(r["object"] == r["original_object"] for r in dataset["unmodified_test"])
    assert not train_uuids & set(dataset["unmodified_test"]["uuid"])
    assert all(
        r["text"].count("[Y]") == 1
        for split in SPLITS
        for r in dataset[split].select(range(min(200, len(dataset[split]))))
    )


@pytest.mark.shared
@pytest.mark.parametrize("m", [32, 128, 512])
def test_trex_split_sizes_and_new_objects(m):
    facts = benchmark_facts("trex_mod", TREX)
    by_uuid = {f.uuid: f for f in facts}
    dataset = load_benchmark("trex_mod", m=m, seed=0, data_dir=TREX)
    assert len(dataset["modified_test"]) == m
    assert len(set(dataset["modified_test"]["uuid"])) == m
    assert len(dataset["unmodified_test"]) == len(facts) - m
    expected_train = sum(len(by_uuid[u].train_texts) for u in dataset["modified_test"]["uuid"])
    assert len(dataset["modified_train"]) == expected_train >= m
    assert 1 <= expected_train / m <= 4  # evidence_per_fact = 4
    _check_modification(dataset, by_uuid)


@pytest.mark.shared
def test_trex_new_objects_follow_the_frequency_of_the_relation():
    facts = list(benchmark_facts("trex_mod", TREX, relations=["P36"]))
    counts = Counter(f.object for f in facts)
    # A large draw: many seeds, all facts of P36 each time.
    drawn = Counter()
    for seed in range(40):
        drawn.update(modify_facts(facts, len([f for f in facts if f.train_texts]), seed, None).values())
    total = sum(drawn.values())
    # Expected share of object o: sum over facts f != o of count(o) / (N - count(obj_f)).
    n = sum(counts.values())
    expected = Counter()
    for fact in facts:
        if fact.train_texts:
            for obj, c in counts.items():
                if obj != fact.object:
                    expected[obj] += c / (n - counts[fact.object])
    scale = total / sum(expected.values())
    for obj, _ in counts.most_common(5):
        assert abs(drawn[obj] - expected[obj] * scale) < 5 * (expected[obj] * scale) ** 0.5 + 5, obj


@pytest.mark.shared
@pytest.mark.slow
def test_same_output_under_different_hash_seeds(tmp_path):
    script = (  # the benchmark, its preservation / locality split and its validation half
        "import json, sys; from hf_memedit.benchmarks import load_benchmark; "
        "from hf_memedit.preservation import disjoint_split; from hf_memedit.experiments.loading import holdout; "
        f"d = load_benchmark('trex_mod', m=64, seed=3, data_dir={TREX!r}, cache_dir=sys.argv[1]); "
        "p, _ = disjoint_split(d, 0.5, 3); v, _ = holdout(p['unmodified_test'], 0.5, 3); "
        "print(json.dumps({s: d[s]['uuid'][:50] + d[s]['object'][:50] + d[s]['text'][:50] for s in d} | "
        "{'pool': sorted(p['unmodified_train']['uuid']), 'validation': sorted(v['uuid'])}))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / hash_seed)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]


@pytest.mark.shared
def test_object_last_keeps_causal_phrasings():
    from hf_memedit.benchmarks.trex import object_last

    dataset = load_benchmark("trex_mod", m=16, data_dir=TREX, object_last=True)
    for split in SPLITS:
        for text in dataset[split]["text"][:500]:
            assert object_last(text) and text.rstrip(" .,;!?").endswith("[Y]"), text


def test_lama_layout_uses_masked_sentences():
    dataset = load_benchmark("trex_mod", m=3, seed=1, data_dir=LAMA, evidence_per_fact=None)
    by_uuid = {f.uuid: f for f in benchmark_facts("trex_mod", LAMA)}
    _check_modification(dataset, by_uuid)
    rows = dataset["modified_train"]
    assert len(rows) == sum(len(by_uuid[u].train_texts) for u in dataset["modified_test"]["uuid"])
    # Sentences with two masks are dropped; the subject is already in the sentence.
    assert all(r["text"].count("[Y]") == 1 and r["subject"] in r["text"] for r in rows)
    assert {r["text"] for r in dataset["modified_test"]} <= {
        f"The capital of {f.subject} is [Y] ." for f in by_uuid.values()
    } | {f"{f.subject} is located in [Y] ." for f in by_uuid.values()}


def test_lama_zip_is_downloaded_from_its_url(tmp_path):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in Path(LAMA).rglob("*.jsonl"):
            zf.write(path, "data/" + str(path.relative_to(LAMA)))
    dataset = load_benchmark("trex_mod", m=2, data_dir=None, data_url=archive.as_uri())
    assert len(dataset["modified_test"]) == 2 and len(dataset["unmodified_test"]) == 9


def test_geo_mod():
    dataset = load_benchmark("geo_mod", m=32, seed=0, max_facts_per_relation=50)
    facts = benchmark_facts("geo_mod", max_facts_per_relation=50)
    assert {f.relation for f in facts} == {"P36", "P1376", "P17", "P30", "P47"}
    assert len(dataset["modified_test"]) == 32 and len(dataset["unmodified_test"]) == len(facts) - 32
    _check_modification(dataset, {f.uuid: f for f in facts})
    france = next(f for f in facts if f.relation == "P36" and f.subject == "France")
    assert france.object == "Paris" and france.test_texts == ["The capital of France is [Y]."]
    big = benchmark_facts("geo_mod", max_facts_per_relation=None)
    assert len(big) > 10_000


def test_locality_relations_add_unmodified_facts_without_changing_the_edit():
    options = dict(relations=["P36", "P1376"], max_facts_per_relation=60)
    plain = load_benchmark("geo_mod", m=24, seed=0, **options)
    wider = load_benchmark("geo_mod", m=24, seed=0, locality_relations=["P17"], **options)
    for split in ("modified_train", "modified_test"):  # the same facts, new objects and phrasings are edited
        assert wider[split].to_list() == plain[split].to_list()
    cities = benchmark_facts("geo_mod", relations=["P17"], max_facts_per_relation=60)
    assert len(wider["unmodified_test"]) == len(plain["unmodified_test"]) + len(cities)
    # A city an edit makes a capital lies, by that edit, in the country it is now the capital of: its P17 fact is
    # no locality test but the edit's consistency ("The city of Cairo is in the country of [Y]" -> Japan).
    edits = list(wider["modified_test"])
    moved = {e["object"]: e["subject"] for e in edits if e["relation"] == "P36"}
    moved.update({e["subject"]: e["object"] for e in edits if e["relation"] == "P1376"})
    assert moved.keys() & {f.subject for f in cities}  # edited capitals and new capitals among the 60 largest cities
    # A former capital still lies where it did, but that fact rested on the one the edit took away: not scored.
    former = {e["original_object"] for e in edits if e["relation"] == "P36"}
    splits, locality = no_split(wider)
    scored = {r["uuid"] for r in splits["unmodified_test"] if r["relation"] == "P17"}
    assert scored == {f.uuid for f in cities if f.subject not in moved.keys() | former}
    consistency = {(r["subject"], r["object"]) for r in splits["consistency"] if r["relation"] == "P17"}
    assert consistency == {(f.subject, moved[f.subject]) for f in cities if f.subject in moved}
    named = {f["uuid"]: f["reason"] for f in locality.dropped_facts}
    assert all(named[f.uuid] == "implied_by_edit" for f in cities if f.subject in moved)
    assert all(named[f.uuid] == "about_edited_object" for f in cities if f.subject in former - set(moved))
    with pytest.raises(ValueError, match="locality_relations P99: no facts of theirs were read; choose among"):
        load_benchmark("geo_mod", m=4, locality_relations=["P99"], **options)
    with pytest.raises(ValueError, match="outside locality_relations P36"):
        load_benchmark("geo_mod", m=4, relations=["P36"], locality_relations=["P36"], max_facts_per_relation=60)


def test_parquet_export_loads_offline_and_equals_the_builder(tmp_path):
    folder = export_benchmark("geo_mod", str(tmp_path / "export"), ms=(8, 16), max_facts_per_relation=30)
    assert sorted(os.listdir(folder)) == ["README.md", "m16", "m8"]
    exported = load_dataset(folder, "m16")
    built = load_benchmark("geo_mod", m=16, max_facts_per_relation=30)
    for split in SPLITS:
        assert exported[split].to_list() == built[split].to_list()
    # Re-exported with other facts into the same folder, it loads the new facts, not `datasets`' cache of the old.
    export_benchmark("geo_mod", folder, ms=(8, 16), seed=1, max_facts_per_relation=30, overwrite=True)
    again = load_dataset(folder, "m16")
    assert (
        again["modified_test"].to_list()
        == load_benchmark("geo_mod", m=16, seed=1, max_facts_per_relation=30)["modified_test"].to_list()
    )
    assert again["modified_test"]["uuid"] != exported["modified_test"]["uuid"]


def test_cache_is_keyed_by_every_field(tmp_path):
    a = load_benchmark("geo_mod", m=8, seed=0, max_facts_per_relation=20)
    b = load_benchmark("geo_mod", m=8, seed=1, max_facts_per_relation=20)
    c = load_benchmark("geo_mod", m=8, seed=0, max_facts_per_relation=20, evidence_per_fact=1)
    assert a["modified_test"]["uuid"] != b["modified_test"]["uuid"]
    assert len(c["modified_train"]) == 8 < len(a["modified_train"])


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="m must be a positive number"):
        load_benchmark("geo_mod", m=0)
    with pytest.raises(ValueError, match="larger than the"):
        load_benchmark("geo_mod", m=10_000, max_facts_per_relation=10)
    with pytest.raises(ValueError, match="Unknown benchmark 'wiki_mod'"):
        load_benchmark("wiki_mod")
    with pytest.raises(ValueError, match="has no option evidence"):
        load_benchmark("geo_mod", evidence=2)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_benchmark("trex_mod", data_dir=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "relations.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="neither TREx/"):
        load_benchmark("trex_mod", data_dir=str(empty))
    broken = tmp_path / "broken"
    shutil.copytree(LAMA, broken)
    with open(broken / "TREx" / "P17.jsonl", "a") as handle:
        handle.write('{"uuid": "x", "sub_label": \n')
    with pytest.raises(ValueError, match=r"P17.jsonl, line 7: malformed JSON"):
        load_benchmark("trex_mod", data_dir=str(broken))
    (broken / "TREx" / "P17.jsonl").write_text('{"uuid": "x", "sub_label": "Oslo", "evidences": []}\n')
    with pytest.raises(ValueError, match=r"line 1: missing field\(s\) obj_label"):
        load_benchmark("trex_mod", data_dir=str(broken))
    shutil.copy(broken / "TREx" / "P36.jsonl", broken / "TREx" / "P99.jsonl")
    (broken / "TREx" / "P17.jsonl").unlink()
    with pytest.raises(ValueError, match="relation P99 has no template"):
        load_benchmark("trex_mod", data_dir=str(broken))


def test_relations_with_one_object_are_skipped(caplog):
    facts = benchmark_facts("trex_mod", LAMA)
    for f in facts:
        if f.relation == "P17":
            f.object = "France"
    chosen = modify_facts(facts, 3, 0, None)
    assert all(u.startswith("p36") for u in chosen)
    assert "cannot be modified, skipped: P17" in caplog.text


def test_filter_to_facts_the_model_knows(bert_tokenizer, real_bert_dir):
    from transformers import AutoModelForMaskedLM

    from hf_memedit.benchmarks import known_uuids
    from hf_memedit.evaluation.scoring import evaluate_facts

    model = AutoModelForMaskedLM.from_pretrained(real_bert_dir)
    facts = benchmark_facts("geo_mod", max_facts_per_relation=50)
    known = known_uuids(facts, model, bert_tokenizer)
    assert 0 < len(known) < len(facts)
    rows = [{"text": f.test_texts[0], "object": f.object} for f in facts if f.uuid in known]
    assert all(evaluate_facts(model, bert_tokenizer, rows).correct)
    dataset = load_benchmark("geo_mod", m=len(known), model=model, tokenizer=bert_tokenizer, max_facts_per_relation=50)
    assert sorted(dataset["modified_test"]["uuid"]) == sorted(known)
    with pytest.raises(ValueError, match="among eligible_uuids"):
        load_benchmark("geo_mod", m=len(known) + 1, model=model, tokenizer=bert_tokenizer, max_facts_per_relation=50)


def test_the_known_facts_are_kept_by_model_and_phrasings(bert_tokenizer, real_bert_dir, tmp_path, monkeypatch):
    """The filter's answer is cached by the model's weights and the encoded phrasings: read back without evaluating
    again, and evaluated again for other weights or other facts."""
    from transformers import AutoModelForMaskedLM

    import hf_memedit.benchmarks as benchmarks

    model = AutoModelForMaskedLM.from_pretrained(real_bert_dir)
    facts = benchmark_facts("geo_mod", max_facts_per_relation=20)
    calls = []
    evaluate = benchmarks.evaluate_facts
    monkeypatch.setattr(benchmarks, "evaluate_facts", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    first = benchmarks.known_uuids(facts, model, bert_tokenizer, cache_dir=str(tmp_path))
    assert benchmarks.known_uuids(facts, model, bert_tokenizer, cache_dir=str(tmp_path)) == first and len(calls) == 1
    assert benchmarks.known_uuids(facts[:10], model, bert_tokenizer, cache_dir=str(tmp_path)) == tuple(
        uuid for uuid in first if uuid in {f.uuid for f in facts[:10]}
    )
    assert len(calls) == 2
    with torch.no_grad():
        model.cls.predictions.decoder.weight.mul_(0.5)  # other weights: evaluated again
    benchmarks.known_uuids(facts, model, bert_tokenizer, cache_dir=str(tmp_path))
    assert len(calls) == 3 and len(list((tmp_path / "known").iterdir())) == 3


ZSRE = str(Path(__file__).parent / "fixtures" / "kilt_zsre")


def test_zsre_question_split_and_multi_token_answers():
    from hf_memedit.benchmarks.zsre import ZsreMod, ZsreModConfig, n_test_questions

    assert [n_test_questions(n) for n in (1, 2, 3, 4, 7)] == [0, 1, 1, 2, 2]
    facts = {f.uuid: f for f in ZsreMod.read_facts(ZsreModConfig(data_dir=ZSRE))}
    assert "q8" not in facts  # answer over 20 tokens
    assert (len(facts["q1"].train_texts), len(facts["q1"].test_texts)) == (1, 0)
    assert (len(facts["q3"].train_texts), len(facts["q3"].test_texts)) == (2, 1)
    assert (len(facts["q4"].train_texts), len(facts["q4"].test_texts)) == (3, 2)
    assert facts["q7"].relation == "field of work" and facts["q7"].subject == "Niels Bohr"
    assert all(t.endswith("? [Y]") for f in facts.values() for t in f.train_texts + f.test_texts)
    dataset = load_benchmark("zsre_mod", m=3, seed=0, data_dir=ZSRE)
    _check_modification(dataset, facts)
    assert "q1" not in dataset["modified_test"]["uuid"]  # a fact without test question cannot be modified
    assert "q1" in dataset["unmodified_train"]["uuid"] and "q1" not in dataset["unmodified_test"]["uuid"]
    shorter = {f.uuid for f in ZsreMod.read_facts(ZsreModConfig(data_dir=ZSRE, max_answer_tokens=1))}
    assert shorter == {"q1", "q2", "q3", "q4", "q5"}
    chosen = ZsreMod.read_facts(ZsreModConfig(data_dir=ZSRE, relations=("field of work",)))
    assert [f.uuid for f in chosen] == [u for u, f in facts.items() if f.relation == "field of work"]


def test_zsre_counts_tokens_with_a_tokenizer(real_bert_dir):
    from hf_memedit.benchmarks.zsre import ZsreMod, ZsreModConfig

    words = {f.uuid for f in ZsreMod.read_facts(ZsreModConfig(data_dir=ZSRE, max_answer_tokens=2))}
    pieces = {
        f.uuid for f in ZsreMod.read_facts(ZsreModConfig(data_dir=ZSRE, max_answer_tokens=2, tokenizer=real_bert_dir))
    }
    assert "q6" in words and "q6" not in pieces  # "radioactivity research" is 2 words but more word pieces


def test_zsre_bad_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "input": "no separator", "output": [], "meta": {}}\n')
    with pytest.raises(
        ValueError, match="bad.jsonl, line 1: input 'no separator' is not 'subject \\[SEP\\] relation'"
    ):
        load_benchmark("zsre_mod", m=1, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_benchmark("zsre_mod", m=1, data_dir=str(tmp_path / "missing"))


def test_kilt_file_is_downloaded_from_its_url():
    """With no data_dir the KILT file is fetched from data_url (here a file:// URL to the fixture)."""
    from hf_memedit.benchmarks.zsre import ZsreMod, ZsreModConfig

    url = (Path(ZSRE) / "structured_zeroshot-train-kilt.jsonl").as_uri()
    downloaded = ZsreMod.read_facts(ZsreModConfig(data_dir=None, data_url=url))
    assert downloaded == ZsreMod.read_facts(ZsreModConfig(data_dir=ZSRE))
    dataset = load_benchmark("zsre_mod", m=3, seed=0, data_dir=None, data_url=url)
    assert (
        dataset["modified_test"]["uuid"]
        == load_benchmark("zsre_mod", m=3, seed=0, data_dir=ZSRE)["modified_test"]["uuid"]
    )


def test_a_code_change_changes_the_cache_hash(tmp_path):
    import types

    from hf_memedit.benchmarks.common import source_hash

    module = types.SimpleNamespace(__file__=str(tmp_path / "builder.py"))
    (tmp_path / "builder.py").write_text("A = 1\n")
    before = source_hash(module)
    assert source_hash(module) == before
    (tmp_path / "builder.py").write_text("A = 2\n")
    assert source_hash(module) != before


def _prompt_checks(dataset):
    """One fact, one side: a prompt's facts are modified together or not at all, a new object is never a true
    object of its prompt (a fact read backwards included), and no text is trained or scored with two objects."""
    from hf_memedit.benchmarks.relations import INVERSE

    modified = list(dataset["modified_test"])
    unmodified = {
        (r["subject"], r["relation"]): r["object"]
        for split in ("unmodified_train", "unmodified_test")
        for r in dataset[split]
    }
    everything = {(r["subject"], r["relation"], r["original_object"]) for split in SPLITS for r in dataset[split]}
    assert not {(r["subject"], r["relation"]) for r in modified} & set(unmodified)
    for r in modified:
        true = {o for s, q, o in everything if (s, q) == (r["subject"], r["relation"])}
        true |= {s for s, q, o in everything if o == r["subject"] and q == INVERSE.get(r["relation"])}
        assert r["object"] not in true, r
    for modified_split, other in (("modified_test", "unmodified_test"), ("modified_train", "unmodified_train")):
        assert not set(dataset[modified_split]["text"]) & set(dataset[other]["text"])
    prompts = Counter((r["subject"], r["relation"]) for r in modified)
    news = {(r["subject"], r["relation"], r["object"]) for r in modified}
    assert len(news) == len(modified)  # a prompt's new objects are distinct
    return prompts


@pytest.mark.shared
def test_trex_facts_sharing_a_prompt_travel_together():
    dataset = load_benchmark("trex_mod", m=512, seed=0, data_dir=TREX)
    prompts = _prompt_checks(dataset)
    assert len(set(dataset["modified_test"]["uuid"])) == 512 and max(prompts.values()) > 1  # some prompts hold several


def test_geo_borders_are_modified_a_country_at_a_time():
    """Every country borders several: its P47 facts share one prompt, so they are modified together (c2_conflict:
    all 64 modified prompts were also scored with another object)."""
    dataset = load_benchmark("geo_mod", m=64, seed=0, relations=["P47"], object_last=True)
    prompts = _prompt_checks(dataset)
    assert len(set(dataset["modified_test"]["uuid"])) == 64 and max(prompts.values()) > 1


def test_fact_groups_join_a_prompt_and_a_shared_phrasing():
    from hf_memedit.benchmarks.common import Fact, fact_groups

    facts = [
        Fact("a", "P47", "Peru", "Chile", ["Peru borders [Y]."], ["Peru shares a border with [Y]."]),
        Fact("b", "P47", "Peru", "Bolivia", ["Peru touches [Y]."], ["Peru shares a border with [Y]."]),
        Fact("c", "P17", "Lima", "Peru", ["Lima is located in [Y]."], ["Lima is in [Y]."]),
        Fact("d", "P131", "Lima", "Lima Region", ["Lima lies in [Y]."], ["Lima is located in [Y]."]),
        Fact("e", "P47", "Chile", "Argentina", ["Chile borders [Y]."], ["Chile shares a border with [Y]."]),
        Fact("f", "P47", "Bolivia", "Brazil", ["Bolivia borders [Y]."], ["Bolivia shares a border with [Y]."]),
        Fact("g", "P17", "Quito", "Ecuador", ["Quito is located in [Y]."], ["Quito is in [Y]."]),
        Fact("h", "P131", "Cusco", "Cusco Region", ["Cusco lies in [Y]."], ["Cusco is located in [Y]."]),
    ]
    assert fact_groups(facts) == [[0, 1], [2, 3], [4], [5], [6], [7]]
    # Peru's two borders are modified together, to two objects that are neither of its true ones.
    assert sorted(modify_facts(facts, 2, 0, ("a", "b")).items()) in (
        [("a", "Argentina"), ("b", "Brazil")],
        [("a", "Brazil"), ("b", "Argentina")],
    )
    with pytest.raises(ValueError, match="larger than the 2 facts that can be modified"):
        modify_facts(facts, 3, 0, ("a", "b", "c"))  # c cannot go without d
    with pytest.raises(ValueError, match="m=1 cannot be made of whole groups of facts sharing a prompt"):
        modify_facts(facts, 1, 0, ("a", "b"))


def test_zsre_near_duplicate_questions_are_one_question(tmp_path):
    """ "...S5 ?" and "...S5?" differ by a space: were both kept, one could be trained and the other tested."""
    from hf_memedit.benchmarks.zsre import ZsreMod, ZsreModConfig

    record = {
        "id": "q",
        "input": "S5 [SEP] capital",
        "output": [{"answer": "O"}],
        "meta": {
            "template_questions": [
                "What is the capital of S5?",
                "What is the capital of S5 ?",
                "what is the capital of  S5?",
                "Which city is the capital of S5?",
            ]
        },
    }
    (tmp_path / "z.jsonl").write_text(json.dumps(record) + "\n")
    (fact,) = ZsreMod.read_facts(ZsreModConfig(data_dir=str(tmp_path)))
    assert sorted(fact.train_texts + fact.test_texts) == [
        "What is the capital of S5 ? [Y]",
        "Which city is the capital of S5? [Y]",
    ]
    assert len(fact.test_texts) == 1  # two distinct questions: one to test, as the paper splits them


def _trex_with_an_unknown_object(folder):
    """A T-REx layout whose relation has an object the BERT vocabulary maps to [UNK] (c11_drop's)."""
    (folder / "facts").mkdir(parents=True)
    (folder / "paraphrases").mkdir()
    (folder / "relations.jsonl").write_text(json.dumps({"relation": "P1", "template": "[X] likes [Y] ."}) + "\n")
    (folder / "facts" / "P1.jsonl").write_text(
        "".join(
            json.dumps(
                {"sub_label": f"person{i}", "obj_label": ["apples", "pears", "\U0001f99c"][i % 3], "uuid": f"p{i}"}
            )
            + "\n"
            for i in range(20)
        )
    )
    (folder / "paraphrases" / "P1.jsonl").write_text(json.dumps({"pattern": "[X] is fond of [Y] ."}) + "\n")
    return str(folder)


def test_m_facts_are_drawn_among_those_the_tokenizer_encodes(tmp_path, bert_tokenizer):
    """Encodability is checked before drawing: the facts with an object BERT cannot encode are never modified nor
    drawn as a new object, so m = 8 gives 8 facts (c11_drop found 6); an m beyond what encodes is an error."""
    from hf_memedit.experiments import JobConfig
    from hf_memedit.experiments.loading import prepare_benchmark

    from .helpers import tiny_bert

    data = _trex_with_an_unknown_object(tmp_path / "trex")
    model = tiny_bert(bert_tokenizer.vocab_size)
    job = JobConfig(model_name_or_path="tiny", benchmark="trex_mod", data_dir=data, m=8)
    splits = prepare_benchmark(job, model, bert_tokenizer)
    assert len(set(splits["modified_test"]["uuid"])) == 8 == len(splits["modified_test"])
    assert set(splits["modified_train"]["uuid"]) == set(splits["modified_test"]["uuid"])
    assert "\U0001f99c" not in set(splits["modified_test"]["object"]) | set(splits["modified_test"]["original_object"])
    assert "\U0001f99c" not in set(splits["unmodified_test"]["object"])  # unencodable facts are not scored either
    with pytest.raises(ValueError, match="m=15 is larger than the 14 facts that can be modified"):
        prepare_benchmark(
            JobConfig(model_name_or_path="tiny", benchmark="trex_mod", data_dir=data, m=15), model, bert_tokenizer
        )


def test_a_causal_lm_gets_m_facts_each_with_a_training_phrasing(bpe_tokenizer):
    """Without object_last, some paraphrases put the object first, which a causal LM without a BOS token cannot
    predict: a fact is modified only with a training phrasing it can use, and every test phrasing."""
    from hf_memedit.experiments import JobConfig
    from hf_memedit.experiments.loading import prepare_benchmark

    from .helpers import TINY

    model = TINY["llama"](1, vocab=len(bpe_tokenizer))
    job = JobConfig(
        model_name_or_path="tiny",
        benchmark="geo_mod",
        m=24,
        benchmark_options={"relations": ["P36", "P47"], "max_facts_per_relation": 40, "evidence_per_fact": 1},
    )
    splits = prepare_benchmark(job, model, bpe_tokenizer)
    raw = load_benchmark("geo_mod", m=24, relations=["P36", "P47"], max_facts_per_relation=40, evidence_per_fact=1)
    assert any(text.startswith("[Y]") for text in raw["unmodified_train"]["text"])  # phrasings a causal LM cannot use
    assert not any(
        text.startswith("[Y]") for split in ("modified_train", "unmodified_train") for text in splits[split]["text"]
    )
    tested, trained = set(splits["modified_test"]["uuid"]), set(splits["modified_train"]["uuid"])
    assert len(tested) == 24 and trained == tested


@pytest.mark.shared
def test_per_relation_draws_each_relation_its_share_where_a_uniform_draw_falls_in_one():
    """The facts a model knows are mostly of one relation (SmolLM2: 26 of 32 known T-REx facts were native
    languages): a uniform draw among them leaves held-out-relation folds nearly empty; `per_relation` deals the
    draw relation by relation, and the uniform draw is what it was."""
    relations = ["P36", "P37", "P103", "P17"]
    facts = benchmark_facts("trex_mod", TREX, relations=relations)
    by_relation: dict[str, list] = {}
    for fact in facts:
        if fact.train_texts and fact.test_texts:
            by_relation.setdefault(fact.relation, []).append(fact.uuid)
    eligible = tuple(by_relation["P103"][:200] + [u for r in ("P36", "P37", "P17") for u in by_relation[r][:12]])
    relation_of = {f.uuid: f.relation for f in facts}

    def counts(chosen):
        return Counter(relation_of[u] for u in chosen)

    uniform = modify_facts(facts, 32, 0, eligible)
    assert counts(uniform)["P103"] > 16  # most of the eligible facts, most of the draw
    assert modify_facts(facts, 32, 0, eligible, per_relation=False) == uniform
    dealt = modify_facts(facts, 32, 0, eligible, per_relation=True)
    assert len(dealt) == 32 and set(dealt) <= set(eligible)
    assert sorted(counts(dealt).values()) == [8, 8, 8, 8]  # every relation its share (groups of one here)
    assert modify_facts(facts, 32, 0, eligible, per_relation=True) == dealt  # the same seed, the same draw
    # A relation with fewer facts than its share gives what it has; the others make up the rest.
    eligible = tuple(by_relation["P103"][:200] + by_relation["P36"][:3] + by_relation["P37"][:30])
    dealt = counts(modify_facts(facts, 32, 1, eligible, per_relation=True))
    assert dealt["P36"] == 3 and abs(dealt["P37"] - dealt["P103"]) <= 1 and sum(dealt.values()) == 32
    # The builder option reaches the draw and keys the cache.
    dataset = load_benchmark("trex_mod", m=8, seed=0, data_dir=TREX, relations=relations, per_relation=True)
    assert sorted(Counter(dataset["modified_test"]["relation"]).values()) == [2, 2, 2, 2]
