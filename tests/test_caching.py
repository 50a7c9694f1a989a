"""θ0's answers kept by content hash (`hf_memedit.caching`): read back when the model, tokenizer and inputs are the
same, computed again when any of them changed."""

import json
import os

import pytest
import torch

from hf_memedit.caching import cached_json, tokenizer_hash, weights_hash

from .helpers import TINY


def test_cached_json_computes_once_and_again_for_another_key_or_an_unreadable_file(tmp_path):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"answer": value}

        return run

    assert cached_json("known", {"a": 1}, compute(1), str(tmp_path)) == {"answer": 1}
    assert cached_json("known", {"a": 1}, compute(2), str(tmp_path)) == {"answer": 1} and calls == [1]
    assert cached_json("known", {"a": 2}, compute(3), str(tmp_path)) == {"answer": 3} and calls == [1, 3]
    (written,) = [p for p in (tmp_path / "known").iterdir() if json.loads(p.read_text())["key"] == {"a": 1}]
    written.write_text("{not json")
    assert cached_json("known", {"a": 1}, compute(4), str(tmp_path)) == {"answer": 4} and calls == [1, 3, 4]


def test_the_weights_hash_follows_every_change_of_the_weights():
    """Kept on the model between calls, the hash is the bytes' hash still after an in-place write, a replaced tensor
    and a dtype change, each of which changes it."""
    torch.manual_seed(0)
    model = TINY["llama"](2)
    twin = TINY["llama"](2)
    twin.load_state_dict(model.state_dict())
    first = weights_hash(model)
    assert weights_hash(model) == first == weights_hash(twin)
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(1e-3)  # in place
    changed = weights_hash(model)
    assert changed != first
    with torch.no_grad():
        weight.sub_(1e-3).copy_(twin.model.layers[0].mlp.down_proj.weight)  # back to the twin's bytes
    assert weights_hash(model) == first
    model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(weight.detach() * 2)  # replaced
    assert weights_hash(model) not in (first, changed)
    assert weights_hash(twin.double()) != first


def test_the_tokenizer_hash_tells_vocabularies_apart(bpe_tokenizer, bert_tokenizer):
    assert tokenizer_hash(bpe_tokenizer) == tokenizer_hash(bpe_tokenizer)
    assert tokenizer_hash(bpe_tokenizer) != tokenizer_hash(bert_tokenizer)


@pytest.mark.usefixtures("isolated_hf_home")
def test_theta0s_greedy_answers_are_generated_once_for_the_same_model_and_prompts(monkeypatch, bpe_tokenizer):
    import hf_memedit.experiments.context as context_module
    from hf_memedit import EditConfig
    from hf_memedit.experiments import JobConfig

    torch.manual_seed(0)
    model = TINY["llama"](2, vocab=len(bpe_tokenizer))
    calls = []
    generate = context_module.generate_splits
    monkeypatch.setattr(context_module, "generate_splits", lambda *a, **k: calls.append(1) or generate(*a, **k))
    options = {"relations": ["P36"], "max_facts_per_relation": 30}
    job = JobConfig(model_name_or_path="tiny", benchmark="geo_mod", benchmark_options=options, m=2, modify_known=False)
    args = EditConfig(output_dir="unused", generation_eval=True, per_device_eval_batch_size=8)
    first = context_module.Theta0Context(job, args, model, bpe_tokenizer)
    answers = first.generated_before("run", first.splits)
    again = context_module.Theta0Context(job, args, model, bpe_tokenizer)  # a new run of the same job
    assert again.generated_before("run", again.splits) == answers and len(calls) == 1
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    other = context_module.Theta0Context(job, args, model, bpe_tokenizer)
    other.generated_before("run", other.splits)
    assert len(calls) == 2


@pytest.mark.usefixtures("isolated_hf_home")
def test_a_gguf_checkpoint_is_read_once_then_from_its_safetensors_copy(smollm2_job, monkeypatch):
    """The first load de-quantises the GGUF file and keeps a safetensors copy; the next reads the copy (no GGUF
    parsing at all) and gets the same weights, config and tokenizer; a copy cut short is made again."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from hf_memedit.experiments.loading import GGUF_COPY_DONE, _source, load_model_and_tokenizer

    first, tokenizer = load_model_and_tokenizer(smollm2_job)
    copy, common = _source(smollm2_job)
    assert os.path.isfile(os.path.join(copy, GGUF_COPY_DONE)) and "gguf_file" not in common

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    with monkeypatch.context() as patched:
        patched.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
        again, tokenizer_again = load_model_and_tokenizer(smollm2_job)
    assert weights_hash(again) == weights_hash(first) and type(again) is type(first)
    assert {k: v for k, v in again.config.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in first.config.to_dict().items() if k != "_name_or_path"
    }
    texts = ["The capital of Ivory Coast is Yamoussoukro.", "Ünïcode, digits 1234 and\nnewlines"]
    assert tokenizer_again(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert tokenizer_again.special_tokens_map == tokenizer.special_tokens_map
    chat = [{"role": "user", "content": "Where is Paris?"}]
    assert tokenizer_again.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(
        chat, tokenize=False
    )

    os.remove(os.path.join(copy, GGUF_COPY_DONE))  # cut short: the GGUF file is read again
    assert "gguf_file" in _source(smollm2_job)[1]


def test_a_gguf_copy_another_job_finished_meanwhile_is_kept_for_its_readers(tmp_path, bpe_tokenizer, monkeypatch):
    """Two jobs may make the same copy at once (compare lanes, test workers): the one that finds a finished copy when
    its own is written keeps that copy (its reader may be loading it) and drops its own; one cut short is replaced."""
    from hf_memedit.experiments.loading import GGUF_COPY_DONE, _save_gguf_copy

    model, copy = TINY["llama"](1, vocab=len(bpe_tokenizer)), tmp_path / "copy"
    save = type(model).save_pretrained

    def other_job_finishes_first(self, folder, **kwargs):
        save(self, folder, **kwargs)
        if not (copy / GGUF_COPY_DONE).exists():
            save(self, copy, **kwargs)
            (copy / GGUF_COPY_DONE).write_text('{"made_from": "the other job"}')

    monkeypatch.setattr(type(model), "save_pretrained", other_job_finishes_first)
    _save_gguf_copy(model, bpe_tokenizer, str(copy))
    assert json.loads((copy / GGUF_COPY_DONE).read_text()) == {"made_from": "the other job"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # its own partial copy is gone
    monkeypatch.setattr(type(model), "save_pretrained", save)
    (copy / GGUF_COPY_DONE).unlink()  # cut short: replaced by a whole one
    _save_gguf_copy(model, bpe_tokenizer, str(copy))
    assert json.loads((copy / GGUF_COPY_DONE).read_text())["made_from"] != "the other job"
    assert (copy / "tokenizer.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
