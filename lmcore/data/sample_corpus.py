"""Built-in synthetic movie-review corpus: the offline default data and the test fixture.

The text is produced by a small template grammar, so it needs no network and no data file,
is byte-identical everywhere (seeded ``random.Random`` only, no ``hash()``), and is repetitive
enough that a small LSTM's perplexity drops visibly within a few hundred steps.
"""

from __future__ import annotations

import random
import re
import zlib

# Part of cache fingerprints: bump whenever any list, template or draw order below changes.
SAMPLE_CORPUS_VERSION = 1

_DEFAULT_N = {"train": 2000, "test": 200}


def _w(s: str) -> list[str]:
    return s.split("|")


_WORDS: dict[str, list[str]] = {
    "T": _w(
        "The Last Harbor|Midnight Express|Amélie|Silent Rivers|The Glass House|Red Canyon"
        "|Café Lumière|The Long Goodbye|Northern Lights|Broken Promises|The Iron Road"
        "|Summer of Zoë|Dark Waters|The Paper Moon|City of Ashes|Blue Horizon"
    ),
    "A": _w(
        "Tom Hanks|Meryl Streep|John Carter|Emma Stone|José Ortega|Zoë Brandt|Mark Rivers"
        "|Anna Kowalski|Daniel Price|Sarah Miller|Michael Grant|Laura Chen"
    ),
    "D": _w("Steven Hale|François Leclerc|Ridley Moore|Kathryn Bell|Peter Novak|Nora Ephraim"),
    "G": _w(
        "comedy|thriller|horror film|drama|western|romance|documentary|musical"
        "|sci-fi movie|war film|crime story|family film"
    ),
    "N": _w("film|movie|picture|film|movie"),
    "P": _w(
        "a retired detective who must solve one last case"
        "|two sisters who inherit a haunted house in the country"
        "|a young singer who moves to the city to chase her dream"
        "|a soldier trying to get home after the war"
        "|a group of friends stuck in a small town for one night"
        "|a naïve teacher who falls in love with the wrong man"
        "|a family that runs a little café by the sea"
        "|a scientist who discovers a strange signal from space"
        "|an old boxer who gets one more chance in the ring"
        "|a lonely girl who finds a talking dog"
    ),
    "X": _w(
        "acting|script|direction|cinematography|soundtrack|dialogue|pacing|ending|plot"
        "|story|score|editing|cast|visual design|camera work|writing|humor|music"
    ),
    "K": _w("really|truly|very|quite|incredibly|so|rather|genuinely|absolutely|pretty"),
    "R": _w(
        "the hero|the villain|the mother|the detective|the young boy|the old man"
        "|the lead|the sidekick|the captain|the stranger"
    ),
    "W": _w(
        "last night|on a rainy Sunday|with my wife|with friends|on television"
        "|at the cinema|on a plane|twice"
    ),
    "+": _w(
        "great|superb|wonderful|brilliant|excellent|beautiful|moving|funny|charming"
        "|touching|stunning|perfect|clever|gripping|fantastic|delightful|powerful|fresh"
    ),
    "-": _w(
        "awful|terrible|boring|dull|weak|poor|stupid|bad|lame|predictable|silly|clichéd"
        "|painful|flat|messy|pointless|forgettable|horrible"
    ),
    "V+": _w("loved|enjoyed|adored|admired|liked"),
    "V-": _w("hated|disliked|regretted|endured|sat through"),
}
# Drawn in place of a +/- adjective now and then, so a few words stay below a vocab cut-off.
_RARE = _w(
    "luminous|ponderous|turgid|elegiac|mawkish|sublime|lugubrious|effervescent|leaden"
    "|trenchant|insipid|exquisite|plodding|rapturous|vapid|sprightly|torpid|lyrical"
    "|saccharine|incandescent|soporific|bracing|treacly|ebullient|tawdry|resplendent"
    "|hackneyed|wistful|ramshackle|beguiling|stolid|piquant|garish|mellifluous|fusty"
)

_OPEN = {
    1: _w(
        "I watched {T} {W} and it was {K} {J}|{T} is a {J} {G} from director {D}"
        "|what a {J} {N} this is|great {N}, the {X} was {J}|I {V} every minute of {T}"
        "|this {N} tells the story of {P}|{T} follows {P}, and it is {K} {J}"
        "|having heard a lot about {T}, I finally saw it {W}"
    ),
    0: _w(
        "I watched {T} {W} and it was {K} {J}|{T} is a {J} {G} from director {D}"
        "|what a waste of time this {N} is|I really wanted to like {T}, but I could not"
        "|this {N} tells the story of {P}|{T} follows {P}, and it is {K} {J}"
        "|bad {N}, the {X} was {J}|I {V} {T} {W}, and I wish I had not"
    ),
}
_BODY = {
    1: _w(
        "{A} gives a {J} performance as {R}|the {X} is {K} {J}"
        "|{D} directs with a {J} touch|the {X} was {J} and the {X} was {K} {J}"
        "|{A} and {A} have {J} chemistry|every scene with {R} is {J}"
        "|I {V} the {X}, it is {K} {J}|despite the {O} {X}, the {X} is {K} {J}"
        "|the way {D} handles the {X} is {J}|{A} is {K} {J} as {R}"
    ),
    0: _w(
        "{A} gives a {J} performance as {R}|the {X} is {K} {J}"
        "|{D} directs with a {J} touch|the {X} was {J} and the {X} was {K} {J}"
        "|{A} seems bored throughout|every scene with {R} is {J}"
        "|{A} tries hard, but the {X} is {J}|despite the {O} {X}, the {X} is {K} {J}"
        "|I {V} the {X}, it is {K} {J}|nothing about the {X} makes sense"
    ),
}
_CLOSE = {
    1: _w(
        "{S}/10, highly recommended|go see it, you will not regret it"
        "|one of the best {N}s of the year|I would happily watch it again"
        "|a {J} {G} that everyone should see"
    ),
    0: _w(
        "{S}/10, avoid it|save your money and skip this one|one of the worst {N}s of the year"
        "|I want those two hours of my life back|a {J} {G} that nobody needs to see"
    ),
}
_JOIN = _w(", and|, while|; also,|, and honestly|, although|, and on top of that")
_SLOT = re.compile(r"\{(\w)\}")
_AN = re.compile(r"\b([Aa]) ([aeiouAEIOU])")


def _fill(rng: random.Random, template: str, label: int) -> str:
    def pick(m: re.Match[str]) -> str:
        key = m.group(1)
        if key in "JO":  # O is the opposite sentiment, for "despite a weak X, ..." realism
            pos = (key == "J") == (label == 1)
            if rng.random() < 0.03:
                return rng.choice(_RARE)
            return rng.choice(_WORDS["+" if pos else "-"])
        if key == "V":
            return rng.choice(_WORDS["V+" if label else "V-"])
        if key == "S":
            return str(rng.randint(7, 10) if label else rng.randint(1, 4))
        return rng.choice(_WORDS[key])

    return _SLOT.sub(pick, template)


def _sentence(rng: random.Random, pool: list[str], label: int, clauses: int) -> str:
    text = _fill(rng, rng.choice(pool), label)
    for _ in range(clauses - 1):
        body = _fill(rng, rng.choice(_BODY[label]), label)
        text += f"{rng.choice(_JOIN)} {body}"
    text = _AN.sub(r"\1n \2", text)  # "a excellent" -> "an excellent"
    end = "!" if rng.random() < 0.12 else "."
    return text[0].upper() + text[1:] + end


def _review(rng: random.Random) -> dict:
    label = rng.randint(0, 1)
    long = rng.random() < 0.03  # a few reviews over 256 tokens, to exercise truncation
    n_sent = 6 if long else rng.choice((1, 2, 2, 3, 3, 4, 4, 5, 6))
    sents: list[str] = []
    for i in range(n_sent):
        clauses = rng.randint(4, 6) if long else rng.choice((1, 1, 1, 2, 2, 3))
        if i == 0:
            # Short reviews get a compound opener: enough sentiment and variety to avoid repeats.
            pool, clauses = _OPEN[label], max(clauses, 2) if n_sent <= 2 else clauses
        elif i == n_sent - 1 and rng.random() < 0.7:
            pool, clauses = _CLOSE[label], 1
        else:
            pool = _BODY[label]
        sents.append(_sentence(rng, pool, label, clauses))
    while sum(len(s.split()) for s in sents) < 10:
        sents.append(_sentence(rng, _BODY[label], label, 1))
    # IMDB-style paragraph breaks glued to the neighbouring words, as in the real dataset.
    text = sents[0]
    for s in sents[1:]:
        text += ("<br /><br />" if rng.random() < 0.15 else " ") + s
    return {"text": text, "label": label}


def sample_reviews(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """Deterministic list of {"text": str, "label": int} for split "train" (default n=2000) or
    "test" (default n=200). A smaller n gives a prefix of the larger list."""
    if split not in _DEFAULT_N:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_DEFAULT_N)}")
    if n is None:
        n = _DEFAULT_N[split]
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # crc32, not hash(): str hashing is salted per process and would break reproducibility.
    rng = random.Random(zlib.crc32(f"lmcore-sample:{seed}:{split}".encode()))
    return [_review(rng) for _ in range(n)]
