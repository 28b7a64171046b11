"""Accuracy scoring: LoadGen logs -> official SQuAD v1.1 EM/F1, checked against a plain-Python
statement of accuracy-squad.py's post-processing and evaluate_v1.1.py."""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distbert.cli import squad as cli
from distbert.data.squad import accuracy as A
from distbert.data.squad.evaluate import evaluate, f1_score, normalize_answer
from distbert.data.squad.features import load_features
from distbert.errors import UserError

REPO = Path(__file__).resolve().parent.parent
# the submission checker's ACC_PATTERN["F1"]
CHECKER_F1 = re.compile(r"^{[\"']exact_match[\"']:\s*[\d\.]+,\s*[\"']f1[\"']:\s*([\d\.]+)}")


@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    return load_features(squad_dev, vocab, cache_dir=session_cache)


def oracle_logits(store, dtype=np.float32, full_width: bool = False) -> dict[int, np.ndarray]:
    """Logits pointing at each feature's gold span (zeros elsewhere), L = the feature's length."""
    out = {}
    for i in range(len(store)):
        L = 384 if full_width else int(store.lengths[i])
        x = np.zeros((L, 2), dtype=dtype)
        if full_width:
            x[int(store.lengths[i]):] = -10000
        if store.oracle_start[i] >= 0:
            x[int(store.oracle_start[i]), 0] = 10
            x[int(store.oracle_end[i]), 1] = 10
        out[i] = x
    return out


def write_log(path: Path, entries: list[tuple[int, np.ndarray]], transposed: bool = False) -> Path:
    """A LoadGen mlperf_log_accuracy.json: uppercase hex of each response's bytes."""
    with open(path, "w") as f:
        f.write("[\n")
        for k, (idx, rows) in enumerate(entries):
            data = np.ascontiguousarray(rows.T if transposed else rows).tobytes().hex().upper()
            f.write(("," if k else "") + f'{{ "seq_id" : {k}, "qsl_idx" : {idx}, "data" : "{data}" }}\n')
        f.write("]\n")
    return path


# ---------------------------------------------------------------------------------------------
# Plain-Python statement of the official post-processing and evaluation (the test oracle).
# ---------------------------------------------------------------------------------------------

def ref_get_final_text(pred_text: str, orig_text: str, basic) -> str:
    def strip_spaces(text):
        chars, ns_to_s = [], collections.OrderedDict()
        for i, c in enumerate(text):
            if c == " ":
                continue
            ns_to_s[len(chars)] = i
            chars.append(c)
        return "".join(chars), ns_to_s

    tok_text = " ".join(basic.tokenize(orig_text))
    start = tok_text.find(pred_text)
    if start == -1:
        return orig_text
    end = start + len(pred_text) - 1
    orig_ns, orig_map = strip_spaces(orig_text)
    tok_ns, tok_map = strip_spaces(tok_text)
    if len(orig_ns) != len(tok_ns):
        return orig_text
    tok_s_to_ns = {v: k for k, v in tok_map.items()}
    if start not in tok_s_to_ns or tok_s_to_ns[start] not in orig_map:
        return orig_text
    if end not in tok_s_to_ns or tok_s_to_ns[end] not in orig_map:
        return orig_text
    return orig_text[orig_map[tok_s_to_ns[start]]: orig_map[tok_s_to_ns[end]] + 1]


def ref_predictions(store, logits: dict[int, np.ndarray]) -> dict[str, str]:
    from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer

    basic = BasicTokenizer(do_lower_case=True, never_split=["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"])
    m = store.meta
    by_example = collections.defaultdict(list)
    for f, e in enumerate(np.asarray(m.example_index).tolist()):
        by_example[e].append(f)
    preds = {}
    for q, qid in enumerate(m.qas_ids):
        prelim = []
        for f in by_example[q]:
            if f not in logits:
                continue
            rows = logits[f]
            start = [-10000.0] * 384
            end = [-10000.0] * 384
            start[: rows.shape[0]] = [float(v) for v in rows[:, 0]]
            end[: rows.shape[0]] = [float(v) for v in rows[:, 1]]
            best_s = [i for i, _ in sorted(enumerate(start), key=lambda x: x[1], reverse=True)[:20]]
            best_e = [i for i, _ in sorted(enumerate(end), key=lambda x: x[1], reverse=True)[:20]]
            tokens = store.tokens(f)
            t2o = store.token_to_orig_map(f)
            maxc = store.token_is_max_context(f)
            for s in best_s:
                for e in best_e:
                    if s >= len(tokens) or e >= len(tokens) or s not in t2o or e not in t2o:
                        continue
                    if not maxc.get(s, False) or e < s or e - s + 1 > 30:
                        continue
                    prelim.append((f, s, e, start[s], end[e]))
        prelim.sort(key=lambda p: p[3] + p[4], reverse=True)
        if not prelim:
            preds[qid] = "empty"
            continue
        f, s, e = prelim[0][:3]
        tok_text = " ".join(store.tokens(f)[s:e + 1]).replace(" ##", "").replace("##", "")
        tok_text = " ".join(tok_text.strip().split())
        t2o = store.token_to_orig_map(f)
        words = m.doc_words[int(m.example_context[q])]
        orig_text = " ".join(words[t2o[s]:t2o[e] + 1])
        preds[qid] = ref_get_final_text(tok_text, orig_text, basic)
    return preds


def ref_evaluate(dataset: Path, predictions: dict[str, str]) -> dict[str, float]:
    def norm(s):
        s = s.lower()
        s = "".join(ch for ch in s if ch not in set(string.punctuation))
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return " ".join(s.split())

    def f1(p, t):
        pt, tt = norm(p).split(), norm(t).split()
        same = sum((collections.Counter(pt) & collections.Counter(tt)).values())
        if same == 0:
            return 0
        precision, recall = 1.0 * same / len(pt), 1.0 * same / len(tt)
        return (2 * precision * recall) / (precision + recall)

    em = f1_sum = total = 0
    for article in json.loads(dataset.read_text(encoding="utf-8"))["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                truths = [a["text"] for a in qa["answers"]]
                em += max(norm(predictions[qa["id"]]) == norm(t) for t in truths)
                f1_sum += max(f1(predictions[qa["id"]], t) for t in truths)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1_sum / total}


# ---------------------------------------------------------------------------------------------

def test_oracle_log_scores_high_and_matches_direct_scoring(store, tmp_path):
    logits = oracle_logits(store)
    path = write_log(tmp_path / "mlperf_log_accuracy.json", list(logits.items()))
    result = A.score_log(path, store)
    assert result.exact_match >= 97 and result.f1 >= 98
    assert result.n_features_scored == len(store) and result.n_questions_scored == store.meta.n_examples
    assert result.n_log_entries == len(store) and result.n_duplicates == 0
    direct = A.score_logits(store, logits)
    assert (direct.exact_match, direct.f1) == (result.exact_match, result.f1)
    assert direct.predictions == result.predictions
    assert CHECKER_F1.match(result.official_line())
    assert result.official_line() == json.dumps({"exact_match": result.exact_match, "f1": result.f1})
    assert all(v.startswith(("bert-99: PASS", "bert-99.9: PASS")) for v in result.verdicts())


def test_float16_and_full_width_rows_give_the_same_result(store, tmp_path):
    base = A.score_logits(store, oracle_logits(store))
    half = oracle_logits(store, dtype=np.float16, full_width=True)   # 384 rows, -10000 padding
    result = A.score_log(write_log(tmp_path / "f16.json", list(half.items())), store, dtype="float16")
    assert (result.exact_match, result.f1) == (base.exact_match, base.f1)
    with pytest.raises(UserError, match="not whole"):   # float16 bytes read as float32: 384 rows * 2
        A.score_log(tmp_path / "f16.json", store, dtype="int8")


def test_transposed_log(store, tmp_path):
    logits = {i: x for i, x in oracle_logits(store).items() if i < 500}
    plain = A.score_log(write_log(tmp_path / "a.json", list(logits.items())), store)
    trans = A.score_log(write_log(tmp_path / "b.json", list(logits.items()), transposed=True), store,
                        transposed=True)
    assert plain.predictions == trans.predictions


def test_random_logits_score_low(store, tmp_path):
    rng = np.random.default_rng(1)
    logits = {i: rng.standard_normal((int(store.lengths[i]), 2)).astype(np.float32) for i in range(len(store))}
    result = A.score_log(write_log(tmp_path / "rand.json", list(logits.items())), store)
    assert result.f1 < 15 and result.exact_match < 5
    assert all(": FAIL" in v for v in result.verdicts())


def _first_questions(store, official_count: int) -> int:
    """As many questions as ``official_count`` of the official dev set's 10570, in proportion."""
    return store.meta.n_examples * official_count // 10570


def test_repeated_qsl_idx_last_entry_wins(store, tmp_path):
    # features of the first 3000 questions (official; the same share of another data set)
    n = int(np.searchsorted(store.meta.example_index, _first_questions(store, 3000)))
    good = {i: x for i, x in oracle_logits(store).items() if i < n}
    rng = np.random.default_rng(2)
    junk = {i: rng.standard_normal((384, 2)).astype(np.float32) for i in range(0, n, 3)}
    entries = list(junk.items()) + list(good.items())        # junk first: overwritten
    result = A.score_log(write_log(tmp_path / "rep.json", entries), store)
    base = A.score_logits(store, good)
    assert (result.f1, result.exact_match) == (base.f1, base.exact_match)
    assert result.n_duplicates == len(junk) and result.n_log_entries == len(entries)
    flipped = A.score_log(write_log(tmp_path / "rep2.json", list(good.items()) + list(junk.items())), store)
    assert flipped.f1 < base.f1 - 5                           # junk last: it wins


def test_partial_log_and_exact_equality_with_reference(store, squad_dev, tmp_path):
    """Quantized random logits (many ties) for the features of the first 1200 questions (official;
    the same share of another data set), trimmed rows of varying length: predictions and both scores
    equal the plain-Python reference."""
    pytest.importorskip("transformers")
    rng = np.random.default_rng(3)
    ex = np.asarray(store.meta.example_index)
    n_q, k = store.meta.n_examples, _first_questions(store, 1200)
    logits = {}
    for i in np.flatnonzero(ex < k).tolist():
        L = int(rng.integers(int(store.lengths[i]) // 2, 385))
        x = np.round(rng.standard_normal((L, 2)) * 2) / 2          # steps of 0.5: ties everywhere
        if store.oracle_start[i] >= 0 and rng.random() < 0.7:
            x[min(int(store.oracle_start[i]), L - 1), 0] += 4
            x[min(int(store.oracle_end[i]), L - 1), 1] += 4
        logits[i] = x.astype(np.float32)
    result = A.score_log(write_log(tmp_path / "partial.json", list(logits.items())), store)
    ref_preds = ref_predictions(store, logits)
    assert result.predictions == ref_preds
    ref = ref_evaluate(squad_dev, ref_preds)
    assert (result.exact_match, result.f1) == (ref["exact_match"], ref["f1"])   # bit-exact floats
    assert result.n_questions_scored == k and result.n_features_scored == len(logits)
    assert sum(p == "empty" for p in result.predictions.values()) >= n_q - k
    assert 25 < result.f1_scored < 95    # 70 % of the windows point at the gold span, noise elsewhere
    m = store.meta
    scored = sorted(set(ex[list(logits)].tolist()))
    sub = evaluate([m.qas_ids[q] for q in scored], [m.answers[q] for q in scored], result.predictions)
    assert (result.exact_match_scored, result.f1_scored) == (sub["exact_match"], sub["f1"])
    # the official nonce "empty" even earns F1 on gold answers such as "empty land" of unscored
    # questions (both data sets hold one)
    nonce = sum(max(f1_score("empty", a) for a in m.answers[q]) for q in range(k, n_q))
    assert nonce > 0
    assert result.f1 * n_q / k - result.f1_scored == pytest.approx(100 * nonce / k, abs=1e-6)
    assert "over the scored questions only" in result.coverage_line()


def test_top_k_matches_sorted():
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 4, size=(200, 384)).astype(np.float64)   # heavy ties
    x[0] = 0.0
    got = A._top_k(x, 20)
    for row, idx in zip(x, got):
        want = [i for i, _ in sorted(enumerate(row.tolist()), key=lambda t: t[1], reverse=True)[:20]]
        assert idx.tolist() == want


def test_evaluate_helpers():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert f1_score("Denver Broncos", "the Denver Broncos") == 1.0
    assert f1_score("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    assert f1_score("a", "the") == 0
    got = evaluate(["q1", "q2", "q3"], [["Denver Broncos"], ["x"], ["y"]], {"q1": "denver broncos", "q2": "z"})
    assert got == {"exact_match": 100.0 / 3, "f1": 100.0 / 3}   # q3 unanswered: counts as 0


# ---------------------------------------------------------------------------------------------
# CLI handlers (distbert accuracy / distbert squad features).
# ---------------------------------------------------------------------------------------------

def _args(**kw) -> argparse.Namespace:
    base = {"dataset": None, "vocab": None, "cache_dir": None, "dtype": "float32",
            "output_transposed": False, "out": None, "predictions": None}
    return argparse.Namespace(**(base | kw))


@pytest.fixture(scope="module")
def oracle_log(store, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("log") / "mlperf_log_accuracy.json"
    return write_log(path, list(oracle_logits(store).items()))


def test_cli_accuracy_prints_one_official_line(store, squad_dev, vocab, session_cache, oracle_log, tmp_path, capsys):
    out, preds = tmp_path / "accuracy.txt", tmp_path / "predictions.json"
    rc = cli.cmd_accuracy(_args(log=oracle_log, dataset=squad_dev, vocab=vocab, cache_dir=session_cache,
                                out=out, predictions=preds))
    captured = capsys.readouterr()
    assert rc == 0
    lines = captured.out.splitlines()
    assert len(lines) == 1 and CHECKER_F1.match(lines[0])
    assert out.read_text() == lines[0] + "\n"
    assert "bert-99: PASS" in captured.err and "bert-99.9: PASS" in captured.err
    assert len(json.loads(preds.read_text())) == store.meta.n_examples


def test_cli_squad_features_export(squad_dev, vocab, session_cache, store, tmp_path, capsys):
    out = tmp_path / "features.npz"
    assert cli.cmd_squad_features(_args(dataset=squad_dev, vocab=vocab, cache_dir=session_cache, out=out)) == 0
    with np.load(out) as z:
        assert sorted(z.files) == ["input_ids", "input_mask", "segment_ids"]
        assert z["input_ids"].shape == (len(store), 384) and z["input_ids"].dtype == np.int32
        assert np.array_equal(z["segment_ids"], store.segment_ids)
    assert f"{len(store)} features" in capsys.readouterr().out


def _bad_logs(store) -> dict[str, tuple[str, str]]:
    row = np.zeros((10, 2), np.float32).tobytes().hex()
    return {
        "not_json": ("[{not json", "is not JSON"),
        "empty": ("[]", "is empty"),
        "object": ('{"qsl_idx": 1}', "not a JSON array"),
        "missing_key": ('[{"seq_id": 0, "qsl_idx": 1}]', 'lacks "qsl_idx" or "data"'),
        "odd_hex": ('[{"seq_id": 0, "qsl_idx": 1, "data": "ABC"}]', "invalid hex"),
        "partial_row": (f'[{{"seq_id": 0, "qsl_idx": 1, "data": "{row}00000000"}}]', "not whole [L, 2]"),
        "too_long": ('[{"seq_id": 0, "qsl_idx": 1, "data": "' + "00" * (385 * 8) + '"}]', "L <= 384"),
        "idx_range": (f'[{{"seq_id": 0, "qsl_idx": {len(store)}, "data": "{row}"}}]', f"outside the {len(store)}"),
        "idx_negative": (f'[{{"seq_id": 0, "qsl_idx": -1, "data": "{row}"}}]', f"outside the {len(store)}"),
    }


@pytest.mark.parametrize("case", ["not_json", "empty", "object", "missing_key", "odd_hex", "partial_row",
                                  "too_long", "idx_range", "idx_negative"])
def test_cli_accuracy_bad_logs(store, squad_dev, vocab, session_cache, tmp_path, capsys, case):
    content, needle = _bad_logs(store)[case]
    log = tmp_path / "mlperf_log_accuracy.json"
    log.write_text(content)
    out = tmp_path / "accuracy.txt"
    with pytest.raises(UserError) as info:
        cli.cmd_accuracy(_args(log=log, dataset=squad_dev, vocab=vocab, cache_dir=session_cache, out=out))
    msg = str(info.value)
    assert needle in msg and str(log) in msg and "\n" not in msg
    assert not out.exists() and capsys.readouterr().out == ""


def test_cli_accuracy_missing_inputs(squad_dev, vocab, session_cache, oracle_log, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        cli.cmd_accuracy(_args(log=tmp_path / "nope.json", dataset=squad_dev, vocab=vocab, cache_dir=session_cache))
    with pytest.raises(UserError, match="folder .* does not exist"):
        cli.cmd_accuracy(_args(log=oracle_log, dataset=squad_dev, vocab=vocab, cache_dir=session_cache,
                               out=tmp_path / "no" / "accuracy.txt"))
    bad_vocab = tmp_path / "vocab.txt"
    bad_vocab.write_text("hello\n")
    with pytest.raises(UserError, match="vocab"):
        cli.cmd_accuracy(_args(log=oracle_log, dataset=squad_dev, vocab=bad_vocab, cache_dir=tmp_path))
    not_squad = tmp_path / "ds.json"
    not_squad.write_text('{"data": 3}')
    with pytest.raises(UserError, match="not SQuAD-shaped"):
        cli.cmd_accuracy(_args(log=oracle_log, dataset=not_squad, vocab=vocab, cache_dir=tmp_path))
    assert not list(tmp_path.glob("features/*/manifest.json"))


@pytest.mark.slow
def test_cli_subprocess(squad_dev, vocab, session_cache, oracle_log, tmp_path):
    """`python -m distbert accuracy`: exit 0 and one stdout line; a bad log exits 2 with one line."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DISTBERT_CACHE=str(session_cache))
    cmd = [sys.executable, "-m", "distbert", "accuracy", "--log", str(oracle_log),
           "--dataset", str(squad_dev), "--vocab", str(vocab)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and CHECKER_F1.match(done.stdout)
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    cmd[cmd.index("--log") + 1] = str(bad)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("distbert: error: accuracy log")
