"""SQuAD featurization: equality with the reference algorithm (``create_squad_data.py``, eval mode)
run with the slow pure-Python BERT tokenizer, on the data set in use (official or synthetic, see
tests/conftest.py), and the official dev set's known figures (those tests skip without it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from distbert.data.squad import features as F
from distbert.data.squad.features import FeatureParams, build_features, load_features
from distbert.errors import UserError

# ---------------------------------------------------------------------------------------------
# A pure-Python statement of the reference algorithm, used as the oracle of these tests.
# ---------------------------------------------------------------------------------------------

REF_SPLIT = {" ", "\t", "\r", "\n", "\u202f"}


class SlowTokenizer:
    """transformers' slow BasicTokenizer + WordpieceTokenizer (uncased), memoized per text."""

    def __init__(self, vocab_path: Path) -> None:
        from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer, WordpieceTokenizer

        tokens = F.read_vocab(vocab_path)
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.basic = BasicTokenizer(do_lower_case=True,
                                    never_split=["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"])
        self.wordpiece = WordpieceTokenizer(vocab=self.vocab, unk_token="[UNK]",
                                            max_input_chars_per_word=100)
        self.memo: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        out = self.memo.get(text)
        if out is None:
            out = [p for t in self.basic.tokenize(text) for p in self.wordpiece.tokenize(t)]
            self.memo[text] = out
        return out


def ref_split_words(context: str) -> tuple[list[str], list[int]]:
    """read_squad_examples: doc_tokens and char_to_word_offset."""
    words: list[str] = []
    char_to_word: list[int] = []
    prev_ws = True
    for c in context:
        if c in REF_SPLIT:
            prev_ws = True
        else:
            if prev_ws:
                words.append(c)
            else:
                words[-1] += c
            prev_ws = False
        char_to_word.append(len(words) - 1)
    return words, char_to_word


def ref_is_max_context(spans: list[tuple[int, int]], cur: int, position: int) -> bool:
    best_score, best_index = None, None
    for j, (start, length) in enumerate(spans):
        end = start + length - 1
        if position < start or position > end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best_score, best_index = score, j
    return cur == best_index


def ref_improve_answer_span(doc: list[str], start: int, end: int, want: str) -> tuple[int, int]:
    for new_start in range(start, end + 1):
        for new_end in range(end, new_start - 1, -1):
            if " ".join(doc[new_start:new_end + 1]) == want:
                return new_start, new_end
    return start, end


def ref_features(dataset: Path, tok: SlowTokenizer, p: FeatureParams = FeatureParams()) -> list[dict]:
    """convert_examples_to_features for every question, plus the training-mode gold positions."""
    out = []
    data = json.loads(dataset.read_text(encoding="utf-8"))["data"]
    example_index = 0
    for article in data:
        for para in article["paragraphs"]:
            words, char_to_word = ref_split_words(para["context"])
            tok_to_orig: list[int] = []
            orig_to_tok: list[int] = []
            doc: list[str] = []
            for i, w in enumerate(words):
                orig_to_tok.append(len(doc))
                for sub in tok.tokenize(w):
                    tok_to_orig.append(i)
                    doc.append(sub)
            for qa in para["qas"]:
                query = tok.tokenize(qa["question"])[: p.max_query_length]
                gold = None  # training-mode start/end (first answer), None = skipped example
                ans = qa["answers"][0]
                s_w = char_to_word[ans["answer_start"]]
                e_w = char_to_word[ans["answer_start"] + len(ans["text"]) - 1]
                if " ".join(words[s_w:e_w + 1]).find(" ".join(ans["text"].split())) != -1:
                    ts = orig_to_tok[s_w]
                    te = orig_to_tok[e_w + 1] - 1 if e_w < len(words) - 1 else len(doc) - 1
                    gold = ref_improve_answer_span(doc, ts, te, " ".join(tok.tokenize(ans["text"])))
                max_doc = p.max_seq_length - len(query) - 3
                spans, start = [], 0
                while start < len(doc):
                    length = min(len(doc) - start, max_doc)
                    spans.append((start, length))
                    if start + length == len(doc):
                        break
                    start += min(length, p.doc_stride)
                for j, (start, length) in enumerate(spans):
                    tokens = ["[CLS]", *query, "[SEP]"]
                    t2o, maxc = {}, {}
                    for k in range(length):
                        t2o[len(tokens)] = tok_to_orig[start + k]
                        maxc[len(tokens)] = ref_is_max_context(spans, j, start + k)
                        tokens.append(doc[start + k])
                    tokens.append("[SEP]")
                    seg = [0] * (len(query) + 2) + [1] * (length + 1)
                    ids = [tok.vocab[t] for t in tokens]
                    pad = p.max_seq_length - len(ids)
                    oracle = (-1, -1)
                    if gold is not None and gold[0] >= start and gold[1] <= start + length - 1:
                        off = len(query) + 2
                        oracle = (gold[0] - start + off, gold[1] - start + off)
                    out.append({"example_index": example_index, "doc_span_index": j, "tokens": tokens,
                                "input_ids": ids + [0] * pad, "input_mask": [1] * len(ids) + [0] * pad,
                                "segment_ids": seg + [0] * pad, "token_to_orig_map": t2o,
                                "token_is_max_context": maxc, "oracle": oracle})
                example_index += 1
    return out


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dev_store(squad_dev, vocab, session_cache):
    """The features of the data set in use (official or synthetic)."""
    return load_features(squad_dev, vocab, cache_dir=session_cache)


@pytest.fixture(scope="module")
def official_store(official_squad_dev, official_vocab, session_cache):
    """The official dev set's features (skips without it)."""
    return load_features(official_squad_dev, official_vocab, cache_dir=session_cache)


@pytest.fixture(scope="module")
def slow_tok(vocab):
    pytest.importorskip("transformers")
    return SlowTokenizer(vocab)


def test_official_dev_set_counts_and_length_stats(official_store):
    L = np.asarray(official_store.lengths)
    assert len(official_store) == 10833
    assert official_store.meta.n_examples == 10570
    assert round(float(L.mean()), 1) == 178.5
    assert float(np.median(L)) == 164.0
    assert (int(L.min()), int(L.max())) == (41, 384)
    buckets = np.histogram(L, bins=[0, 64, 128, 192, 256, 320, 384, 385])[0]
    assert buckets.tolist() == [194, 1987, 5035, 2162, 906, 285, 264]
    spans_per_q = np.bincount(official_store.meta.example_index)
    assert int((spans_per_q > 1).sum()) == 183 and int(spans_per_q.max()) == 5
    assert official_store.input_ids.dtype == np.int32 and official_store.input_ids.shape == (10833, 384)
    m = official_store.meta
    assert len({w for ws in m.doc_words for w in ws}) > 40000 and len(set(m.questions)) > 10000
    assert int((np.asarray(official_store.oracle_start) >= 0).sum()) > 10500


def test_feature_order_and_shapes(dev_store):
    """Feature i <-> QSL index i: examples appear in order, each with its windows numbered from 0."""
    ex = np.asarray(dev_store.meta.example_index)
    n_ex = dev_store.meta.n_examples
    assert ex[0] == 0 and ex[-1] == n_ex - 1 and np.all(np.diff(ex) >= 0)
    assert np.array_equal(np.unique(ex), np.arange(n_ex))   # every question has a window
    span = np.asarray(dev_store.meta.doc_span_index)
    first = np.r_[True, ex[1:] != ex[:-1]]
    assert np.all(span[first] == 0) and np.all(span[~first] == span[np.flatnonzero(~first) - 1] + 1)
    assert dev_store.input_ids.dtype == np.int32 and dev_store.input_ids.shape == (len(dev_store), 384)
    assert len(dev_store) == len(dev_store.lengths) == len(ex) > n_ex   # some questions have several windows


def test_array_invariants(dev_store):
    ids, mask, seg = (np.asarray(a) for a in (dev_store.input_ids, dev_store.input_mask, dev_store.segment_ids))
    L = np.asarray(dev_store.lengths)
    col = np.arange(384)[None, :]
    assert np.array_equal(mask, (col < L[:, None]).astype(np.int32))
    assert np.all(ids[col >= L[:, None]] == 0) and np.all(seg[col >= L[:, None]] == 0)
    assert np.all(ids[:, 0] == 101) and np.all(ids[np.arange(len(L)), L - 1] == 102)
    off = np.asarray(dev_store.meta.doc_offset)
    assert np.all(ids[np.arange(len(L)), off - 1] == 102)
    assert np.array_equal(seg.sum(axis=1), L - off)   # doc tokens + final [SEP]


def test_official_first_feature_tokens(official_store):
    dev_store = official_store
    toks = dev_store.tokens(0)
    assert toks[:14] == ["[CLS]", "which", "nfl", "team", "represented", "the", "afc", "at", "super",
                         "bowl", "50", "?", "[SEP]", "super"]
    assert toks[-6:] == ["nu", "##meral", "##s", "50", ".", "[SEP]"]
    assert len(toks) == int(dev_store.lengths[0]) == 171
    t2o = dev_store.token_to_orig_map(0)
    assert t2o[13] == 0 and t2o[169] == len(dev_store.meta.doc_words[0]) - 1
    assert dev_store.meta.qas_ids[0] == "56be4db0acb8001400a502ec"
    # oracle: the gold "Denver Broncos" lies inside the window
    s, e = int(dev_store.oracle_start[0]), int(dev_store.oracle_end[0])
    assert toks[s:e + 1] == ["denver", "broncos"]


def test_question_with_most_windows(dev_store):
    ex = np.asarray(dev_store.meta.example_index)
    counts = np.bincount(ex)
    e = int(np.argmax(counts))
    feats = np.flatnonzero(ex == e)
    assert len(feats) >= 3   # the official dev set: 5
    m = dev_store.meta
    assert np.asarray(m.doc_span_index)[feats].tolist() == [0, 1, 2, 3, 4]
    starts = np.asarray(m.span_start)[feats]
    assert np.all(np.diff(starts) == 128)                  # stride 128 between full windows
    assert np.all(np.asarray(dev_store.lengths)[feats[:-1]] == 384)
    # every doc token is the max-context token of exactly one window
    owner: dict[int, int] = {}
    for f in feats:
        base = int(m.span_start[f]) - int(m.doc_offset[f])
        for pos, flag in dev_store.token_is_max_context(int(f)).items():
            if flag:
                assert base + pos not in owner
                owner[base + pos] = int(f)
    n_doc = int(starts[-1] + m.span_len[feats[-1]])
    assert sorted(owner) == list(range(n_doc))


def test_accents_and_control_characters(dev_store, squad_dev):
    """Harvard (U+200B zero-width spaces), Rhine (U+FEFF), Martin Luther (combining U+032F), accents:
    words of the official dev set, which the synthetic set holds too (tests/synthetic.py)."""
    m = dev_store.meta
    cases = {
        "model—\u200b\u200bmany": ["model", "—", "many"],
        "\ufeff47.650°N": ["47", ".", "650", "##°", "##n"],
        "[ˈmaɐ̯tiːn": ["[", "ˈ", "##ma", "##ɐ", "##ti", "##ː", "##n"],
        "Frédéric": ["frederic"],
        "Temüjin's": ["te", "##mu", "##jin", "'", "s"],
        "Fécamp,": ["fe", "##camp", ","],
    }
    tok = F.make_tokenizer(m.vocab)
    found = set()
    for c, words in enumerate(m.doc_words):
        for w_index, w in enumerate(words):
            if w in cases:
                found.add(w)
                # the tokens mapped to this word in the context's token list
                lo, hi = int(m.tok_ptr[c]), int(m.tok_ptr[c + 1])
                mine = np.flatnonzero(np.asarray(m.tok_to_orig[lo:hi]) == w_index)
                ids, ptr = F.tokenize_pieces(tok, [w])
                assert [m.vocab[i] for i in ids] == cases[w]
                assert len(mine) == len(cases[w])
    assert found == set(cases)


def test_word_of_only_control_chars_yields_no_token(tmp_path, vocab):
    """A whitespace word that basic-tokenizes to nothing contributes zero tokens (and keeps its index)."""
    ctx = "Alpha \u200b\u200e beta\x00 gamma \u0301 delta"
    ds = _dataset(tmp_path, [(ctx, [("q1", "What is beta?", "beta", ctx.index("beta"))])])
    store = build_features(ds, vocab)
    assert store.tokens(0)[6:] == ["alpha", "beta", "gamma", "delta", "[SEP]"]
    t2o = store.token_to_orig_map(0)
    assert [t2o[p] for p in range(6, 10)] == [0, 2, 3, 5]   # words 1 and 4 vanished
    assert store.meta.doc_words[0][1] == "\u200b\u200e"


def test_query_truncation_and_windows(tmp_path, vocab):
    long_q = " ".join(["word"] * 100) + "?"
    ctx = " ".join(f"w{i}" for i in range(600))  # w123 -> 'w', '##12', '##3' style pieces
    ds = _dataset(tmp_path, [(ctx, [("q1", long_q, "w599", ctx.index("w599"))])])
    store = build_features(ds, vocab, FeatureParams())
    assert all(int(o) == 66 for o in store.meta.doc_offset)         # 64 query tokens + [CLS] + [SEP]
    assert np.all(np.asarray(store.lengths)[:-1] == 384)
    assert int(store.oracle_start[-1]) > 0 and all(int(s) == -1 for s in store.oracle_start[:-2])


def test_tokenization_equals_slow_tokenizer_on_every_word(dev_store, slow_tok, squad_dev):
    """Every distinct context word (tokenized alone, as the reference does), every question and
    every answer text of the data set gives the same tokens as transformers' slow BERT tokenizer."""
    m = dev_store.meta
    tok = F.make_tokenizer(m.vocab)
    words = sorted({w for ws in m.doc_words for w in ws})
    questions = list(dict.fromkeys(m.questions))
    answers = list(dict.fromkeys(a for ans in m.answers for a in ans))
    assert len(words) > 1000 and len(questions) > m.n_examples // 2   # official: > 40000 words, > 10000
    ids, _ = F.tokenize_pieces(tok, words)
    pieces = {m.vocab[i] for i in ids.tolist()}
    assert "[UNK]" in pieces and any(p.startswith("##") for p in pieces)   # both WordPiece paths taken
    for texts in (words, questions, answers):
        ids, ptr = F.tokenize_pieces(tok, texts)
        mismatches = [t for k, t in enumerate(texts)
                      if [m.vocab[i] for i in ids[ptr[k]:ptr[k + 1]]] != slow_tok.tokenize(t)]
        assert mismatches == []


def test_features_equal_reference_algorithm(dev_store, slow_tok, squad_dev):
    """The whole data set, feature by feature: ids, mask, segments, maps, and the oracle span."""
    ref = ref_features(squad_dev, slow_tok)
    assert len(ref) == len(dev_store)
    ref_ids = np.asarray([r["input_ids"] for r in ref], dtype=np.int32)
    assert np.array_equal(ref_ids, dev_store.input_ids)
    assert np.array_equal(np.asarray([r["input_mask"] for r in ref], dtype=np.int32), dev_store.input_mask)
    assert np.array_equal(np.asarray([r["segment_ids"] for r in ref], dtype=np.int32), dev_store.segment_ids)
    m = dev_store.meta
    assert [r["example_index"] for r in ref] == np.asarray(m.example_index).tolist()
    assert [r["doc_span_index"] for r in ref] == np.asarray(m.doc_span_index).tolist()
    bad_maps = [i for i, r in enumerate(ref)
                if r["token_to_orig_map"] != dev_store.token_to_orig_map(i)
                or r["token_is_max_context"] != dev_store.token_is_max_context(i)]
    assert bad_maps == []
    oracle = np.stack([dev_store.oracle_start, dev_store.oracle_end], axis=1).tolist()
    assert [list(r["oracle"]) for r in ref] == oracle
    # nearly every question has its gold span inside a window (official: 10500+ of 10833 features)
    with_gold = {r["example_index"] for r in ref if r["oracle"][0] >= 0}
    assert len(with_gold) >= 0.98 * m.n_examples
    assert max(r["doc_span_index"] for r in ref) >= 2   # multi-window contexts were compared


def test_gather_trims_to_longest_row(dev_store):
    idx = np.array([5, 0, 17])
    ids, mask, seg, lengths = dev_store.gather(idx)
    L = np.asarray(dev_store.lengths)[idx]
    assert ids.shape == (3, int(L.max())) and ids.dtype == np.int32 and ids.flags.c_contiguous
    assert np.array_equal(lengths, L)
    assert np.array_equal(ids, np.asarray(dev_store.input_ids)[idx, : L.max()])
    assert np.array_equal(mask.sum(axis=1), L) and seg.shape == ids.shape
    with pytest.raises(ValueError):
        dev_store.gather(np.array([], dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Bad input: one-line UserErrors naming the file.
# ---------------------------------------------------------------------------------------------

def _dataset(tmp_path: Path, paragraphs, name: str = "ds.json") -> Path:
    doc = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": ctx, "qas": [{"id": qid, "question": q, "answers": [{"text": a, "answer_start": s}]}
                                 for qid, q, a, s in qas]} for ctx, qas in paragraphs]}]}
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("content, needle", [
    ("{not json", "is not JSON"),
    ('{"version": "1.1"}', 'no top-level "data" list'),
    ('{"data": [{"title": "x"}]}', "lacks key 'paragraphs'"),
    ('{"data": [{"paragraphs": [{"context": "a b", "qas": [{"id": "1", "answers": []}]}]}]}',
     "lacks key 'question'"),
    ('{"data": [{"paragraphs": [{"context": 5, "qas": []}]}]}', "context is not a string"),
    ('{"data": []}', "holds no questions"),
])
def test_bad_dataset(tmp_path, vocab, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        build_features(path, vocab)
    msg = str(info.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_missing_dataset_and_vocab(tmp_path, squad_dev, vocab):
    with pytest.raises(UserError, match="cannot read dataset .*nope.json"):
        load_features(tmp_path / "nope.json", vocab, cache_dir=tmp_path)
    with pytest.raises(UserError, match="cannot read vocab .*nope.txt"):
        load_features(squad_dev, tmp_path / "nope.txt", cache_dir=tmp_path)
    assert not (tmp_path / "features").exists()   # nothing written


@pytest.mark.parametrize("content, needle", [
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", "too few for a BERT vocab"),
    ("\n".join(["[PAD]", "[UNK]", "[SEP]"] + [f"t{i}" for i in range(2000)]) + "\n", "lacks [CLS]"),
])
def test_bad_vocab(tmp_path, squad_dev, content, needle):
    path = tmp_path / "vocab.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(needle)) as info:
        load_features(squad_dev, path, cache_dir=tmp_path)
    assert str(path) in str(info.value)
    assert not any((tmp_path / "features").glob("*/manifest.json"))


def test_binary_vocab(tmp_path, squad_dev):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"\xff\xfe\x00junk" * 1000)
    with pytest.raises(UserError, match="not UTF-8"):
        build_features(squad_dev, path)


def test_params_validation():
    with pytest.raises(ValueError):
        FeatureParams(max_seq_length=64, max_query_length=64)
    assert FeatureParams() == FeatureParams(384, 128, 64)
