"""Attacks on the wire, through real sockets, against a real run.

Each end-to-end test starts rank 0 as the real CLI (`distbert run --listen tcp://127.0.0.1:P
--expect-workers 1`, oracle backend, accuracy mode, paced so the run lasts a few seconds) and one
genuine `distbert worker --connect`; the attacker runs in the test process once the run is under way.
Whatever it does, the run must complete with every sample answered exactly once, the oracle's F1, the
genuine worker doing the work, and rank 0's memory under twice its size before the attack.

Transport-level properties (a forged routing id, the key never on the wire) are tested on the
transport itself, with the real ZeroMQ sockets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from distbert.wire.keys import check_session_key, curve_keys, new_session_key
from distbert.wire.messages import Batch, Bye, Heartbeat, Hello, Ready, Result, Setup, Shutdown, decode, encode
from tests.test_engine_mp import _assert_none_outlived, _direct_oracle_f1, _tagged, env, n_features  # noqa: F401
from tests.wire_peers import RecordingRelay, free_port, key_holder_socket

zmq = pytest.importorskip("zmq")

PY = sys.executable
pytestmark = [pytest.mark.slow]

N = 240          # samples in each run
PACE = "0.1"     # seconds per batch of the oracle: with --max-batch 4 the run takes ~6 s


@dataclass
class LiveRun:
    """Rank 0 (the CLI) and one genuine external worker, both real processes."""

    rank0: subprocess.Popen
    worker: subprocess.Popen
    port: int
    key: str
    out: Path
    logs: Path
    tag: str
    rss_idle: int = 0
    rss_peak: int = 0
    _sampling: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def log(self, who: str = "rank0") -> str:
        return (self.logs / f"{who}.err").read_text(errors="replace")

    def sample_rss(self) -> threading.Thread:
        """Track rank 0's peak RSS in the background until ``finish``."""
        self._sampling = True

        def loop() -> None:
            proc = psutil.Process(self.rank0.pid)
            while self._sampling:
                try:
                    self.rss_peak = max(self.rss_peak, proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.05)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t

    def attack_over(self) -> None:
        """Stop tracking memory (after the attack, before rank 0 scores accuracy, which takes more)."""
        time.sleep(0.5)
        self._sampling = False
        assert self.rank0.poll() is None, "the run ended before the attack did: make the run longer"

    def finish(self, timeout: float = 120) -> dict:
        """Wait for both processes; check the run completed correctly; return run.json."""
        try:
            rc0 = self.rank0.wait(timeout)
            rcw = self.worker.wait(30)
        finally:
            self._sampling = False
            for p in (self.rank0, self.worker):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert rc0 == 0, f"rank 0 exit {rc0}:\n{self.log()[-4000:]}"
        assert rcw == 0, f"worker exit {rcw}:\n{self.log('worker')[-3000:]}"
        _assert_none_outlived(self.tag)
        record = json.loads((self.out / "run.json").read_text())
        entries = json.loads((self.out / "accuracy" / "mlperf_log_accuracy.json").read_text())
        assert sorted(e["qsl_idx"] for e in entries) == list(range(N))   # every sample exactly once
        genuine = [w for w in record["workers"] if w["worker"] == 1]
        assert genuine and genuine[0]["stats"]["samples"] >= 1 and not genuine[0]["lost"]
        return record


@pytest.fixture
def live(env, squad_dev, vocab, tmp_path):  # noqa: F811 - env is the shared fixture imported above
    runs: list[LiveRun] = []

    def start(port: int | None = None, worker_port: int | None = None, pace: str = PACE) -> LiveRun:
        """Rank 0 listening on ``port`` (default: a free one); the worker dials ``worker_port``
        (default: the same; a relay's port to tap the wire)."""
        key = new_session_key()
        e, tag = _tagged(dict(env, DISTBERT_SESSION_KEY=key))
        port = port or free_port()
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        out = tmp_path / "run"
        rank0 = subprocess.Popen(
            [PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab), "--backend", "oracle",
             "--option", f"oracle_latency={pace}", "--max-batch", "4", "--mode", "accuracy",
             "--max-examples", str(N), "--workers", "0", "--expect-workers", "1",
             "--listen", f"tcp://127.0.0.1:{port}", "--output", str(out)],
            env=e, stdout=open(logs / "rank0.out", "w"), stderr=open(logs / "rank0.err", "w"))
        worker = subprocess.Popen(
            [PY, "-m", "distbert", "worker", "--connect", f"tcp://127.0.0.1:{worker_port or port}", "--rank", "1"],
            env=e, stdout=open(logs / "worker.out", "w"), stderr=open(logs / "worker.err", "w"))
        run = LiveRun(rank0, worker, port, key, out, logs, tag)
        runs.append(run)
        deadline = time.monotonic() + 90
        while "worker 1 ready" not in run.log():
            assert rank0.poll() is None, f"rank 0 exited early:\n{run.log()[-3000:]}"
            assert time.monotonic() < deadline, f"worker 1 never became ready:\n{run.log()[-3000:]}"
            time.sleep(0.1)
        time.sleep(0.5)  # the test is under way
        run.rss_idle = psutil.Process(rank0.pid).memory_info().rss
        run.sample_rss()
        return run

    yield start
    for r in runs:
        for p in (r.rank0, r.worker):
            if p.poll() is None:
                p.kill()
                p.wait()


def _oracle_f1_ok(record: dict, squad_dev: Path, vocab: Path, session_cache: Path) -> None:
    f1 = record["results"]["accuracy"]["f1"]
    assert abs(f1 - _direct_oracle_f1(squad_dev, vocab, session_cache, N)) < 1e-9


def _survived(run: LiveRun, squad_dev: Path, vocab: Path, session_cache: Path) -> dict:
    """The attack is over: the run completes correctly, and rank 0's memory stayed bounded."""
    run.attack_over()
    record = run.finish()
    _oracle_f1_ok(record, squad_dev, vocab, session_cache)
    assert run.rss_peak < 2 * run.rss_idle, f"rank 0 grew from {run.rss_idle >> 20} to {run.rss_peak >> 20} MiB"
    return record


class Hostile:
    """A key holder speaking the protocol by hand over a raw CURVE DEALER (no distbert code)."""

    def __init__(self, run: LiveRun, rank: int = 2, routing_id: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = key_holder_socket(self.ctx, run.key, routing_id)
        self.sock.connect(run.address)
        self.rank = rank

    def send(self, msg, within_s: float = 10.0) -> None:
        """Never a blocking send: a socket whose connection libzmq dropped has no pipe, and a blocking
        send would wait for a peer forever."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                self.sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                assert time.monotonic() < deadline, f"could not send {type(msg).__name__} within {within_s} s"
                time.sleep(0.01)

    def recv(self, timeout: float = 10.0):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return decode(self.sock.recv_multipart())

    def hello(self) -> Setup:
        self.send(Hello(self.rank, "hostile", 4242, ""))
        got = self.recv()
        assert isinstance(got, Setup), got
        return got

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# --- end to end: every attack leaves the run complete and correct ---------------------------------


@pytest.mark.timeout(240)
def test_wrong_keys_flood_costs_nothing(live, squad_dev, vocab, session_cache):
    """Peers without the session key (a wrong key, or no encryption at all) hammer rank 0 for 3 s."""
    run = live()
    ctx = zmq.Context()
    wrong = curve_keys(new_session_key())
    attempts = 0
    stop = time.monotonic() + 3.0
    while time.monotonic() < stop:
        batch = []
        for i in range(20):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if i % 2:
                s.setsockopt(zmq.CURVE_SERVERKEY, wrong.server_public)
                s.setsockopt(zmq.CURVE_PUBLICKEY, wrong.worker_public)
                s.setsockopt(zmq.CURVE_SECRETKEY, wrong.worker_secret)
            s.connect(run.address)
            try:  # even the right key in clear is no use; NOBLOCK: a failed handshake drops the socket's
                # pipe, and a blocking send would then wait forever for a peer
                s.send_multipart(encode(Hello(1, "flood", 1, run.key)), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            batch.append(s)
        time.sleep(0.05)
        for s in batch:
            s.close(0)
        attempts += len(batch)
    ctx.term()
    record = _survived(run, squad_dev, vocab, session_cache)
    assert attempts >= 200
    assert "handshake failed" in run.log()
    assert [w["worker"] for w in record["workers"]] == [1]   # no stranger ever became a worker


@pytest.mark.timeout(240)
def test_replayed_hello_gets_nothing_but_setup(live, squad_dev, vocab, session_cache):
    """A key holder says Hello as rank 1 (a restart that never becomes Ready): the genuine worker
    keeps all its work; the newcomer gets its Setup and nothing else."""
    run = live()
    h = Hostile(run, rank=1)
    try:
        h.hello()
        h.send(Heartbeat(1, 1.0))
        h.send(Result(0, np.zeros(1, np.uint64), np.zeros((1, 0, 2), np.float32), 0.0))
        got = [h.recv(1.0) for _ in range(3)]
        assert got == [None, None, None]
        _survived(run, squad_dev, vocab, session_cache)   # the newcomer stays connected to the end
    finally:
        h.close()
    assert "a restart" in run.log()


def _ready(rank: int, max_batch: int = 4, info: str = "{}") -> Ready:
    return Ready(rank, "hostile", "cpu", "null", max_batch, info)


#: each entry: what a hostile worker 2 sends after its Hello (and, for Results, after its first Batch)
BAD = {
    "ready-max-batch-0": [_ready(2, 0)],
    "ready-max-batch-huge": [_ready(2, 1 << 40)],
    "ready-info-not-json": [_ready(2, 4, "{nope")],
    "ready-token-budget-text": [_ready(2, 4, '{"token_budget": "lots"}')],
    "ready-token-budget-negative": [_ready(2, 4, '{"token_budget": -5}')],
    "result-short": ["short"],
    "result-other-ids": ["other-ids"],
    "result-logits-shape": ["logits-shape"],
    "bye-not-json": [_ready(2), "bye"],
}


def _bad_result(kind: str, batch: Batch) -> Result:
    n = len(batch.ids)
    if kind == "short":
        return Result(batch.batch_id, batch.ids[:-1], np.zeros((n - 1, 8, 2), np.float32), 0.0)
    if kind == "other-ids":
        return Result(batch.batch_id, batch.ids + np.uint64(1), np.zeros((n, 8, 2), np.float32), 0.0)
    return Result(batch.batch_id, batch.ids, np.zeros((n, 999, 2), np.float32), 0.0)


@pytest.mark.timeout(300)
def test_every_bad_field_is_a_protocol_error_against_that_worker(live, squad_dev, vocab, session_cache):
    """One connection per bad message, in a single run: each is answered with a protocol-error
    Shutdown (or, for a bad Result, its batch requeued), none reaches LoadGen, and the next
    connection may say Hello again. The genuine worker finishes the run with the right answers."""
    run = live()
    answered = {}
    for name, steps in BAD.items():
        h = Hostile(run)
        try:
            h.hello()
            for step in steps:
                if isinstance(step, Ready):
                    h.send(step)
                elif step == "bye":
                    h.send(Bye(2, "{not json"))
                else:  # a bad Result: be a worker first, wait for a batch, answer it wrongly
                    h.send(_ready(2))
                    batch = _next_batch(h)
                    h.send(_bad_result(step, batch))
            answered[name] = _shutdown_reason(h)
        finally:
            h.close()
    _survived(run, squad_dev, vocab, session_cache)
    assert all(reason.startswith("protocol error") for reason in answered.values()), answered
    assert len(answered) == len(BAD)


def _next_batch(h: Hostile) -> Batch:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msg = h.recv(1.0)
        if isinstance(msg, Batch):
            return msg
    raise AssertionError("the hostile worker got no batch within 20 s")


def _shutdown_reason(h: Hostile) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = h.recv(1.0)
        if isinstance(msg, Shutdown):
            return msg.reason
    return "<no Shutdown>"


@pytest.mark.timeout(240)
def test_oversized_frames_are_cut_off_by_libzmq(live, squad_dev, vocab, session_cache):
    """A key holder sends frames far beyond the run's largest legal message (4 rows here: ~77 KiB):
    libzmq drops the connection without buffering them."""
    run = live()
    h = Hostile(run)
    try:
        h.hello()
        big = b"\0" * (64 << 20)
        for _ in range(4):
            try:
                h.sock.send(big, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass   # the connection was cut for the last one: nothing to send it on
            time.sleep(0.3)
    finally:
        h.close()
    _survived(run, squad_dev, vocab, session_cache)


@pytest.mark.timeout(300)
def test_authenticated_fuzzer_100k_frames(live, squad_dev, vocab, session_cache):
    """A key holder sends 100,000 mutated and random frames (saying Hello again whenever it has been
    dropped): rank 0 never crashes, hangs or corrupts the run."""
    run = live(pace="0.5")   # ~30 s: time for 100k frames through rank 0's Python decoder on 2 cores
    rng = np.random.default_rng(7)
    # No Hello among the seeds: a key holder's Hello and Ready for rank 1 is a legitimate restart of
    # rank 1 (the protocol cannot tell it from one). No Failure: a worker's Failure fails the run by
    # design (the first cause is reported). The fuzzer attacks the decoder and the checks.
    seeds = [encode(m) for m in (Heartbeat(2, 1.0), _ready(2), Result(3, np.arange(4, dtype=np.uint64),
                                                                      np.ones((4, 16, 2), np.float32), 0.1),
                                 Bye(2, "{}"))]
    h = Hostile(run)
    sent = 0
    deadline = time.monotonic() + 26

    def send(frames) -> None:
        while True:   # never block: when rank 0 pushes back (its receive HWM), wait a little
            try:
                h.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                assert time.monotonic() < deadline, f"only {sent} frames went out in time"
                time.sleep(0.001)

    try:
        while sent < 100_000:
            if sent % 500 == 0:   # say Hello again: a dropped peer is a stranger, whose frames are not parsed
                send(encode(Hello(2, "fz", 1, "")))
                while h.sock.poll(0):
                    h.sock.recv_multipart()
            frames = [bytearray(bytes(f)) for f in seeds[int(rng.integers(len(seeds)))]]
            j = int(rng.integers(len(frames)))
            r = rng.random()
            if r < 0.6 and len(frames[j]):
                for _ in range(int(rng.integers(1, 4))):
                    frames[j][int(rng.integers(len(frames[j])))] = int(rng.integers(256))
            elif r < 0.8:
                frames[j] = frames[j][: int(rng.integers(len(frames[j]) + 1))]
            elif r < 0.9:
                frames.append(bytearray(rng.bytes(int(rng.integers(0, 64)))))
            else:
                frames = [bytearray(rng.bytes(int(rng.integers(0, 32))))]
            send(frames)
            sent += 1
    finally:
        h.close()
    _survived(run, squad_dev, vocab, session_cache)


@pytest.mark.timeout(240)
def test_wire_capture_shows_no_key_no_config_no_logits(live, squad_dev, vocab, session_cache):
    """The genuine worker talks to rank 0 through a relay that records every byte: neither the
    session key, nor the Setup's text, nor a logit of the oracle appears in the capture."""
    real_port = free_port()
    relay = RecordingRelay(("127.0.0.1", real_port))   # rank 0 is not up yet: the relay dials per connection
    run = live(port=real_port, worker_port=relay.port)
    record = run.finish()
    relay.close()
    _oracle_f1_ok(record, squad_dev, vocab, session_cache)
    wire = bytes(relay.captured)
    from distbert.backends.harness import oracle_logits
    from distbert.data.squad.features import load_features

    store = load_features(squad_dev, vocab, cache_dir=session_cache)
    assert len(wire) > int(store.lengths[:N].sum()) * 2 * 4   # every logit went through the relay...
    for secret in (run.key.encode(), bytes.fromhex(run.key), b"features_path", str(squad_dev).encode()):
        assert secret not in wire        # ...but none of this in clear
    length = int(store.lengths[0])
    start, _ = oracle_logits(np.array([0]), length, store.oracle_start, store.oracle_end)
    assert np.asarray(start[0], np.float32)[:16].tobytes() not in wire


# --- transport level ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_forged_routing_id_gets_no_traffic():
    """A second connection presenting a live worker's routing id (with or without the key) neither
    receives its batches nor speaks for it: no handover, the connection is the identity."""
    from distbert.wire import Endpoint
    from distbert.wire.zmq import ZmqCoordinatorTransport, ZmqWorkerTransport

    key = new_session_key()
    coord = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:0", key)
    genuine = ZmqWorkerTransport.connect(Endpoint(coord.endpoint.address, key), 1)
    ctx = zmq.Context()
    try:
        got = coord.recv(5)
        assert got is not None and got[0] == 1
        ident = genuine._sock.getsockopt(zmq.ROUTING_ID)
        insider = key_holder_socket(ctx, key, ident)
        outsider = key_holder_socket(ctx, new_session_key(), ident)
        for s in (insider, outsider):
            s.connect(coord.endpoint.address)
            s.send_multipart(encode(Heartbeat(1, 99.0)))
        time.sleep(0.5)
        for i in range(5):
            coord.send(1, Batch(i, False, np.arange(2, dtype=np.uint64), np.arange(2)))
        assert [genuine.recv(5).batch_id for _ in range(5)] == list(range(5))
        assert not insider.poll(300) and not outsider.poll(10)
        genuine.send(Heartbeat(1, 1.0))
        assert coord.recv(5) == (1, Heartbeat(1, 1.0))
        assert coord.recv(0.3) is None   # the forged heartbeats never arrived
    finally:
        ctx.destroy(0)
        genuine.close()
        coord.close()


@pytest.mark.timeout(60)
def test_a_worker_with_the_wrong_key_stops_with_one_clear_line():
    from distbert.wire import Endpoint
    from distbert.wire.zmq import HandshakeFailed, ZmqCoordinatorTransport, ZmqWorkerTransport

    coord = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:0", new_session_key())
    w = ZmqWorkerTransport.connect(Endpoint(coord.endpoint.address, new_session_key()), 3)
    try:
        t0 = time.monotonic()
        with pytest.raises(HandshakeFailed, match="session key is not rank 0's"):
            while time.monotonic() - t0 < 20:
                coord.recv(0.05)
                w.recv(0.1)
        assert time.monotonic() - t0 < 10
        assert coord.recv(0.2) is None
    finally:
        w.close()
        coord.close()


@pytest.mark.parametrize("key,ok", [("ab" * 16, True), ("ab" * 15, False), ("not hex at all, long enough!!!!!!", False),
                                    ("  " + "0f" * 32 + "\n", True)])
def test_session_keys_below_128_bits_are_refused(key, ok):
    from distbert.errors import UserError

    if ok:
        assert len(check_session_key(key, "X")) >= 32
    else:
        with pytest.raises(UserError, match="session key in X"):
            check_session_key(key, "X")


def test_a_120_bit_key_padded_with_spaces_to_32_characters_is_refused():
    """30 hex digits and two spaces: 32 characters, which a count of the text took for 128 bits
    (``bytes.fromhex`` skips the spaces). Whitespace inside a key is refused in one line, and the
    same 120 bits without the spaces are refused for their count."""
    from distbert.errors import UserError

    padded = "ab" * 7 + " " + "ab" * 4 + " " + "ab" * 4
    assert len(padded) == 32 and len(bytes.fromhex(padded)) == 15
    with pytest.raises(UserError) as caught:
        check_session_key(padded, "X")
    assert str(caught.value).count("\n") == 0 and "whitespace inside" in str(caught.value)
    with pytest.raises(UserError, match="has 120 bits, fewer than the 128"):
        check_session_key(padded.replace(" ", ""), "X")
    with pytest.raises(UserError, match="whitespace inside"):
        curve_keys(padded + "abab")   # the transports refuse it too, whoever calls them


def test_upper_and_lower_case_of_one_key_are_one_key_and_interoperate():
    """The CURVE keys come from the key's bytes: both spellings give the same keys, a worker given
    the upper-case form completes the handshake with a rank 0 given the lower-case one (real
    sockets), and check_session_key hands both on in one canonical form."""
    from distbert.wire import Endpoint
    from distbert.wire.zmq import ZmqCoordinatorTransport, ZmqWorkerTransport

    lower = new_session_key()
    upper = lower.upper()
    assert upper != lower and curve_keys(upper) == curve_keys(lower)
    assert curve_keys(lower) != curve_keys(new_session_key())
    assert check_session_key(upper + "\n", "X") == check_session_key(lower, "Y") == lower
    coord = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:0", lower)
    w = ZmqWorkerTransport.connect(Endpoint(coord.endpoint.address, upper), 3)
    try:
        got = coord.recv(10)
        assert got is not None and got[0] == 3 and isinstance(got[1], Hello), got
        coord.send(3, Setup("{}"))
        assert isinstance(w.recv(10), Setup)
    finally:
        w.close()
        coord.close()


def test_cli_refuses_a_short_key_before_anything_starts(env, tmp_path):  # noqa: F811
    e = dict(env, DISTBERT_SESSION_KEY="secret")
    proc = subprocess.run([PY, "-m", "distbert", "worker", "--connect", "tcp://127.0.0.1:9", "--rank", "1"],
                          env=e, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("distbert: error: the session key in DISTBERT_SESSION_KEY")


def test_distbert_key_writes_an_owner_only_file(env, tmp_path):  # noqa: F811
    out = tmp_path / "session.key"
    subprocess.run([PY, "-m", "distbert", "key", "--out", str(out)], env=env, check=True, timeout=60)
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert len(check_session_key(out.read_text(), "file")) == 64
    again = subprocess.run([PY, "-m", "distbert", "key", "--out", str(out)], env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("encrypt", [True, False])
def test_capture_control_plaintext_is_seen_and_curve_hides_it(encrypt):
    """The capture check can fail: without CURVE (possible only through the Python API) the same tap
    reads the key, the Setup and the logits; with CURVE it reads none of them."""
    from distbert.wire import Endpoint
    from distbert.wire.zmq import ZmqCoordinatorTransport, ZmqWorkerTransport

    key = new_session_key()
    coord = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:0", key, encrypt=encrypt)
    port = int(coord.endpoint.address.rsplit(":", 1)[1])
    relay = RecordingRelay(("127.0.0.1", port))
    w = ZmqWorkerTransport.connect(Endpoint(f"tcp://127.0.0.1:{relay.port}", key), 1, encrypt=encrypt)
    logits = np.random.default_rng(1).standard_normal((8, 128, 2)).astype(np.float32)
    try:
        assert coord.recv(5)[0] == 1
        coord.send(1, Setup('{"features_path": "/secret/place"}'))
        assert isinstance(w.recv(5), Setup)
        w.send(Result(1, np.arange(8, dtype=np.uint64), logits, 0.0))
        assert coord.recv(5)[1] == Result(1, np.arange(8, dtype=np.uint64), logits, 0.0)
    finally:
        w.close()
        coord.close()
        relay.close()
    wire = bytes(relay.captured)
    seen = [s in wire for s in (key.encode(), b"/secret/place", logits[3].tobytes()[:64])]
    assert seen == ([False] * 3 if encrypt else [True] * 3)
