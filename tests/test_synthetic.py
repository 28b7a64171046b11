"""The generated data set (tests/synthetic.py) has the shape the data tests rely on."""

from __future__ import annotations

import json
import time

import numpy as np

from distbert.data.squad.features import FeatureParams, build_features, read_vocab
from tests.synthetic import ACCENT_WORDS, synthetic_dataset, write_synthetic_squad


def test_generation_is_fast_and_deterministic(tmp_path):
    t0 = time.perf_counter()
    a = write_synthetic_squad(tmp_path / "a")
    elapsed = time.perf_counter() - t0
    b = write_synthetic_squad(tmp_path / "b")
    assert elapsed < 1.0
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0] == tmp_path / "a" / "squad" / "dev-v1.1.json" and a[1] == tmp_path / "a" / "bert" / "vocab.txt"
    assert synthetic_dataset(seed=1) != synthetic_dataset()


def test_squad_v11_shape_and_answers_at_their_offsets(synthetic_data):
    doc = json.loads(synthetic_data.dataset.read_text(encoding="utf-8"))
    assert doc["version"] == "1.1" and len(doc["data"]) > 10
    ids, n_answers = set(), 0
    for article in doc["data"]:
        assert isinstance(article["title"], str) and article["paragraphs"]
        for para in article["paragraphs"]:
            ctx = para["context"]
            for qa in para["qas"]:
                assert qa["id"] not in ids and qa["question"].strip()
                ids.add(qa["id"])
                assert len(qa["answers"]) == 3
                for ans in qa["answers"]:
                    assert ctx[ans["answer_start"]:ans["answer_start"] + len(ans["text"])] == ans["text"]
                    n_answers += 1
    assert 300 <= len(ids) <= 1000 and n_answers == 3 * len(ids)
    contexts = [p["context"] for a in doc["data"] for p in a["paragraphs"]]
    words = {w for c in contexts for w in c.split()}
    assert set(ACCENT_WORDS) - {"\ufeff47.650°N"} <= words and "\ufeff47.650°N" in " ".join(contexts)


def test_bert_vocab_layout(synthetic_data):
    vocab = read_vocab(synthetic_data.vocab)
    assert vocab[0] == "[PAD]" and vocab[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab[1] == "[unused0]" and vocab[104] == "[unused99]"
    assert len(vocab) == len(set(vocab)) and all(t == t.strip() and t for t in vocab)
    assert all(t == t.lower() for t in vocab if not t.startswith("["))
    assert sum(t.startswith("##") for t in vocab) > 50


def test_features_exercise_windows_truncation_wordpieces_and_unk(synthetic_data):
    store = build_features(synthetic_data.dataset, synthetic_data.vocab)
    m, p = store.meta, FeatureParams()
    windows = np.bincount(np.asarray(m.example_index))
    assert 200 <= len(store) <= 1000 and windows.max() >= 4 and (windows > 1).sum() >= 20
    assert sum(int(o) == p.max_query_length + 2 for o in m.doc_offset) >= 5   # queries cut at 64 tokens
    ids = np.asarray(store.input_ids)
    pieces = {m.vocab[i] for i in np.unique(ids).tolist()}
    assert "[UNK]" in pieces and sum(t.startswith("##") for t in pieces) > 30
    gold_in_a_window = set(np.asarray(m.example_index)[np.asarray(store.oracle_start) >= 0].tolist())
    assert gold_in_a_window == set(range(m.n_examples))
