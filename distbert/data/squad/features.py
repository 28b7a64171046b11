"""SQuAD v1.1 -> BERT features, exactly as MLPerf's reference (``create_squad_data.py``, eval mode).

Contract (MLPERF.md section 2): each context is split into words on `` \\t\\r\\n\\u202f``; *each word
is tokenized alone* with the uncased BERT tokenizer (basic tokenization then WordPiece); the question
is tokenized whole and cut to ``max_query_length``; the doc tokens are cut into windows of
``max_seq_length - len(query) - 3`` tokens moved by ``min(length, doc_stride)``; each window becomes
``[CLS] query [SEP] window [SEP]`` zero-padded to ``max_seq_length``. Feature *i* is QSL index *i*.

Tokenization uses the Hugging Face ``tokenizers`` library (BertNormalizer + BertPreTokenizer +
WordPiece) in one batched call over every *distinct* piece: context words, and questions and first
answers cut at ASCII spaces. Basic tokenization never crosses whitespace, so a text's tokens are the
concatenation of its pieces' tokens, and a piece's tokens do not depend on its neighbours: pieces are
joined by ``"\n"`` into long strings and split back by character offsets. The oracle span (first gold
answer, as the reference computes it in training mode, ``_improve_answer_span`` included) is stored
for the ``oracle`` backend.

Equality with the reference is tested, not assumed: ``tests/test_squad_features.py`` runs the
reference algorithm with transformers' slow pure-Python tokenizer over the whole dev set and compares
every feature. A known divergence of the Rust normalizer (no final-sigma rule when lower-casing "Σ")
does not occur in SQuAD v1.1 dev.

Public API: :class:`FeatureParams`, :class:`FeatureStore`, :func:`load_features`,
:func:`build_features`.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from distbert import envs
from distbert.data.squad.cache import FeatureParams, FeatureStore, SquadMeta, cache_key, load_or_build
from distbert.errors import UserError
from distbert.util.fs import file_sha256
from distbert.util.progress import Progress

__all__ = ["FeatureParams", "FeatureStore", "load_features", "build_features", "read_squad",
           "read_vocab", "make_tokenizer", "tokenize_pieces", "SquadData"]

log = logging.getLogger(__name__)

# The reference's read_squad_examples splits contexts on exactly these characters.
_WORD_RE = re.compile(r"[^ \t\r\n\u202f]+")
REQUIRED_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
MIN_VOCAB_LINES = 1000
# Characters per string handed to the tokenizer: it slows down on very long strings, and per-string
# overhead dominates for single words (measured: ~40k words as 40k strings ~4x slower).
_CHUNK_CHARS = 50_000


@dataclasses.dataclass
class SquadData:
    """A parsed SQuAD v1.x file, in file order (questions = the reference's ``examples``)."""

    version: str
    contexts: list[str]
    context_words: list[list[str]]   # whitespace words of each context (the reference's doc_tokens)
    qas_ids: list[str]
    questions: list[str]
    example_context: np.ndarray      # int32 [E]: context of each question
    answers: list[list[str]]
    answer_starts: list[list[int]]


def read_squad(path: Path) -> SquadData:
    """Parse and validate a SQuAD v1.1-shaped JSON file; any problem is a one-line UserError."""
    path = Path(path)
    fix = "pass the SQuAD v1.1 dev set (dev-v1.1.json) with --dataset, or run `distbert download squad`"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read dataset {path} ({exc.strerror}): {fix}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"dataset {path} is not JSON ({str(exc).splitlines()[0]}): {fix}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(f"dataset {path} is not SQuAD-shaped (no top-level \"data\" list): {fix}")
    version = str(doc.get("version", ""))
    if version != "1.1":
        log.warning("dataset %s has version %r; the MLPerf accuracy target is defined on SQuAD v1.1",
                    path, version)
    data = SquadData(version, [], [], [], [], np.zeros(0, np.int32), [], [])
    example_context: list[int] = []
    where = "data"
    try:
        for a, article in enumerate(doc["data"]):
            for p, paragraph in enumerate(article["paragraphs"]):
                where = f"data[{a}].paragraphs[{p}]"
                context = paragraph["context"]
                if not isinstance(context, str):
                    raise TypeError("context is not a string")
                data.contexts.append(context)
                data.context_words.append(_WORD_RE.findall(context))
                for q, qa in enumerate(paragraph["qas"]):
                    where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                    if not isinstance(qa["question"], str) or not isinstance(qa["id"], str):
                        raise TypeError("question or id is not a string")
                    texts = [str(ans["text"]) for ans in qa["answers"]]
                    starts = [int(ans["answer_start"]) for ans in qa["answers"]]
                    data.qas_ids.append(qa["id"])
                    data.questions.append(qa["question"])
                    data.answers.append(texts)
                    data.answer_starts.append(starts)
                    example_context.append(len(data.context_words) - 1)
    except KeyError as exc:
        raise UserError(f"dataset {path} is not SQuAD-shaped: {where} lacks key {exc}: {fix}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"dataset {path} is not SQuAD-shaped at {where} ({exc}): {fix}") from None
    if not data.qas_ids:
        raise UserError(f"dataset {path} holds no questions: {fix}")
    data.example_context = np.asarray(example_context, dtype=np.int32)
    return data


def read_vocab(path: Path) -> list[str]:
    """The BERT WordPiece vocabulary, one token per line (id = line number), validated."""
    path = Path(path)
    fix = "pass the BERT uncased vocab.txt (30522 lines) with --vocab, or run `distbert download squad`"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"cannot read vocab {path} ({exc.strerror}): {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"vocab {path} is not UTF-8 text: {fix}") from None
    # Like the reference's load_vocab: one token per line, surrounding whitespace stripped.
    tokens = [line.strip() for line in text.split("\n")]
    if tokens and tokens[-1] == "":
        tokens.pop()
    if len(tokens) < MIN_VOCAB_LINES:
        raise UserError(f"vocab {path} has {len(tokens)} lines, too few for a BERT vocab: {fix}")
    missing = [t for t in REQUIRED_SPECIALS if t not in tokens]
    if missing:
        raise UserError(f"vocab {path} is not a BERT vocab (lacks {', '.join(missing)}): {fix}")
    return tokens


def make_tokenizer(vocab: list[str]) -> Tokenizer:
    """Uncased BERT tokenizer: clean text, CJK split, strip accents, lowercase, punctuation split, WordPiece."""
    ids: dict[str, int] = {}
    for i, token in enumerate(vocab):
        ids[token] = i  # a repeated token keeps its last id, as in the reference's load_vocab
    tok = Tokenizer(WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def tokenize_pieces(tok: Tokenizer, pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize each string of ``pieces`` on its own; returns (ids int32 [T], ptr int64 [len+1]).

    The ids of ``pieces[k]`` are ``ids[ptr[k]:ptr[k+1]]`` (possibly empty).
    """
    chunks: list[str] = []
    chunk_starts: list[np.ndarray] = []   # character start of each piece inside its chunk
    chunk_first: list[int] = []           # index of the chunk's first piece
    i = 0
    while i < len(pieces):
        j, size = i, 0
        while j < len(pieces) and (j == i or size + len(pieces[j]) < _CHUNK_CHARS):
            size += len(pieces[j]) + 1
            j += 1
        lens = np.fromiter((len(p) + 1 for p in pieces[i:j]), np.int64, j - i)
        starts = np.zeros(j - i, dtype=np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        # "\n" is whitespace to the basic tokenizer, so no token can span two pieces.
        chunks.append("\n".join(pieces[i:j]))
        chunk_starts.append(starts)
        chunk_first.append(i)
        i = j
    encodings = tok.encode_batch(chunks, add_special_tokens=False)
    all_ids: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    for enc, starts, first in zip(encodings, chunk_starts, chunk_first):
        ids = np.asarray(enc.ids, dtype=np.int32)
        if ids.size == 0:
            continue
        tok_starts = np.asarray(enc.offsets, dtype=np.int64)[:, 0]
        owners.append(np.searchsorted(starts, tok_starts, side="right") - 1 + first)
        all_ids.append(ids)
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int32)
    owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    if owner.size and np.any(np.diff(owner) < 0):
        raise AssertionError("tokenizer offsets are not monotonic")  # would break the piece split
    ptr = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=len(pieces)), out=ptr[1:])
    return ids, ptr


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[k], starts[k] + lens[k])`` over k, vectorized."""
    lens = np.asarray(lens, dtype=np.int64)
    out_starts = np.cumsum(lens) - lens
    return np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(out_starts - starts, lens)


class _PieceTable:
    """Distinct strings, each tokenized once; texts are then token sequences of concatenated pieces."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids = np.zeros(0, np.int32)
        self.ptr = np.zeros(1, np.int64)

    def add(self, groups: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Register texts made of pieces; returns (piece index of every piece, pieces per text)."""
        counts = np.fromiter(map(len, groups), np.int64, len(groups))
        flat = list(itertools.chain.from_iterable(groups))
        index = self.index
        for piece in dict.fromkeys(flat):
            index.setdefault(piece, len(index))
        return np.fromiter(map(index.__getitem__, flat), np.int64, len(flat)), counts

    def tokenize(self, tok: Tokenizer) -> None:
        self.ids, self.ptr = tokenize_pieces(tok, list(self.index))

    def concat(self, which: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids of each text (flat), token offset of each piece occurrence and of each text.

        Returns (ids [T], piece_tok_start [P+1], text_ptr [texts+1]) where piece occurrence k owns
        ``ids[piece_tok_start[k]:piece_tok_start[k+1]]`` and text t owns ``ids[text_ptr[t]:text_ptr[t+1]]``.
        """
        lens = self.ptr[which + 1] - self.ptr[which]
        ids = self.ids[_ranges(self.ptr[which], lens)]
        piece_tok_start = np.zeros(len(which) + 1, dtype=np.int64)
        np.cumsum(lens, out=piece_tok_start[1:])
        piece_ptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=piece_ptr[1:])
        return ids, piece_tok_start, piece_tok_start[piece_ptr]


def _doc_spans(n_tokens: int, max_doc: int, stride: int) -> list[tuple[int, int]]:
    """The reference's sliding windows (start, length) over ``n_tokens`` doc tokens."""
    spans: list[tuple[int, int]] = []
    start = 0
    while start < n_tokens:
        length = min(n_tokens - start, max_doc)
        spans.append((start, length))
        if start + length == n_tokens:
            break
        start += min(length, stride)
    return spans


def _max_context(spans: list[tuple[int, int]], n_tokens: int) -> list[np.ndarray]:
    """token_is_max_context per window: a token belongs to the window where min(left, right) context
    + 0.01 * window length is highest, the first such window on ties (reference _check_is_max_context)."""
    if len(spans) == 1:
        return [np.ones(spans[0][1], dtype=np.uint8)]
    pos = np.arange(n_tokens, dtype=np.float64)
    scores = np.full((len(spans), n_tokens), -np.inf)
    for j, (start, length) in enumerate(spans):
        end = start + length - 1
        p = pos[start:end + 1]
        scores[j, start:end + 1] = np.minimum(p - start, end - p) + 0.01 * length
    best = np.argmax(scores, axis=0)  # first maximum, as the reference's strict ">" keeps the first
    return [(best[s:s + n] == j).astype(np.uint8) for j, (s, n) in enumerate(spans)]


def _word_starts(context: str) -> list[int]:
    """Character offset of each whitespace word of ``context`` (same split as ``_WORD_RE``)."""
    chars = np.frombuffer(context.encode("utf-32-le"), dtype=np.uint32)
    is_word = ~((chars == 0x20) | (chars == 0x09) | (chars == 0x0D) | (chars == 0x0A) | (chars == 0x202F))
    prev = np.concatenate(([False], is_word[:-1]))
    return np.flatnonzero(is_word & ~prev).tolist()


def _gold_token_span(context: str, words: list[str], word_starts: list[int], text: str, offset: int,
                     doc_ids: np.ndarray, word_tok_start: np.ndarray,
                     answer_ids: np.ndarray) -> tuple[int, int] | None:
    """An answer as context token positions [start, end], as the reference computes in training mode.

    ``word_tok_start[w]`` is the first token of word ``w``. None when the answer text cannot be
    recovered from the context words (the reference skips such examples in training).
    """
    if not words or not text or offset < 0 or offset + len(text) > len(context):
        return None
    # char_to_word_offset[c] = the last word starting at or before character c
    first = bisect.bisect_right(word_starts, offset) - 1
    last = bisect.bisect_right(word_starts, offset + len(text) - 1) - 1
    if first < 0 or last < first:
        return None
    if " ".join(words[first:last + 1]).find(" ".join(text.split())) == -1:
        return None
    tok_start = int(word_tok_start[first])
    tok_end = int(word_tok_start[last + 1]) - 1 if last + 1 < len(words) else len(doc_ids) - 1
    if tok_start > tok_end:
        return None
    # _improve_answer_span: the first sub-span whose tokens equal the answer's own tokens. The
    # reference compares space-joined token strings, so only spans of exactly n tokens can match.
    n = answer_ids.size
    if 0 < n <= tok_end - tok_start + 1:
        want = answer_ids.tobytes()
        for new_start in range(tok_start, tok_end - n + 2):
            if doc_ids[new_start:new_start + n].tobytes() == want:
                return new_start, new_start + n - 1
    return tok_start, tok_end


def build_features(dataset: Path, vocab: Path, params: FeatureParams = FeatureParams()) -> FeatureStore:
    """Featurize ``dataset`` with ``vocab`` in memory (no cache); returns a store with ``path=None``."""
    t0 = time.perf_counter()
    data = read_squad(dataset)
    vocab_tokens = read_vocab(vocab)
    tok = make_tokenizer(vocab_tokens)
    cls_id, sep_id = vocab_tokens.index("[CLS]"), vocab_tokens.index("[SEP]")
    msl, stride, max_q = params.max_seq_length, params.doc_stride, params.max_query_length
    n_ex, n_ctx = len(data.qas_ids), len(data.contexts)

    # One tokenizer call for every distinct piece: context words (the reference tokenizes each word
    # alone), and questions / first answers cut at ASCII spaces (whitespace to the basic tokenizer, so
    # the concatenation of the pieces' tokens is the whole text's tokens).
    table = _PieceTable()
    c_which, c_counts = table.add(data.context_words)
    q_which, q_counts = table.add([q.split(" ") for q in data.questions])
    a_which, a_counts = table.add([(a[0] if a else "").split(" ") for a in data.answers])
    table.tokenize(tok)
    ctx_ids, word_tok, ctx_ptr = table.concat(c_which, c_counts)   # all_doc_tokens of every context
    q_ids, _, q_ptr = table.concat(q_which, q_counts)
    a_ids, _, a_ptr = table.concat(a_which, a_counts)
    word_ptr = np.zeros(n_ctx + 1, dtype=np.int64)
    np.cumsum(c_counts, out=word_ptr[1:])
    word_lens = np.diff(word_tok)
    word_in_ctx = np.arange(len(c_which), dtype=np.int64) - np.repeat(word_ptr[:-1], c_counts)
    tok_to_orig = np.repeat(word_in_ctx, word_lens).astype(np.int32)

    feats: list[tuple[int, int, int, int, int, int, int]] = []  # e, window, len(q), start, len, gold s/e
    max_ctx_parts: list[np.ndarray] = []
    word_starts: dict[int, list[int]] = {}
    with Progress("featurizing SQuAD", total=n_ex, unit="questions") as progress:
        for e in range(n_ex):
            ctx = int(data.example_context[e])
            t_lo, t_hi = int(ctx_ptr[ctx]), int(ctx_ptr[ctx + 1])
            n_q = min(int(q_ptr[e + 1] - q_ptr[e]), max_q)
            spans = _doc_spans(t_hi - t_lo, msl - n_q - 3, stride)
            if not spans:
                continue  # an empty context yields no feature, as in the reference
            gold = None
            if data.answers[e]:
                if ctx not in word_starts:
                    word_starts[ctx] = _word_starts(data.contexts[ctx])
                w_lo, w_hi = int(word_ptr[ctx]), int(word_ptr[ctx + 1])
                gold = _gold_token_span(
                    data.contexts[ctx], data.context_words[ctx], word_starts[ctx],
                    data.answers[e][0], data.answer_starts[e][0], ctx_ids[t_lo:t_hi],
                    word_tok[w_lo:w_hi + 1] - t_lo, a_ids[a_ptr[e]:a_ptr[e + 1]])
            max_ctx_parts.extend(_max_context(spans, t_hi - t_lo))
            for j, (s, n) in enumerate(spans):
                gs = ge = -1
                if gold is not None and gold[0] >= s and gold[1] <= s + n - 1:
                    gs, ge = gold[0] - s + n_q + 2, gold[1] - s + n_q + 2
                feats.append((e, j, n_q, s, n, gs, ge))
            if e % 1000 == 999:
                progress.update(1000)
        progress.update(n_ex % 1000)
    if not feats:
        raise UserError(f"dataset {dataset} yields no features (every context is empty): "
                        f"pass the SQuAD v1.1 dev set with --dataset")

    rows = np.asarray(feats, dtype=np.int64)
    n_feat = rows.shape[0]
    example_index, span_index, lq, span_start, span_len = (rows[:, k] for k in range(5))
    lengths = lq + span_len + 3
    feat_no = np.arange(n_feat, dtype=np.int64)
    # [CLS] query [SEP] window [SEP], scattered for all features at once
    input_ids = np.zeros((n_feat, msl), dtype=np.int32)
    input_ids[:, 0] = cls_id
    input_ids[feat_no, lq + 1] = sep_id
    input_ids[feat_no, lengths - 1] = sep_id
    rows_q = np.repeat(feat_no, lq)
    input_ids[rows_q, _ranges(np.ones(n_feat, np.int64), lq)] = q_ids[_ranges(q_ptr[example_index], lq)]
    rows_d = np.repeat(feat_no, span_len)
    doc_src = ctx_ptr[data.example_context[example_index]] + span_start
    input_ids[rows_d, _ranges(lq + 2, span_len)] = ctx_ids[_ranges(doc_src, span_len)]
    col = np.arange(msl, dtype=np.int64)[None, :]
    input_mask = (col < lengths[:, None]).astype(np.int32)
    segment_ids = ((col >= (lq + 2)[:, None]) & (col < lengths[:, None])).astype(np.int32)

    meta = SquadMeta(
        vocab=vocab_tokens, qas_ids=data.qas_ids, questions=data.questions, answers=data.answers,
        doc_words=data.context_words, dataset_version=data.version,
        example_index=example_index.astype(np.int32), doc_span_index=span_index.astype(np.int32),
        doc_offset=(lq + 2).astype(np.int32), span_start=span_start.astype(np.int32),
        span_len=span_len.astype(np.int32), max_context=np.concatenate(max_ctx_parts),
        example_context=data.example_context, tok_to_orig=tok_to_orig, tok_ptr=ctx_ptr)
    arrays = {"input_ids": input_ids, "input_mask": input_mask, "segment_ids": segment_ids,
              "lengths": lengths.astype(np.int32), "oracle_start": rows[:, 5].astype(np.int32),
              "oracle_end": rows[:, 6].astype(np.int32)}
    log.info("featurized %s: %d questions -> %d features in %.2f s", dataset, n_ex, n_feat,
             time.perf_counter() - t0)
    return FeatureStore(None, params, arrays, meta=meta)


def _sha256(path: Path, what: str) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror}): pass an existing file with "
                        f"--{what}, or run `distbert download squad`") from None


def load_features(dataset: Path, vocab: Path, params: FeatureParams = FeatureParams(),
                  cache_dir: Path | None = None) -> FeatureStore:
    """The features of ``dataset``/``vocab``, memory-mapped from the cache; built (and cached) if
    missing or corrupt. The cache lives in ``<cache_dir or envs.cache_dir()>/features/<key>/``."""
    dataset, vocab = Path(dataset), Path(vocab)
    root = Path(cache_dir) if cache_dir is not None else envs.cache_dir()
    d_sha, v_sha = _sha256(dataset, "dataset"), _sha256(vocab, "vocab")
    key = cache_key(d_sha, v_sha, params)
    extra = {"dataset": {"path": str(dataset.resolve()), "sha256": d_sha},
             "vocab": {"path": str(vocab.resolve()), "sha256": v_sha}}
    return load_or_build(root, key, lambda: build_features(dataset, vocab, params), extra)
