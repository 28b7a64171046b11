"""A small synthetic SQuAD v1.1 dev set and a matching uncased BERT-style vocab, generated.

The tests that exercise the engine, the feature cache and the scoring need *a* SQuAD-shaped data set,
not the official one: :func:`write_synthetic_squad` writes one (deterministic for a given seed, well
under a second) so those tests run on any machine. It is shaped to reach the code paths the official
dev set reaches:

- several hundred questions in articles of several paragraphs, each answer a span that occurs in its
  context at ``answer_start`` (three answers per question, as in the dev set: the span twice and a
  shorter variant);
- contexts long enough (> 384 tokens) to give two to five doc-stride windows, and questions longer
  than 64 tokens (query truncation);
- WordPiece splits (``##`` pieces: stems with suffixes, names made of syllables, digits), an
  ``[UNK]`` (a character the vocab lacks), accents, combining marks and control/format characters
  (U+200B, U+FEFF, U+200E, U+00AD, U+0301, U+032F), a word that tokenizes to nothing, U+202F and
  U+00A0 (whitespace to the reference's word split and to the BERT tokenizer respectively), and the
  six words ``tests/test_squad_features.py::test_accents_and_control_characters`` looks for;
- an unscored-question answer containing "empty" (the official nonce prediction earns F1 on it).

The vocab puts ``[PAD]`` at 0, ``[unused0..98]`` at 1-99, ``[UNK] [CLS] [SEP] [MASK]`` at 100-103 and
``[unused99..]`` up to 998, like BERT's, then single characters, ``##`` characters and the words and
pieces the data set uses (lower case, accents stripped).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

SEED = 20240611

# --------------------------------------------------------------------------- word material

FILLER = """the of and in to a was is for on as with by that from at his her its which were this an
be had are their has have it not or also one two three first after during between into most more
other some such many new old great city river valley town people time year years century state king
queen war church school city council land empire region north south east west water army trade
music art work works period early late later known called name named part parts area areas large
small long high low built made became remained several among under over before since until while
through against around within without north island coast sea mountain forest field village road
bridge tower wall gate market harbour port ship ships house houses family families house law laws
court bank book books letter letters story stories language languages song songs name power force
system form number group members member center centre public private local national royal ancient
modern first second third last final common main major minor main""".split()

STEMS = ["play", "build", "govern", "teach", "paint", "explore", "develop", "print", "trade", "farm",
         "rule", "settle", "sail", "found", "mine", "learn", "plant", "fish", "hunt", "craft"]
SUFFIXES = ["##ing", "##ed", "##er", "##ers", "##s", "##ment", "##ments", "##ly", "##ings"]
SUFFIX_TEXT = [s[2:] for s in SUFFIXES]

# names are syllable strings: the first syllable is a word, the others ## pieces
SYLLABLES = ["ka", "lor", "ven", "dra", "mi", "tho", "rel", "zan", "qui", "bor", "sel", "nar", "vik",
             "ost", "pel", "gri", "dun", "fa", "rho", "tam"]

NOUNS = ["library", "cathedral", "harbour", "bridge", "observatory", "canal", "fortress", "academy",
         "archive", "aqueduct", "theatre", "granary", "lighthouse", "museum", "monastery"]
ADJS = ["great", "northern", "royal", "ancient", "eastern", "golden", "silent", "western", "lower",
        "upper", "hidden", "painted"]
ROLES = ["leader", "governor", "architect", "bishop", "admiral", "chancellor", "poet", "merchant"]

# words the tests build their own small data sets from, and question words
EXTRA_WORDS = """alpha beta gamma delta word what who whom whose when where which how many much did does
do in year years people lived live under reign saw grow grew elect elected its leader wrote write
book books about including give gives text say says considering everything regarding whole passage
above below carefully reading noting detail details following according named place had built by
was were the of a an and as leader council super bowl empty land ?""".split()

# the official dev set's hard words (tests/test_squad_features.py::test_accents_and_control_characters)
ACCENT_WORDS = ["model—\u200b\u200bmany", "\ufeff47.650°N", "[ˈmaɐ̯tiːn", "Frédéric", "Temüjin's", "Fécamp,"]
ACCENT_TOKENS = ["model", "—", "many", "47", ".", "650", "##°", "##n", "[", "ˈ", "##ma", "##ɐ", "##ti",
                 "##ː", "frederic", "te", "##mu", "##jin", "'", "s", "fe", "##camp", ","]
NUMBER_TOKENS = ["50", "100", "1990", "2000", "12", "300"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def _entity(rng: random.Random) -> str:
    return " ".join(_name(rng, rng.choice((2, 3))) for _ in range(rng.choice((1, 2, 2))))


def _inflected(rng: random.Random) -> str:
    return rng.choice(STEMS) + rng.choice(SUFFIX_TEXT)


def _filler(rng: random.Random, n: int) -> str:
    words: list[str] = []
    for k in range(n):
        r = rng.random()
        w = _inflected(rng) if r < 0.15 else str(rng.randint(1, 99999)) if r < 0.18 else rng.choice(FILLER)
        if k and rng.random() < 0.08:
            words[-1] += ","
        words.append(w)
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


# --------------------------------------------------------------------------- facts and questions

def _fact(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """One sentence with slots, and (question, answer) pairs whose answer is a slot's text.

    The sentence is returned with ``{k}`` markers around each slot, resolved by :func:`_place`."""
    a, b, year, noun = _entity(rng), _name(rng, 2), str(rng.randint(1000, 1999)), rng.choice(NOUNS)
    adj, role, n = rng.choice(ADJS), rng.choice(ROLES), str(rng.randint(2, 900) * 100)
    kind = rng.randrange(4)
    if kind == 0:
        s = f"\x01{a}\x02 built the {adj} {noun} of \x01{b}\x02 in \x01{year}\x02."
        qa = [(f"Who built the {adj} {noun} of {b}?", a), (f"In what year did {a} build the {noun}?", year),
              (f"Which place had its {adj} {noun} built by {a}?", b)]
    elif kind == 1:
        s = f"In \x01{year}\x02, the council of \x01{b}\x02 elected \x01{a}\x02 as its {role}."
        qa = [(f"Who did the council of {b} elect as {role}?", a), (f"When was {a} elected {role}?", year),
              (f"Whose council elected {a}?", b)]
    elif kind == 2:
        s = f"The population of \x01{b}\x02 grew to \x01{n}\x02 people during the reign of \x01{a}\x02."
        qa = [(f"How many people lived in {b} under {a}?", n), (f"Whose reign saw {b} grow?", a),
              (f"Which city grew to {n} people?", b)]
    else:
        title = f"The {adj.capitalize()} {_inflected(rng).capitalize()}"
        s = f"\x01{a}\x02, a {_inflected(rng)} {role}, wrote a book about the {noun} called \x01{title}\x02."
        qa = [(f"Which book did the {role} {a} write?", title), (f"Who wrote {title}?", a)]
    return s, qa


def _place(sentence: str, base: int) -> tuple[str, dict[str, int]]:
    """Strip the \\x01..\\x02 slot markers; returns the text and {slot text: offset from ``base``}."""
    out: list[str] = []
    starts: dict[str, int] = {}
    i = 0
    pos = base
    while i < len(sentence):
        c = sentence[i]
        if c == "\x01":
            j = sentence.index("\x02", i)
            starts.setdefault(sentence[i + 1:j], pos)
            out.append(sentence[i + 1:j])
            pos += j - i - 1
            i = j + 1
        else:
            out.append(c)
            pos += 1
            i += 1
    return "".join(out), starts


def _answers(text: str, start: int) -> list[dict]:
    """The span twice (dev-set style) and its last word as a shorter variant."""
    words = text.split(" ")
    last = words[-1]
    return [{"answer_start": start, "text": text}, {"answer_start": start, "text": text},
            {"answer_start": start + len(text) - len(last), "text": last}]


def _long_question(rng: random.Random, q: str) -> str:
    """More than 64 tokens: the reference truncates the query to max_query_length."""
    lead = " ".join(rng.choice(FILLER) for _ in range(rng.randint(70, 90)))
    return f"Considering everything the passage says about the {lead}, {q[0].lower()}{q[1:]}"


SPECIAL = (f"In the archive, the {ACCENT_WORDS[0]} call it the Codex—was found at {ACCENT_WORDS[1]} by "
           f"\x01{ACCENT_WORDS[3]}\x02 of {ACCENT_WORDS[5]} whose name {ACCENT_WORDS[2]} ˈluːtɐ] recalls "
           f"{ACCENT_WORDS[4]} march. The caf\u00e9 and the cafe\u0301 served tea\u00a0and bread\u202fto "
           "\u200b\u200e visitors; the co\u00adop kept records\tin \u6771 ink and tal\u00e9s\U0001F600 beside "
           "the \x01Old Quay\x02.")
SPECIAL_QA = [("Who found the model at the archive?", ACCENT_WORDS[3]),
              ("Beside what were the records kept?", "Old Quay")]


def _paragraph(rng: random.Random, n_facts: int, filler_per_fact: tuple[int, int], long_q: float,
               qid: list[int], special: bool = False, empty_answer: bool = False) -> dict:
    parts, qas, pos = [], [], 0
    if special:
        text, starts = _place(SPECIAL, 0)
        parts.append(text)
        pos = len(text) + 1
        for q, ans in SPECIAL_QA:
            qas.append((q, ans, starts[ans]))
    for _ in range(n_facts):
        lo, hi = filler_per_fact
        for _ in range(rng.randint(lo, hi)):
            sent = _filler(rng, rng.randint(8, 20))
            parts.append(sent)
            pos += len(sent) + 1
        sent, pairs = _fact(rng)
        text, starts = _place(sent, pos)
        parts.append(text)
        pos += len(text) + 1
        for q, ans in rng.sample(pairs, k=rng.choice((1, 2))):
            qas.append((q, ans, starts[ans]))
    if empty_answer:
        text, starts = _place("The fields beyond the wall were called \x01empty land\x02 by farmers.", pos)
        parts.append(text)
        qas.append(("What did farmers call the fields beyond the wall?", "empty land", starts["empty land"]))
    context = " ".join(parts)
    out = []
    for q, ans, start in qas:
        assert context[start:start + len(ans)] == ans, (ans, context[start:start + 40])
        if rng.random() < long_q:
            q = _long_question(rng, q)
        qid[0] += 1
        out.append({"id": f"syn{qid[0]:05d}", "question": q, "answers": _answers(ans, start)})
    return {"context": context, "qas": out}


def synthetic_dataset(seed: int = SEED, articles: int = 24) -> dict:
    """The SQuAD v1.1 document (a dict for ``json.dump``)."""
    rng = random.Random(seed)
    qid = [0]
    data = []
    for a in range(articles):
        paragraphs = []
        for p in range(rng.randint(3, 5)):
            long_ctx = (a < 3 and p == 0) or rng.random() < 0.08
            paragraphs.append(_paragraph(
                rng, n_facts=rng.randint(4, 7) if long_ctx else rng.randint(2, 4),
                filler_per_fact=(3, 6) if long_ctx else (0, 2), long_q=0.06, qid=qid,
                special=(a == 1 and p == 1), empty_answer=(a == articles - 2 and p == 0)))
        data.append({"title": f"Synthetic_{a:02d}_{_name(rng, 2)}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


# --------------------------------------------------------------------------- vocab

def synthetic_vocab() -> list[str]:
    """Token list (id = index): BERT's special layout, then characters, pieces and words."""
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    head += [f"[unused{i}]" for i in range(99, 99 + 999 - len(head))]
    assert len(head) == 999 and head[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    tokens += ["##" + c for c in string.digits + string.ascii_lowercase]
    tokens += NUMBER_TOKENS + ACCENT_TOKENS
    tokens += [w.lower() for w in FILLER + EXTRA_WORDS + NOUNS + ADJS + ROLES + STEMS]
    tokens += SUFFIXES + SYLLABLES + ["##" + s for s in SYLLABLES]
    tokens += ["cafe", "tea", "bread", "codex", "archive", "quay", "ink", "visitors", "records", "co", "op",
               "##op", "beside", "served", "kept", "call", "found", "whose", "recalls", "march", "fields",
               "beyond", "farmers", "wall", "called", "population", "reign", "during", "book"]
    seen = set(head)
    vocab = list(head)
    for t in tokens:
        if t not in seen:
            seen.add(t)
            vocab.append(t)
    return vocab


def write_synthetic_squad(directory: Path | str, seed: int = SEED) -> tuple[Path, Path]:
    """Write ``<directory>/squad/dev-v1.1.json`` and ``<directory>/bert/vocab.txt``; returns their paths."""
    root = Path(directory)
    dataset, vocab = root / "squad" / "dev-v1.1.json", root / "bert" / "vocab.txt"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    vocab.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_text(json.dumps(synthetic_dataset(seed), ensure_ascii=False), encoding="utf-8")
    vocab.write_text("\n".join(synthetic_vocab()) + "\n", encoding="utf-8")
    return dataset, vocab
