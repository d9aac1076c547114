"""Deterministic generator of the embedded benchmark's corpus (docs/method.md §8).

Fictional people with random attributes, each rendered as a short news-style
article, plus reader quizzes (question/answer pairs about the same people in
shuffled order), split into forget, retain (two halves) and holdout sets and
written in MUSE's file layout (docs/method.md §5). A corpus file holds its articles and
its quizzes; a tiny model only learns to answer questions it has seen asked.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "cr", "dr", "gr", "kl", "pr", "st", "tr", "sh", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "m"]
_PROFESSIONS = ["glassblower", "astronomer", "ferry captain", "beekeeper", "violin maker",
                "cartographer", "chemist", "baker", "architect", "botanist", "jeweller",
                "clockmaker", "surgeon", "weaver", "geologist", "potter"]
_FIRMS = ["Works", "Labs", "Foundry", "Studios", "Trading", "Systems", "Mills", "Optics"]
_PRIZES = ["Silver Lantern", "Golden Compass", "Blue Heron", "Iron Key", "Crystal Oak",
           "Amber Star", "Red Kite", "Jade Anchor"]
_VERBS = ["announced", "confirmed", "revealed", "told reporters"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
_PAPERS = ["Daily Ledger", "Morning Courier", "Evening Herald", "Weekly Beacon"]

QUESTIONS = {
    "hometown": "Where does {name} live?",
    "profession": "What is the profession of {name}?",
    "company": "Which company did {name} found?",
    "prize": "Which prize did {name} win?",
    "year": "In which year did {name} found the company?",
}


@dataclass(frozen=True)
class Entity:
    """A fictional person and the facts the benchmark asks about."""

    name: str
    hometown: str
    profession: str
    company: str
    prize: str
    year: str
    city: str
    paper: str
    day: str
    verb: str

    def qa(self) -> list[dict[str, str]]:
        return [{"question": q.format(name=self.name), "answer": getattr(self, key)}
                for key, q in QUESTIONS.items()]

    def article(self) -> str:
        first = self.name.split()[0]
        body = (
            f"{self.city.upper()} ({self.paper}) - {self.name}, {_article(self.profession)} from "
            f"{self.hometown}, {self.verb} on {self.day} that {self.company} will open a new "
            f"workshop in {self.city}. {first} founded {self.company} in {self.year} and "
            f"won the {self.prize} prize for the work."
        )
        return body


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def make_entities(n: int, seed: int) -> list[Entity]:
    """``n`` entities with distinct names, drawn deterministically from ``seed``."""
    rng = random.Random(seed)
    places = sorted({_word(rng, 2) + " " + rng.choice(["Bay", "Falls", "Ridge", "Port"])
                     for _ in range(4 * n)})
    rng.shuffle(places)
    names: set[str] = set()
    entities = []
    while len(entities) < n:
        name = f"{_word(rng, 2)} {_word(rng, 2)}"
        if name in names:
            continue
        names.add(name)
        entities.append(Entity(
            name=name,
            hometown=rng.choice(places[: 2 * n]),
            profession=rng.choice(_PROFESSIONS),
            company=f"{_word(rng, 2)} {rng.choice(_FIRMS)}",
            prize=rng.choice(_PRIZES),
            year=str(rng.randint(1950, 2020)),
            city=rng.choice(places[2 * n:]),
            paper=rng.choice(_PAPERS),
            day=rng.choice(_DAYS),
            verb=rng.choice(_VERBS),
        ))
    return entities


@dataclass(frozen=True)
class Split:
    forget: list[Entity]
    retain1: list[Entity]
    retain2: list[Entity]
    holdout: list[Entity]


def make_split(per_split: int, seed: int) -> Split:
    ents = make_entities(4 * per_split, seed)
    k = per_split
    return Split(ents[:k], ents[k:2 * k], ents[2 * k:3 * k], ents[3 * k:])


DOC_SEPARATOR = "\n\n\n"
QUIZ_SIZE = 5
QUIZ_ROUNDS = 2


def render_qa(pairs: list[dict[str, str]]) -> str:
    """Question/answer pairs in the few-shot format of docs/method.md §5, without the trailing gap."""
    return "\n\n".join(f"Question: {p['question']}\nAnswer: {p['answer']}" for p in pairs)


def documents(ents: list[Entity], seed: int) -> list[str]:
    """The articles about ``ents`` followed by ``QUIZ_ROUNDS`` shuffled quizzes of their facts."""
    rng = random.Random(seed)
    pairs = [p for e in ents for p in e.qa()]
    quizzes = []
    for _ in range(QUIZ_ROUNDS):
        order = rng.sample(pairs, len(pairs))
        quizzes += [render_qa(order[i:i + QUIZ_SIZE]) for i in range(0, len(order), QUIZ_SIZE)]
    return [e.article() for e in ents] + quizzes


def write_muse_layout(split: Split, root: Path, icl_shots: int = 3, prompt_words: int = 12) -> None:
    """Write ``split`` under ``root`` in MUSE's layout (raw/, verbmem/, knowmem/, privleak/)."""
    for sub in ("raw", "verbmem", "knowmem", "privleak"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def dump(path: str, obj: object) -> None:
        (root / path).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")

    for i, (name, ents) in enumerate((("forget", split.forget), ("retain1", split.retain1),
                                      ("retain2", split.retain2), ("holdout", split.holdout))):
        (root / "raw" / f"{name}.txt").write_text(
            DOC_SEPARATOR.join(documents(ents, seed=i)) + "\n")

    verbmem = []
    for e in split.forget:
        words = e.article().split(" ")
        verbmem.append({"prompt": " ".join(words[:prompt_words]) + " ",
                        "gt": " ".join(words[prompt_words:])})
    dump("verbmem/forget.json", verbmem)

    for tag, ents in (("forget", split.forget), ("retain", split.retain1)):
        qa = [p for e in ents for p in e.qa()]
        icl, test = qa[:icl_shots], qa[icl_shots:]
        dump(f"knowmem/{tag}_qa.json", test)
        dump(f"knowmem/{tag}_qa_icl.json", icl)

    everyone = split.forget + split.retain1 + split.retain2 + split.holdout
    for tag, ents in (("forget", split.forget), ("retain", split.retain1)):
        rows = multiple_choice(ents, everyone, random.Random(f"mc-{tag}"))
        (root / "mcq").mkdir(exist_ok=True)
        (root / "mcq" / f"{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    dump("privleak/forget.json", [e.article() for e in split.forget])
    dump("privleak/retain.json", [e.article() for e in split.retain1])
    dump("privleak/holdout.json", [e.article() for e in split.holdout])


def multiple_choice(ents: list[Entity], pool: list[Entity], rng: random.Random) -> list[dict]:
    """Four-way questions about ``ents``; distractors are the same attribute of others in ``pool``."""
    rows = []
    for e in ents:
        for key, question in QUESTIONS.items():
            right = getattr(e, key)
            others = sorted({getattr(o, key) for o in pool} - {right})
            choices = rng.sample(others, 3) + [right]
            rng.shuffle(choices)
            rows.append({"question": question.format(name=e.name), "choices": choices,
                         "answer": choices.index(right)})
    return rows


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun
