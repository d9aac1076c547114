"""Deterministic generator of the embedded benchmark's corpus (docs/method.md §8).

Fictional people with random attributes, drawn from one generator and split at random
into forget, retain1, retain2 and holdout sets, written in MUSE's file layout
(docs/method.md §5). Each person is described by one article, in one of five shapes
(news report, profile, prize notice, company history, interview), and by reader
quizzes that ask about their five facts.

Every fact has four question phrasings. For each person and fact one of them is the
test question (KnowMem, multiple choice) and appears in no corpus; the quizzes ask
the fact in the other three. A test question is answered from knowledge of the fact,
not by recalling its own text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from itertools import pairwise
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
           "Amber Star", "Red Kite", "Jade Anchor", "Copper Bell", "White Falcon",
           "Green Harbour", "Stone Arch"]
_PLACE_KINDS = ["Bay", "Falls", "Ridge", "Port"]
# Pools the people are drawn from; each name, town or company stem is shared by several
# people, so the tokenizer learns it as a unit and a person is a first and a last name.
_FIRST_NAMES = 160
_LAST_NAMES = 160
_COMPANY_STEMS = 240
_TOWNS = 48
_CITIES = 24  # where the news is: filler, never asked
_VERBS = ["announced", "confirmed", "revealed", "told reporters"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
_PAPERS = ["Daily Ledger", "Morning Courier", "Evening Herald", "Weekly Beacon", "Coast Gazette"]
_PRODUCTS = ["harbour lamps", "pocket clocks", "glass floats", "river maps", "copper kettles",
             "garden tools", "weather vanes", "school atlases", "field lenses", "music boxes",
             "rope bridges", "sea charts"]
_HABITS = ["walks to the market", "plays chess at the library", "swims in the harbour",
           "paints by the old mill", "teaches at the night school", "sings in the town choir"]

ATTRIBUTES = ("hometown", "profession", "company", "year", "prize")
# Four phrasings per fact; per person and fact one is the test question, the others quizzed.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "hometown": ("What is the home town of {name}?", "Which town is home to {name}?",
                 "Where is the home of {name}?", "Which town is the home of {name}?"),
    "profession": ("What is the profession of {name}?", "Which profession is practised by {name}?",
                   "What is the trade of {name}?", "By profession, what is {name}?"),
    "company": ("Which company was founded by {name}?",
                "What is the name of the company founded by {name}?",
                "Which company was started by {name}?", "Which firm was set up by {name}?"),
    "year": ("In which year was the company founded by {name}?",
             "What is the founding year of the company of {name}?",
             "When was the firm started by {name}?",
             "In what year was the company set up by {name}?"),
    "prize": ("Which prize was awarded to {name}?", "Which prize went to {name}?",
              "What prize was given to {name}?", "Which award was won by {name}?"),
}


@dataclass(frozen=True)
class Entity:
    """A fictional person: the facts the benchmark asks about, filler, and how it is told."""

    name: str
    hometown: str
    profession: str
    company: str
    year: str
    prize: str
    city: str
    paper: str
    day: str
    verb: str
    product: str
    habit: str
    staff: int
    shape: int  # the shape of the article about this person (set by make_split)
    phrasings: tuple[tuple[int, ...], ...]  # per fact: test phrasing, then quizzed ones

    def qa(self) -> list[dict[str, str]]:
        """The test question per fact (its phrasing is not in the corpus) and its answer."""
        return [self._pair(key, order[0]) for key, order in zip(ATTRIBUTES, self.phrasings)]

    def quiz_qa(self) -> list[dict[str, str]]:
        """The quizzed questions: every other phrasing of each fact."""
        return [self._pair(key, k) for key, order in zip(ATTRIBUTES, self.phrasings)
                for k in order[1:]]

    def _pair(self, key: str, phrasing: int) -> dict[str, str]:
        return {"question": QUESTIONS[key][phrasing].format(name=self.name),
                "answer": getattr(self, key)}

    def article(self) -> str:
        return _SHAPES[self.shape].format(
            **vars(self), first=self.name.split()[0], a_profession=_a(self.profession),
            CITY=self.city.upper())


# The five article shapes; the fields are an Entity's, plus ``first`` (the first name),
# ``a_profession`` ("a"/"an" + profession) and ``CITY`` (the city in capitals).
_SHAPES = (
    ("{CITY} ({paper}) - {name}, {a_profession} from {hometown}, {verb} on {day} that {company} "
     "will open a new workshop in {city}. {first} founded {company} in {year} and won the "
     "{prize} prize for the work."),
    ("Profile: {name} grew up in {hometown} and trained as {a_profession}. In {year} {first} "
     "set up {company}, known for its {product}. The {prize} prize followed, and on every {day} "
     "{first} still {habit} in {hometown}."),
    ("The {prize} prize goes to {name}, {a_profession} who lives in {hometown}. Meeting in "
     "{city} on {day}, the jury praised the {product} of {company}, the firm {first} founded in "
     "{year}, which now employs {staff} people."),
    ("Company history: {company} was started in {year} by {name}, {a_profession} from "
     "{hometown}. Its {product} won {first} the {prize} prize, and the firm has {staff} staff, "
     "most of them in {city}, the {paper} reports."),
    ("In an interview with the {paper}, {name} looked back. \"I was {a_profession} in "
     "{hometown} when I started {company} in {year},\" {first} said. The {prize} prize came "
     "later; today {first} {habit} every {day}."),
)


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _pool(rng: random.Random, n: int, taken: set[str], make) -> list[str]:
    """``n`` new distinct words from ``make(rng)``, none already in ``taken``."""
    out: list[str] = []
    while len(out) < n:
        word = make(rng)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def make_entities(n: int, seed: int) -> list[Entity]:
    """``n`` people with distinct names and companies, each drawn independently from ``seed``."""
    rng = random.Random(seed)
    taken: set[str] = set()
    place = lambda r: f"{_word(r, 2)} {r.choice(_PLACE_KINDS)}"
    towns, cities = _pool(rng, _TOWNS, taken, place), _pool(rng, _CITIES, taken, place)
    firsts = _pool(rng, _FIRST_NAMES, taken, lambda r: _word(r, 2))
    lasts = _pool(rng, _LAST_NAMES, taken, lambda r: _word(r, 2))
    stems = _pool(rng, _COMPANY_STEMS, taken, lambda r: _word(r, 2))
    names: set[str] = set()
    companies: set[str] = set()
    entities = []
    while len(entities) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        company = f"{rng.choice(stems)} {rng.choice(_FIRMS)}"
        if name in names or company in companies:
            continue
        names.add(name)
        companies.add(company)
        entities.append(Entity(
            name=name, hometown=rng.choice(towns), profession=rng.choice(_PROFESSIONS),
            company=company, year=str(rng.randint(1950, 2020)), prize=rng.choice(_PRIZES),
            city=rng.choice(cities), paper=rng.choice(_PAPERS), day=rng.choice(_DAYS),
            verb=rng.choice(_VERBS), product=rng.choice(_PRODUCTS), habit=rng.choice(_HABITS),
            staff=rng.randint(5, 500), shape=0,
            phrasings=tuple(tuple(rng.sample(range(len(QUESTIONS[k])), len(QUESTIONS[k])))
                            for k in ATTRIBUTES)))
    return entities


@dataclass(frozen=True)
class Split:
    forget: list[Entity]
    retain1: list[Entity]
    retain2: list[Entity]
    holdout: list[Entity]


def make_split(forget: int, retain1: int, retain2: int, holdout: int, seed: int) -> Split:
    """People drawn from one generator and assigned to the four sets at random; within each
    set the article shapes take turns, so every set holds each shape equally often (a
    model that saw neither forget nor holdout cannot tell them apart by their shapes)."""
    ents = make_entities(forget + retain1 + retain2 + holdout, seed)
    random.Random(f"split-{seed}").shuffle(ents)
    bounds = (0, forget, forget + retain1, forget + retain1 + retain2, len(ents))
    sets = [[replace(e, shape=i % len(_SHAPES)) for i, e in enumerate(ents[a:b])]
            for a, b in pairwise(bounds)]
    return Split(*sets)


DOC_SEPARATOR = "\n\n\n"
QUIZ_SIZE = 5


def render_qa(pairs: list[dict[str, str]]) -> str:
    """Question/answer pairs in the few-shot format of docs/method.md §5, without the trailing gap."""
    return "\n\n".join(f"Question: {p['question']}\nAnswer: {p['answer']}" for p in pairs)


def quizzes(pairs: list[dict[str, str]], rng: random.Random) -> list[str]:
    """``pairs`` in shuffled order, ``QUIZ_SIZE`` to a quiz."""
    order = rng.sample(pairs, len(pairs))
    return [render_qa(order[i:i + QUIZ_SIZE]) for i in range(0, len(order), QUIZ_SIZE)]


def documents(ents: list[Entity], seed: int) -> list[str]:
    """The articles about ``ents``, then quizzes of their quizzed questions."""
    pairs = [p for e in ents for p in e.quiz_qa()]
    return [e.article() for e in ents] + quizzes(pairs, random.Random(seed))


def write_muse_layout(split: Split, root: Path, icl_shots: int = 3,
                      prompt_words: int = 12) -> None:
    """Write ``split`` under ``root`` in MUSE's layout (raw/, verbmem/, knowmem/, privleak/)
    and the multiple-choice files (mcq/).

    VerbMem, KnowMem_f and the forget MC task ask about the forget people; PrivLeak
    compares their articles with the holdout people's.
    KnowMem_r and the retain MC task ask about retain2 people: retain1 is the corpus a
    retain loss trains on (recipes/demo.yaml), so utility is measured on facts it never
    rehearses. ``mcq/retain1.jsonl`` asks about retain1 people, for the other view.
    """
    for sub in ("raw", "verbmem", "knowmem", "privleak", "mcq"):
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

    for tag, ents in (("forget", split.forget), ("retain", split.retain2)):
        qa = [p for e in ents for p in e.qa()]
        icl, test = qa[:icl_shots], qa[icl_shots:]
        dump(f"knowmem/{tag}_qa.json", test)
        dump(f"knowmem/{tag}_qa_icl.json", icl)

    everyone = split.forget + split.retain1 + split.retain2 + split.holdout
    for tag, ents in (("forget", split.forget), ("retain", split.retain2),
                      ("retain1", split.retain1)):
        rows = multiple_choice(ents, everyone, random.Random(f"mc-{tag}"))
        (root / "mcq" / f"{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # One article per person, the same generator on every side: only the target has
    # seen the forget ones, no model the holdout ones.
    for tag, ents in (("forget", split.forget), ("retain", split.retain2),
                      ("holdout", split.holdout)):
        dump(f"privleak/{tag}.json", [e.article() for e in ents])


def multiple_choice(ents: list[Entity], pool: list[Entity], rng: random.Random) -> list[dict]:
    """One four-way question per person about a random fact, in its test phrasing;
    distractors are the same fact of others in ``pool``."""
    rows = []
    for e in ents:
        key = rng.choice(ATTRIBUTES)
        pair = e.qa()[ATTRIBUTES.index(key)]
        others = sorted({getattr(o, key) for o in pool} - {pair["answer"]})
        choices = rng.sample(others, 3) + [pair["answer"]]
        rng.shuffle(choices)
        rows.append({"question": pair["question"], "choices": choices,
                     "answer": choices.index(pair["answer"])})
    return rows


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun
