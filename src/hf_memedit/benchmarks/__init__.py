"""Modified-facts benchmarks as `datasets` builders, one call to load them, and a parquet exporter.

`datasets` ≥ 4 runs no loading scripts, so `load_dataset("memedit/trex_mod", m=128)` cannot
exist. `load_benchmark("trex_mod", m=128)` is the one call; `export_benchmark` writes a folder
of parquet files with `configs:` (m32, m128, ...) that `load_dataset(folder_or_repo, "m128")`
reads, locally or as a Hub dataset repo.

Splits: modified_train, modified_test, unmodified_train, unmodified_test (see `common`).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Sequence

import datasets
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import model_kind
from ..caching import cached_json, tokenizer_hash, weights_hash
from ..collators import FactEncoder, filter_encodable
from ..evaluation.scoring import evaluate_facts
from ..files import atomic_directory, check_target, file_sha256
from . import geo, trex, zsre
from .common import SPLITS, Fact, ModBenchmarkBuilder, data_fingerprint, source_hash
from .geo import GeoMod, GeoModConfig
from .trex import TrexMod, TrexModConfig
from .zsre import ZsreMod, ZsreModConfig


BUILDERS: dict[str, type[ModBenchmarkBuilder]] = {"trex_mod": TrexMod, "zsre_mod": ZsreMod, "geo_mod": GeoMod}
_SOURCES = {"trex_mod": (trex,), "zsre_mod": (zsre,), "geo_mod": (trex, geo)}  # common.py is always hashed
_BASE_FIELDS = {f.name for f in dataclasses.fields(datasets.BuilderConfig)} - {"data_dir"}


def _config_fields(name: str, m: int, seed: int, data_dir: str | None, options: dict) -> dict:
    if name not in BUILDERS:
        raise ValueError(f"Unknown benchmark {name!r}: choose one of {', '.join(sorted(BUILDERS))}.")
    config_class = BUILDERS[name].BUILDER_CONFIG_CLASS
    fields = {f.name: f.default for f in dataclasses.fields(config_class) if f.name not in _BASE_FIELDS}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(fields))}.")
    fields.update(options, m=m, seed=seed, data_dir=os.path.abspath(data_dir) if data_dir else None)
    for key in ("relations", "locality_relations", "eligible_uuids", "excluded_objects"):
        if fields.get(key) is not None:
            fields[key] = tuple(sorted(fields[key]))
    return fields


def benchmark_facts(name: str, data_dir: str | None = None, seed: int = 0, **options) -> list[Fact]:
    """Every fact of a benchmark before modification (for filtering by what a model knows, and for FT). `seed`
    is the benchmark's: it picks each fact's phrasings where there are more than it keeps."""
    fields = _config_fields(name, 1, seed, data_dir, options)
    builder = BUILDERS[name]
    return builder.read_facts(builder.BUILDER_CONFIG_CLASS(**fields))


def known_uuids(
    facts: Sequence[Fact],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 64,
    cache_dir: str | None = None,
) -> tuple[str, ...]:
    """The uuids of the facts `model` already predicts on every test phrasing (the authors' filter).

    The same model (weights, dtype, device) and tokenizer on the same phrasings give the same answer: it is kept in
    the cache (`caching.cached_json`, default HF_HOME/hf_memedit) and read back, so a new run of the same job does not
    evaluate the benchmark again."""
    rows = [{"uuid": f.uuid, "text": text, "object": f.object} for f in facts for text in f.test_texts]
    kind = model_kind(model)

    def evaluate() -> list[str]:
        encodable, _ = filter_encodable(rows, FactEncoder(tokenizer, kind))
        correct = evaluate_facts(model, tokenizer, encodable, batch_size=batch_size, show_progress=True).correct
        right = Counter(row["uuid"] for row, ok in zip(encodable, correct) if ok)
        return sorted(uuid for uuid, n in Counter(row["uuid"] for row in rows).items() if right[uuid] == n)

    key = {
        "model": weights_hash(model),
        "tokenizer": tokenizer_hash(tokenizer),
        "kind": kind.value,
        "device": next(model.parameters()).device.type,
        "rows": [[row["uuid"], row["text"], row["object"]] for row in rows],
    }
    return tuple(cached_json("known", key, evaluate, cache_dir))


def encodable_choices(facts: Sequence[Fact], encoder: FactEncoder) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the uuids of the facts that may be modified, the objects never to draw as new ones) for this encoder.

    A fact may be modified when every test phrasing and at least one training phrasing encode with its own object
    (the phrasings that do not are dropped from the splits). An object is excluded when it does not encode in its
    relation's first phrasing that does: what fails is the object (a token the vocabulary lacks) or the phrasing
    (the object first, for a causal LM without BOS), and the phrasings have been checked with the facts' objects.
    """
    usable, probe = [], {}  # probe: relation -> a test phrasing that encodes with its own fact's object
    for fact in facts:
        if fact.test_texts and all(encoder.problem(text, fact.object) is None for text in fact.test_texts):
            probe.setdefault(fact.relation, fact.test_texts[0])
            if any(encoder.problem(text, fact.object) is None for text in fact.train_texts):
                usable.append(fact.uuid)
    excluded = {
        f.object for f in facts if f.relation in probe and encoder.problem(probe[f.relation], f.object) is not None
    }
    return tuple(usable), tuple(sorted(excluded))


def load_benchmark(
    name: str,
    m: int = 32,
    seed: int = 0,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    encoder: FactEncoder | None = None,
    **options,
) -> datasets.DatasetDict:
    """Build (or reuse from the cache) a benchmark with exactly m modified facts.

    With `model` and `tokenizer`, only facts the model already predicts may be modified. With `encoder`, only facts
    whose phrasings it encodes (`encodable_choices`), with new objects it encodes: checked before drawing, so m
    facts are m facts a model can be trained and tested on. The cache is keyed by every config field (`data_dir`
    as an absolute path), a hash of the builders' code and a hash of the files in `data_dir`.
    """
    if model is not None and tokenizer is None:
        raise ValueError("Filtering by a model's known facts needs its tokenizer too.")
    if model is not None or encoder is not None:
        facts = benchmark_facts(name, data_dir, seed, **options)
        eligible = set(options["eligible_uuids"]) if options.get("eligible_uuids") is not None else None
        if encoder is not None:
            usable, excluded = encodable_choices(facts, encoder)
            eligible = set(usable) if eligible is None else eligible & set(usable)
            options["excluded_objects"] = tuple(sorted(set(options.get("excluded_objects") or ()) | set(excluded)))
        if model is not None:
            known = known_uuids([f for f in facts if eligible is None or f.uuid in eligible], model, tokenizer)
            eligible = set(known)
        options["eligible_uuids"] = tuple(sorted(eligible))
    fields = _config_fields(name, m, seed, data_dir, options)
    digest = source_hash(*_SOURCES[name]) + data_fingerprint(fields["data_dir"])  # code and data both key the cache
    builder = BUILDERS[name](cache_dir=cache_dir, hash=digest, **fields)
    builder.download_and_prepare()
    return builder.as_dataset()


def export_benchmark(
    name: str,
    folder: str,
    ms: Sequence[int] = (32, 128, 512),
    seed: int = 0,
    data_dir: str | None = None,
    overwrite: bool = False,
    **options,
) -> str:
    """Write `folder/m{m}/{split}-<content hash>.parquet` and a README whose `configs:` lets
    `load_dataset(folder, "m128")` read them; the folder pushes to the Hub as a dataset repo.

    `folder` must be new or empty; `overwrite=True` replaces an earlier export, never another folder.
    """
    target = check_target(folder, [data_dir] if data_dir else [], _is_export, "benchmark export", overwrite)
    configs = []
    with atomic_directory(target) as staging:
        for m in ms:
            dataset = load_benchmark(name, m=m, seed=seed, data_dir=data_dir, **options)
            os.makedirs(os.path.join(staging, f"m{m}"), exist_ok=True)
            files = [
                {"split": split, "path": _write_parquet(dataset[split], staging, f"m{m}/{split}")} for split in SPLITS
            ]
            configs.append({"config_name": f"m{m}", "data_files": files})
        card = yaml.safe_dump({"configs": configs, "tags": ["knowledge-editing", "hf_memedit"]}, sort_keys=False)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(
                f"---\n{card}---\n\n# {name}\n\nModified-facts benchmark exported by hf_memedit "
                f"(seed {seed}, options {options or 'default'}). Splits: {', '.join(SPLITS)}.\n"
            )
    return target


def _write_parquet(split: datasets.Dataset, folder: str, stem: str) -> str:
    """Write `stem-<content hash>.parquet` under `folder`; return its relative path. `datasets` caches a local
    folder's configs by their file names, so a re-export with other facts must change the names, or
    `load_dataset` would return the old facts from its cache."""
    staged = os.path.join(folder, f"{stem}.parquet")
    split.to_parquet(staged)
    path = f"{stem}-{file_sha256(staged)[:16]}.parquet"
    os.replace(staged, os.path.join(folder, path))
    return path


def _is_export(folder: str) -> bool:
    """Whether `folder` holds an `export_benchmark` folder (its README's front matter is ours)."""
    readme = os.path.join(folder, "README.md")
    if not os.path.isfile(readme):
        return False
    with open(readme, encoding="utf-8", errors="replace") as handle:
        parts = handle.read().split("---", 2)
    try:
        card = yaml.safe_load(parts[1]) if len(parts) == 3 and not parts[0].strip() else None
    except yaml.YAMLError:
        return False
    return isinstance(card, dict) and "hf_memedit" in (card.get("tags") or []) and "configs" in card


__all__ = [
    "BUILDERS",
    "GeoMod",
    "GeoModConfig",
    "SPLITS",
    "TrexMod",
    "TrexModConfig",
    "ZsreMod",
    "ZsreModConfig",
    "benchmark_facts",
    "encodable_choices",
    "export_benchmark",
    "known_uuids",
    "load_benchmark",
]
