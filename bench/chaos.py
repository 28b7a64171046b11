"""Chaos run: rank 0 plus K workers on namespace hosts, a seeded fault every few seconds, then a checker.

Hosts are Linux network namespaces on a bridge (``tests/netns.py``): rank 0 (`distbert run --listen
tcp://<host 0>:P --workers 0 --expect-workers K`, oracle backend paced by ``oracle_latency``) on
host 0, `distbert worker --connect` on hosts 1..K (session key from a 0600 file, CURVE on the wire).
A seeded schedule injects one fault every ``--every`` seconds for ``--duration`` seconds (or until
the run ends), the kinds taken in shuffled rounds so each appears as often as the others:

  kill      SIGKILL a worker, restart it with its rank at once
  kill-2s   SIGKILL a worker, restart it 2 s later
  stop-3s   SIGSTOP a worker, SIGCONT 3 s later
  cut-5s    its switch port down for 5 s (packets vanish: no RST, no ICMP)
  loss-2s   20 % of its packets dropped for 2 s (nftables ``numgen random``; needs ``nft``)
  kill-all  SIGKILL every worker, restart them all 1 s later
  hog       two busy processes (one per core of a 2-vCPU VM) on rank 0's host for 5 s

Each fault's recovery timeline comes from rank 0: its log lines, stamped by this script as they
arrive on the pipe (the log's own clock has whole seconds), and its ``DISTBERT_TRACE`` rows
(CLOCK_MONOTONIC, the clock this script uses): fault -> loss declared (``lost worker N`` or ``hello
again from worker N``) -> first batch sent again (a send whose first response id was sent before:
requeued or hedged) -> the worker at work again (rank 0's first result from it after the fault ended).
"recovery" is fault -> at work again; for ``hog`` (no worker hit) it is fault -> the last query of the
window over the latency bound has been answered.

The checker: rank 0 exits 0; an accuracy test's log holds every sample exactly once and its F1
equals the oracle's F1 scored directly; a performance test completed every issued sample (LoadGen's
query count) with no LoadGen error; LoadGen's verdict and slowest query (detail log). Writes
``<out>/chaos-<date>-<label>.json`` (the schedule, each fault's timeline, the checks) and a PNG of
throughput over time with the faults marked. Exit 0 when every check passed, 1 when one failed.

    sudo .venv/bin/python bench/chaos.py --workers 4 --scenario Server --find-peak --duration 600 \\
        --every 15 --kinds kill,kill-2s,stop-3s,cut-5s,loss-2s --mode both --perf-seconds 600

Root only (namespaces, nftables). Nothing is added outside the namespaces it makes; every process it
started is killed and every namespace deleted at the end, also on Ctrl-C, SIGTERM or a failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distbert.data.loadgen_logs import read_detail  # noqa: E402 - the repo root is put on sys.path above
from distbert.util.trace import STAGES  # noqa: E402
from tests import netns  # noqa: E402

PY = sys.executable
PORT = 5555
KINDS = ("kill", "kill-2s", "stop-3s", "cut-5s", "loss-2s", "kill-all", "hog")
SINGLE_HOST = ("kill", "kill-2s", "stop-3s", "cut-5s", "loss-2s")
#: how long each fault lasts (s): a schedule's --every must leave room after the longest
FAULT_S = {"kill": 0.0, "kill-2s": 2.0, "stop-3s": 3.0, "cut-5s": 5.0, "loss-2s": 2.0, "kill-all": 1.0, "hog": 5.0}
LOSS_PERCENT = 20
NFT_TABLE = "distbert_chaos"
SERVER_BOUND_S = 0.130       # MLPerf's Server latency bound for BERT
BIN_S = 1.0                  # throughput plot bins
_CODE = {name: i for i, name in enumerate(STAGES)}


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ------------------------------------------------------------------------------------------ cluster

@dataclass
class Fault:
    index: int
    kind: str
    targets: list[int]           # worker ranks hit ([] for hog)
    start: float                 # time.monotonic() when it hit
    end: float = 0.0             # when its action ended (restart spawned, SIGCONT, link back, ...)
    timeline: dict[str, Any] = field(default_factory=dict)


class Cluster:
    """Rank 0 and the workers on namespace hosts; every process it starts, for the cleanup."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        from distbert.wire.keys import new_session_key

        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True)
        self.trace_dir = work / "trace"
        self.trace_dir.mkdir()
        self.key_file = work / "session.key"
        key = new_session_key()
        self.key_file.write_text(key + "\n")
        self.key_file.chmod(0o600)
        self.env = dict(os.environ, DISTBERT_NO_PROGRESS="1", PYTHONPATH=str(REPO))
        self.env.pop("DISTBERT_SESSION_KEY", None)
        self.env.pop("DISTBERT_TRACE", None)
        self.rank0_env = dict(self.env, DISTBERT_SESSION_KEY=key, DISTBERT_TRACE=str(self.trace_dir))
        self.lan = netns.Lan(args.workers + 1)
        say(f"hosts: namespaces {', '.join(self.lan.names)} on switch {self.lan.switch}")
        self.rank0: subprocess.Popen | None = None
        self.workers: dict[int, subprocess.Popen] = {}
        self.others: list[subprocess.Popen] = []         # the hog fault's busy processes
        self.stopped: set[int] = set()
        self.lines: list[tuple[float, str]] = []         # rank 0's stderr, stamped on arrival
        self._reader: threading.Thread | None = None
        self._generation: dict[int, int] = {}
        self.rss: list[tuple[float, float]] = []         # (s since the first test, rank 0's RSS in MB)
        self.load: list[tuple[float, float]] = []        # (s since the first test, the machine's 1-min load)

    # --- processes

    def start_rank0(self, run_args: list[str], out: Path) -> None:
        a = self.args
        cmd = [PY, "-m", "distbert", "run", "--backend", "oracle", "--option", f"oracle_latency={a.latency}",
               "--max-batch", str(a.max_batch), "--workers", "0", "--expect-workers", str(a.workers),
               "--listen", f"tcp://{self.lan.address(0)}:{PORT}", "--rejoin-timeout", str(a.rejoin_timeout),
               *data_args(a), *run_args, "--output", str(out)]
        self.rank0 = subprocess.Popen(self.lan.cmd(0, cmd), env=self.rank0_env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        self.lines = []
        log = open(self.logs / f"rank0-{out.name}.log", "w")
        self._reader = threading.Thread(target=self._read, args=(self.rank0.stderr, log), daemon=True)
        self._reader.start()

    def _read(self, pipe: IO[bytes], log: IO[str]) -> None:
        t0 = time.monotonic()
        with log:
            for raw in pipe:
                now = time.monotonic()
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append((now, line))
                log.write(f"+{now - t0:9.3f} {line}\n")
                log.flush()

    def start_worker(self, rank: int) -> None:
        gen = self._generation.get(rank, 0)
        self._generation[rank] = gen + 1
        cmd = [PY, "-m", "distbert", "worker", "--connect", f"tcp://{self.lan.address(0)}:{PORT}",
               "--rank", str(rank), "--key-file", str(self.key_file)]
        err = open(self.logs / f"worker{rank}-{gen}.log", "w")
        self.workers[rank] = subprocess.Popen(self.lan.cmd(rank, cmd), env=self.env, stdout=subprocess.DEVNULL,
                                              stderr=err)
        err.close()

    def kill_worker(self, rank: int) -> None:
        p = self.workers[rank]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)   # `ip netns exec` execs the command: this is the worker's pid
        p.wait(10)
        self.stopped.discard(rank)

    def hog(self, seconds: float, procs: int = 2) -> None:
        code = f"import time\nt = time.monotonic() + {seconds}\nwhile time.monotonic() < t: pass\n"
        for _ in range(procs):
            self.others.append(subprocess.Popen(self.lan.cmd(0, [PY, "-c", code]), env=self.env))

    def loss(self, rank: int, on: bool) -> None:
        ns = self.lan.names[rank]
        if on:
            rules = (f"table inet {NFT_TABLE} {{\n"
                     f" chain in {{ type filter hook input priority 0; policy accept;"
                     f" iifname \"eth0\" numgen random mod 100 < {LOSS_PERCENT} drop; }}\n"
                     f" chain out {{ type filter hook output priority 0; policy accept;"
                     f" oifname \"eth0\" numgen random mod 100 < {LOSS_PERCENT} drop; }}\n}}\n")
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True,
                           capture_output=True, timeout=30)
        else:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", NFT_TABLE], check=True,
                           capture_output=True, timeout=30)

    def sample_rss(self, at: float) -> None:
        """Rank 0's resident memory now (MB), for the report: it must stay flat through the faults."""
        import psutil

        self.load.append((round(at, 1), round(os.getloadavg()[0], 2)))
        try:
            if self.rank0 is not None:
                self.rss.append((round(at, 1), round(psutil.Process(self.rank0.pid).memory_info().rss / 2**20, 1)))
        except psutil.NoSuchProcess:
            pass

    def rank0_alive(self) -> bool:
        return self.rank0 is not None and self.rank0.poll() is None

    def wait_line(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for _, line in self.lines):
                return True
            if not self.rank0_alive():
                return False
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Kill what is left, undo every fault, delete the namespaces. Safe to call twice."""
        for rank in list(self.stopped):
            _signal(self.workers.get(rank), signal.SIGCONT)
        for p in [self.rank0, *self.workers.values(), *self.others]:
            if p is not None and p.poll() is None:
                p.kill()
        for p in [self.rank0, *self.workers.values(), *self.others]:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        if self._reader is not None:
            self._reader.join(5)
        self.lan.close()


def _signal(p: subprocess.Popen | None, sig: int) -> None:
    if p is not None and p.poll() is None:
        p.send_signal(sig)


def data_args(a: argparse.Namespace) -> list[str]:
    out = []
    if a.dataset:
        out += ["--dataset", str(a.dataset)]
    if a.vocab:
        out += ["--vocab", str(a.vocab)]
    if a.max_examples:
        out += ["--max-examples", str(a.max_examples)]
    return out


# ------------------------------------------------------------------------------------------ faults

def schedule(kinds: list[str], count: int, workers: int, seed: int) -> list[tuple[str, list[int]]]:
    """``count`` faults: the kinds in shuffled rounds, each single-host one on a random worker."""
    rng = random.Random(seed)
    out: list[tuple[str, list[int]]] = []
    while len(out) < count:
        round_ = list(kinds)
        rng.shuffle(round_)
        for kind in round_:
            targets = list(range(1, workers + 1)) if kind == "kill-all" else [] if kind == "hog" \
                else [rng.randint(1, workers)]
            out.append((kind, targets))
    return out[:count]


def inject(c: Cluster, fault: Fault, pause: Any) -> None:
    """Carry ``fault`` out; ``pause(s)`` sleeps while showing progress. Sets ``fault.end``."""
    kind, targets = fault.kind, fault.targets
    fault.start = time.monotonic()
    if kind in ("kill", "kill-2s", "kill-all"):
        for r in targets:
            c.kill_worker(r)
        pause(FAULT_S[kind])
        for r in targets:
            c.start_worker(r)
    elif kind == "stop-3s":
        r = targets[0]
        _signal(c.workers[r], signal.SIGSTOP)
        c.stopped.add(r)
        pause(FAULT_S[kind])
        _signal(c.workers[r], signal.SIGCONT)
        c.stopped.discard(r)
    elif kind == "cut-5s":
        c.lan.cut(targets[0])
        pause(FAULT_S[kind])
        c.lan.restore(targets[0])
    elif kind == "loss-2s":
        c.loss(targets[0], True)
        pause(FAULT_S[kind])
        c.loss(targets[0], False)
    elif kind == "hog":
        c.hog(FAULT_S[kind])
        pause(FAULT_S[kind])
    else:
        raise ValueError(kind)
    fault.end = time.monotonic()


# ------------------------------------------------------------------------------------------ analysis

@dataclass
class Trace:
    """Rank 0's trace rows of one LoadGen test, by stage: (key, aux, t seconds) arrays."""
    rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, folder: Path, t_from: float, t_to: float) -> Trace:
        files = sorted(folder.glob("trace-*.npy"))
        arr = np.concatenate([np.load(f) for f in files]) if files else np.zeros((0, 4), np.int64)
        t = arr[:, 3] / 1e9 if len(arr) else np.zeros(0)
        keep = (t >= t_from) & (t < t_to)
        arr, t = arr[keep], t[keep]
        order = np.argsort(t, kind="stable")
        arr, t = arr[order], t[order]
        rows = {}
        for name, code in _CODE.items():
            m = arr[:, 0] == code
            rows[name] = (arr[m, 1], arr[m, 2], t[m])
        return cls(rows)

    def batches(self) -> dict[str, np.ndarray]:
        """Per completed batch: completion time, samples, oldest sample's latency, re-sent or not."""
        s_key, s_first, s_t = self.rows["send"]
        c_key, c_n, c_t = self.rows["complete"]
        i_key, _, i_t = self.rows["issue"]
        issue_t = dict(zip(i_key.tolist(), i_t.tolist()))
        first = dict(zip(s_key.tolist(), s_first.tolist()))       # batch ids are unique within a test
        seen: set[int] = set()
        resent_ids: set[int] = set()
        resend_t: list[float] = []
        for key, fid, t in zip(s_key.tolist(), s_first.tolist(), s_t.tolist()):
            if fid in seen:
                resent_ids.add(key)
                resend_t.append(t)
            seen.add(fid)
        lat = np.array([t - issue_t.get(first.get(k, -1), np.nan) for k, t in zip(c_key.tolist(), c_t.tolist())])
        return {"t": c_t, "n": c_n, "latency": lat, "resent": np.array([k in resent_ids for k in c_key.tolist()]),
                "resend_t": np.array(resend_t)}


def first_after(times: np.ndarray, after: float, before: float) -> float | None:
    hit = times[(times > after) & (times < before)]
    return float(hit.min()) if len(hit) else None


def fault_timeline(f: Fault, until: float, lines: list[tuple[float, str]], recv: tuple[np.ndarray, np.ndarray],
                   b: dict[str, np.ndarray], bound: float) -> dict[str, Any]:
    """``f``'s recovery (seconds after the fault) from rank 0's log lines and trace, up to ``until``:
    ``recv`` = (worker, time) of every result rank 0 got, whichever test it was in (a fault can outlast
    its test); ``b`` = the batches of the test the fault began in."""
    out: dict[str, Any] = {"kind": f.kind, "targets": f.targets, "fault_lasted_s": round(f.end - f.start, 3)}

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - f.start, 3)

    window = [(t, line) for t, line in lines if f.start <= t < until]
    declared: list[float] = []
    for r in f.targets:
        hits = [t for t, line in window if f"lost worker {r} " in line or f"hello again from worker {r} " in line]
        if hits:
            declared.append(hits[0])
    out["loss_declared_s"] = rel(max(declared)) if f.targets and len(declared) == len(f.targets) else None
    out["loss_lines"] = [f"+{t - f.start:.3f} {line.split(': ', 1)[-1]}" for t, line in window
                         if any(w in line for w in ("lost worker", "hello again", "ready again", "heard from again",
                                                    "every worker", "no worker", "requeue", "hedge", "rejoin"))][:12]
    out["first_resend_s"] = rel(first_after(b["resend_t"], f.start, until))
    r_worker, r_t = recv
    back: list[float] = []
    for r in f.targets:
        t = first_after(r_t[r_worker == r], f.end, until)
        if t is not None:
            back.append(t)
    out["at_work_s"] = rel(max(back)) if f.targets and len(back) == len(f.targets) else None
    in_win = (b["t"] >= f.start) & (b["t"] < until)
    lat = b["latency"][in_win]
    lat = lat[~np.isnan(lat)]
    out["slowest_query_s"] = round(float(lat.max()), 4) if len(lat) else None
    over = b["t"][in_win][b["latency"][in_win] > bound]
    out["tail_cleared_s"] = rel(float(over.max())) if len(over) else 0.0
    out["samples_resent"] = int(b["n"][in_win & b["resent"]].sum())
    out["recovery_s"] = out["at_work_s"] if f.targets else out["tail_cleared_s"]
    return out


def direct_oracle_f1(dataset: Path | None, vocab: Path | None, n: int | None) -> tuple[float, int]:
    """The F1 of the oracle's logits scored directly (what an exactly-once run must report), and N."""
    from distbert.backends.harness import oracle_logits
    from distbert.data.artifacts import resolve_squad
    from distbert.data.squad.accuracy import score_logits
    from distbert.data.squad.features import load_features

    ds, voc = resolve_squad(dataset, vocab)
    store = load_features(ds, voc)
    n = min(n or len(store), len(store))
    logits = {}
    for i in range(n):
        s, e = oracle_logits(np.array([i]), int(store.lengths[i]), store.oracle_start, store.oracle_end)
        logits[i] = np.stack([s[0], e[0]], axis=-1)
    return score_logits(store, logits).f1, n


def check_run(out: Path, rc: int, expect_f1: float | None, n: int) -> dict[str, Any]:
    """The checker over a finished run directory."""
    checks: dict[str, Any] = {"rank0_exit": rc}
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    results = record.get("results", {})
    acc_log = out / "accuracy" / "mlperf_log_accuracy.json"
    if acc_log.is_file():
        idx = sorted(e["qsl_idx"] for e in json.loads(acc_log.read_text()))
        checks["accuracy"] = {
            "entries": len(idx), "samples": n,
            "exactly_once": idx == list(range(n)),
            "missing": len(set(range(n)) - set(idx)), "repeated": len(idx) - len(set(idx)),
            "f1": results.get("accuracy", {}).get("f1"), "f1_direct": expect_f1,
            "f1_exact": expect_f1 is not None and results.get("accuracy", {}).get("f1") is not None
            and abs(results["accuracy"]["f1"] - expect_f1) < 1e-9,
            "loadgen_errors": results.get("accuracy", {}).get("loadgen_errors")}
    perf = out / "performance" / "mlperf_log_detail.txt"
    if perf.is_file():
        d = read_detail(perf)
        disp = results.get("performance", {}).get("dispatcher", {})
        queries = d.get("result_query_count") or d.get("generated_query_count")
        checks["performance"] = {
            "verdict": d.get("result_validity"),
            "queries": queries,
            "samples_issued": disp.get("samples_issued"), "samples_completed": disp.get("samples_completed"),
            "all_completed": queries is not None and disp.get("samples_completed") == disp.get("samples_issued")
            and disp.get("samples_aborted", 0) == 0,
            "loadgen_errors": len(d.get("_errors", [])),
            "slowest_query_s": _ns(d.get("result_max_latency_ns")),
            "p99_s": _ns(d.get("result_99.00_percentile_latency_ns")),
            "mean_s": _ns(d.get("result_mean_latency_ns")),
            "samples_per_s": d.get("result_completed_samples_per_sec") or d.get("result_samples_per_second"),
            "requeued_samples": disp.get("requeued_samples"), "duplicates_dropped": disp.get("duplicates_dropped")}
    ok = rc == 0
    if "accuracy" in checks:
        a = checks["accuracy"]
        ok = ok and a["exactly_once"] and a["f1_exact"] and a["loadgen_errors"] == 0
    if "performance" in checks:
        p = checks["performance"]
        ok = ok and p["all_completed"] and p["loadgen_errors"] == 0
    checks["passed"] = bool(ok)
    return checks


def _ns(v: Any) -> float | None:
    return None if v is None else round(v / 1e9, 4)


def summarize(faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fault kind: count, median and max recovery (and each step), samples re-sent, slowest query."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        rows = [f for f in faults if f["kind"] == kind]
        if not rows:
            continue

        def stat(key: str, rows: list[dict[str, Any]] = rows) -> dict[str, Any]:
            vals = [r[key] for r in rows if r.get(key) is not None]
            return {"median": round(statistics.median(vals), 3) if vals else None,
                    "max": round(max(vals), 3) if vals else None, "seen": len(vals)}

        out[kind] = {"count": len(rows), "recovery_s": stat("recovery_s"), "loss_declared_s": stat("loss_declared_s"),
                     "first_resend_s": stat("first_resend_s"), "at_work_s": stat("at_work_s"),
                     "samples_resent": sum(r["samples_resent"] for r in rows),
                     "slowest_query_s": stat("slowest_query_s")["max"]}
    return out


def plot(path: Path, tests: list[dict[str, Any]], faults: list[Fault], t0: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(KINDS, ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "black", "tab:olive")))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for test in tests:
        b = test["batches"]
        if not len(b["t"]):
            continue
        edges = np.arange(test["t_from"], max(b["t"].max(), test["t_from"]) + BIN_S, BIN_S)
        done, _ = np.histogram(b["t"], bins=edges, weights=b["n"])
        ax.step(edges[:-1] - t0, done / BIN_S, where="post", lw=0.9, label=f"{test['name']}: completed samples/s")
        issued = test["issue_t"]
        if test["scenario"] == "Server" and len(issued):
            arr, _ = np.histogram(issued, bins=edges)
            ax.step(edges[:-1] - t0, arr / BIN_S, where="post", lw=0.6, alpha=0.6, label=f"{test['name']}: issued/s")
            ok = ~np.isnan(b["latency"])
            ax2.scatter(b["t"][ok] - t0, b["latency"][ok], s=2, alpha=0.5)
    seen: set[str] = set()
    for f in faults:
        for a in (ax, ax2):
            a.axvspan(f.start - t0, max(f.end, f.start + 0.3) - t0, color=colors[f.kind], alpha=0.25,
                      label=f.kind if a is ax and f.kind not in seen else None)
        seen.add(f.kind)
        ax.text(f.start - t0, 1.0, f" {f.kind} {','.join(map(str, f.targets))}", transform=ax.get_xaxis_transform(),
                rotation=90, va="top", ha="right", fontsize=6)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("samples/s")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    ax.set_title(title, fontsize=9)
    ax2.set_yscale("log")
    ax2.axhline(SERVER_BOUND_S, color="gray", ls="--", lw=0.8)
    ax2.set_ylabel("oldest query of each\nbatch: latency [s]")
    ax2.set_xlabel("seconds since the first test started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ driver

def find_peak(c: Cluster, work: Path) -> float:
    """The highest Server QPS LoadGen calls VALID on this cluster without faults (`--find-peak`)."""
    out = work / "peak"
    say("finding the no-fault Server peak (distbert run --find-peak) ...")
    c.start_rank0(["--scenario", "Server", "--mode", "performance", "--find-peak", "--find-peak-probe-s",
                   str(c.args.peak_probe_s), "--target-qps", "100", "--test-query-count", "200"], out)
    for r in range(1, c.args.workers + 1):
        c.start_worker(r)
    assert c.rank0 is not None
    rc = c.rank0.wait(1800)
    for p in c.workers.values():
        p.wait(60)
    if rc != 0:
        raise SystemExit(f"chaos: the --find-peak run failed (exit {rc}); see {c.logs}")
    peak = json.loads((out / "run.json").read_text())["results"]["find_peak"]["best_valid_qps"]
    say(f"no-fault Server peak: {peak:.1f} QPS")
    return float(peak)


def run_args(a: argparse.Namespace, qps: float | None) -> list[str]:
    out = ["--scenario", a.scenario, "--mode", a.mode]
    if a.scenario == "Server":
        assert qps is not None
        out += ["--target-qps", f"{qps:g}", "--test-query-count", str(max(100, int(qps * a.perf_seconds)))]
    else:
        out += ["--test-query-count", str(a.offline_samples)]
    return out


def drive(c: Cluster, a: argparse.Namespace, plan: list[tuple[str, list[int]]], run_dir: Path, qps: float | None,
          t_limit: float) -> tuple[int, list[Fault], float]:
    """Start the run, inject ``plan`` once the first test has begun, wait for the end."""
    c.start_rank0(run_args(a, qps), run_dir)
    for r in range(1, a.workers + 1):
        c.start_worker(r)
    if not c.wait_line("test starting", 300):
        raise SystemExit(f"chaos: rank 0 never started a test; its log: {c.logs}")
    t0 = time.monotonic()
    say(f"first test started; {len(plan)} faults, one every {a.every:g} s")
    last_progress = [0.0]

    def pause(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if time.monotonic() - last_progress[0] > 10:
                last_progress[0] = time.monotonic()
                c.sample_rss(last_progress[0] - t0)
                prog = [line for _, line in c.lines if "progress:" in line or "test done" in line]
                say(f"t={time.monotonic() - t0:5.0f} s  {prog[-1].split(': ', 1)[-1][:150] if prog else ''}")
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    faults: list[Fault] = []
    for i, (kind, targets) in enumerate(plan):
        due = t0 + a.every * (i + 1)
        while time.monotonic() < due and c.rank0_alive():
            pause(min(0.5, due - time.monotonic()))
        if not c.rank0_alive() or time.monotonic() > t_limit:
            break
        f = Fault(i, kind, targets, start=time.monotonic())
        say(f"fault {i + 1}/{len(plan)} at t={f.start - t0:.1f} s: {kind} {targets or 'rank 0 host'}")
        inject(c, f, pause)
        faults.append(f)
    while c.rank0_alive() and time.monotonic() < t_limit:
        pause(0.5)
    if c.rank0_alive():
        say("rank 0 ran past the time limit: killing it")
        assert c.rank0 is not None
        c.rank0.kill()
    assert c.rank0 is not None
    rc = c.rank0.wait(30)
    for p in c.workers.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    say(f"rank 0 exited {rc}")
    return rc, faults, t0


def analyse(c: Cluster, a: argparse.Namespace, faults: list[Fault], t0: float, rc: int, run_dir: Path,
            expect_f1: float | None, n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    starts = [(t, line) for t, line in c.lines if "test starting" in line]
    ends = [t for t, line in c.lines if "test done" in line]
    tests = []
    for k, (t_from, line) in enumerate(starts):
        t_to = ends[k] + 0.5 if k < len(ends) else time.monotonic()
        name = "accuracy" if " accuracy test" in line else "performance"
        tr = Trace.load(c.trace_dir, t_from, t_to)
        tests.append({"name": name, "scenario": a.scenario, "t_from": t_from, "t_to": t_to, "trace": tr,
                      "batches": tr.batches(), "issue_t": tr.rows["issue"][2]})
    timelines = []
    recv = (np.concatenate([t["trace"].rows["recv"][1] for t in tests]) if tests else np.zeros(0),
            np.concatenate([t["trace"].rows["recv"][2] for t in tests]) if tests else np.zeros(0))
    for i, f in enumerate(faults):
        until = faults[i + 1].start if i + 1 < len(faults) else time.monotonic()
        test = next((t for t in tests if t["t_from"] <= f.start < t["t_to"]), tests[-1] if tests else None)
        if test is None:
            continue
        bound = SERVER_BOUND_S if a.scenario == "Server" else float("inf")
        f.timeline = fault_timeline(f, until, c.lines, recv, test["batches"], bound)
        f.timeline.update(index=i, test=test["name"], at_s=round(f.start - t0, 3))
        timelines.append(f.timeline)
    checks = check_run(run_dir, rc, expect_f1, n)
    for name in ("accuracy", "performance"):
        if name in checks:
            checks[name]["run_s"] = next((round(t["t_to"] - t["t_from"], 1) for t in tests if t["name"] == name),
                                         None)
    return checks, tests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="worker hosts (default 4)")
    p.add_argument("--scenario", default="Server", choices=["Server", "Offline"])
    p.add_argument("--mode", default="both", choices=["performance", "accuracy", "both"],
                   help="LoadGen tests (both: performance, then accuracy; default both)")
    p.add_argument("--qps", type=float, help="Server target QPS (default: --qps-fraction x the no-fault peak)")
    p.add_argument("--peak", type=float, help="the no-fault Server peak QPS, if known (default: measured first, "
                   "without faults, by `distbert run --find-peak` on the same hosts)")
    p.add_argument("--find-peak", action="store_true", help="measure the peak even with --qps (for the report)")
    p.add_argument("--peak-probe-s", type=float, default=10.0, help="seconds per --find-peak probe")
    p.add_argument("--qps-fraction", type=float, default=0.5, help="Server QPS = this x the peak (default 0.5)")
    p.add_argument("--perf-seconds", type=float, default=60.0, help="Server performance test length (queries = "
                   "QPS x this)")
    p.add_argument("--offline-samples", type=int, default=20000, help="Offline performance test samples")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of faults (from the first test's start)")
    p.add_argument("--every", type=float, default=15.0, help="one fault every this many seconds")
    p.add_argument("--kinds", default=",".join(SINGLE_HOST), help=f"fault kinds, comma-separated: {', '.join(KINDS)}")
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--latency", default="0.01 + 0.004*rows", help="the oracle's per-batch sleep (seconds)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--rejoin-timeout", type=float, default=30.0, help="passed to rank 0")
    p.add_argument("--max-examples", type=int, help="QSL size (default: the whole data set)")
    p.add_argument("--dataset", type=Path)
    p.add_argument("--vocab", type=Path)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON and PNG go")
    p.add_argument("--label", default="", help="file name suffix")
    p.add_argument("--keep", type=Path, help="keep the run directory and logs here (default: a temp dir, removed)")
    a = p.parse_args(argv)
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        p.error(f"--kinds: unknown {bad}; choose from {', '.join(KINDS)}")
    if a.every <= max(FAULT_S[k] for k in kinds) + 1.0:
        p.error(f"--every {a.every:g}: must exceed the longest fault ({max(FAULT_S[k] for k in kinds):g} s) + 1 s")
    why = netns.available() or ("nft (nftables) is missing: the loss-2s fault needs it"
                                if "loss-2s" in kinds and shutil.which("nft") is None else None)
    if why:
        print(f"chaos: {why}", file=sys.stderr)
        return 2

    # the feature cache is built here, before any clock starts (every process maps it)
    f1, n = direct_oracle_f1(a.dataset, a.vocab, a.max_examples)
    expect_f1 = f1 if a.mode != "performance" else None
    work = Path(tempfile.mkdtemp(prefix="chaos-")) if a.keep is None else a.keep
    work.mkdir(parents=True, exist_ok=True)
    c: Cluster | None = None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)   # also when started in the background (SIGINT ignored there)
    try:
        peak = a.peak
        qps = a.qps
        if a.scenario == "Server" and (a.find_peak or (qps is None and peak is None)):
            c = Cluster(a, work / "peak-cluster")
            peak = find_peak(c, work)
            c.close()
            c = None
        if a.scenario == "Server" and qps is None:
            assert peak is not None
            qps = round(peak * a.qps_fraction, 1)
        c = Cluster(a, work / "cluster")
        count = int(a.duration // a.every)
        plan = schedule(kinds, count, a.workers, a.seed)
        expected_s = (a.perf_seconds if a.scenario == "Server" else 60) * (a.mode != "accuracy") \
            + ((n / qps if qps else 60) if a.mode != "performance" else 0)
        t_limit = time.monotonic() + max(a.duration, expected_s) * 2 + 300
        run_dir = work / "run"
        rc, faults, t0 = drive(c, a, plan, run_dir, qps, t_limit)
        checks, tests = analyse(c, a, faults, t0, rc, run_dir, expect_f1, n)
        date = datetime.date.today().isoformat()
        stem = f"chaos-{date}{'-' + a.label if a.label else ''}"
        a.out.mkdir(parents=True, exist_ok=True)
        command = "sudo .venv/bin/python bench/chaos.py " + " ".join(
            x if " " not in x else repr(x) for x in (argv if argv is not None else sys.argv[1:]))
        report = {
            "command": command, "date": date, "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
            "scenario": a.scenario, "mode": a.mode, "workers": a.workers, "qps": qps, "peak_qps": peak,
            "oracle_latency": a.latency, "max_batch": a.max_batch, "samples": n, "seed": a.seed,
            "every_s": a.every, "duration_s": a.duration, "kinds": kinds,
            "rank0_rss_mb": {"first": c.rss[0][1] if c.rss else None, "max": max((m for _, m in c.rss), default=None),
                             "last": c.rss[-1][1] if c.rss else None, "samples": c.rss},
            "machine_load_1min": {"median": statistics.median([x for _, x in c.load]) if c.load else None,
                                  "max": max((x for _, x in c.load), default=None), "samples": c.load},
            "checks": checks, "summary": summarize([f.timeline for f in faults if f.timeline]),
            "faults": [{k: v for k, v in asdict(f).items() if k not in ("start", "end")} for f in faults],
            "throughput": [{"test": t["name"], "bin_s": BIN_S, "t0_s": round(t["t_from"] - t0, 3),
                            "samples_per_bin": _bins(t["batches"], t["t_from"]).tolist()} for t in tests],
        }
        json_path = a.out / f"{stem}.json"
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        title = (f"{a.scenario} {a.mode}, {a.workers} worker hosts, "
                 f"{f'{qps:g} QPS' if qps else 'Offline'}, a fault every {a.every:g} s ({', '.join(kinds)}); "
                 f"{date}")
        plot(a.out / f"{stem}.png", tests, faults, t0, title)
        (a.out / f"{stem}.md").write_text(markdown(report, f"../bench/results/{stem}.png"))
        print_report(report, json_path)
        return 0 if checks["passed"] else 1
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        return 130
    finally:
        if c is not None:
            c.close()
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict[str, Any], png: str) -> str:
    """The report as docs/faults.md shows it: one row per fault kind, then the checks."""
    ch = r["checks"]
    acc, perf = ch.get("accuracy"), ch.get("performance")
    lost = (acc["missing"] if acc else 0) + (
        (perf["samples_issued"] or 0) - (perf["samples_completed"] or 0) if perf else 0)
    lines = [f"`{r['command']}`  ", f"{r['date']}, {r['machine']}; {r['scenario']} {r['mode']}, {r['workers']} worker "
             f"hosts" + (f", {r['qps']:g} QPS (no-fault peak {r['peak_qps']:g})" if r.get("peak_qps") else
                         f", {r['qps']:g} QPS" if r.get("qps") else "")
             + f", oracle latency `{r['oracle_latency']}` per batch of <= {r['max_batch']}, a fault every "
             f"{r['every_s']:g} s, seed {r['seed']}", "",
             "| fault | count | recovery median / max (s) | loss declared median / max (s) | first re-send median / "
             "max (s) | samples lost / re-sent | slowest query (s) |", "|---|---:|---|---|---|---|---:|"]

    def mm(x: dict[str, Any]) -> str:
        return "-" if x["median"] is None else f"{x['median']:.3f} / {x['max']:.3f}"

    for kind, x in r["summary"].items():
        slowest = "-" if x["slowest_query_s"] is None else f"{x['slowest_query_s']:.3f}"
        lines.append(f"| {kind} | {x['count']} | {mm(x['recovery_s'])} | {mm(x['loss_declared_s'])} | "
                     f"{mm(x['first_resend_s'])} | {0 if lost == 0 else '?'} / {x['samples_resent']} | {slowest} |")
    lines.append("")
    if acc:
        lines.append(f"- accuracy: {acc['entries']} log entries for {acc['samples']} samples, exactly once: "
                     f"**{acc['exactly_once']}**; F1 {acc['f1']:.6f} vs the oracle's scored directly "
                     f"{acc['f1_direct']:.6f}: exact **{acc['f1_exact']}**")
    if perf:
        lines.append(f"- performance: LoadGen **{perf['verdict']}**, {perf['samples_completed']} of "
                     f"{perf['samples_issued']} samples completed, slowest query **{perf['slowest_query_s']} s**, "
                     f"p99 {perf['p99_s']} s, {perf['samples_per_s']} samples/s")
    rss = r.get("rank0_rss_mb", {})
    lines.append(f"- rank 0 exit {ch['rank0_exit']}; samples lost: {lost}; rank 0 memory {rss.get('first')} -> "
                 f"{rss.get('max')} MB (first -> max RSS); the machine's 1-min load median "
                 f"{r.get('machine_load_1min', {}).get('median')} (max {r.get('machine_load_1min', {}).get('max')}, "
                 f"2 cores, others' work included); checks {'passed' if ch['passed'] else 'FAILED'}")
    lines += ["", f"![{r['scenario']} chaos run]({png})", ""]
    return "\n".join(lines)


def _bins(b: dict[str, np.ndarray], t_from: float) -> np.ndarray:
    if not len(b["t"]):
        return np.zeros(0, np.int64)
    edges = np.arange(t_from, b["t"].max() + BIN_S, BIN_S)
    return np.histogram(b["t"], bins=edges, weights=b["n"])[0].astype(np.int64)


def print_report(r: dict[str, Any], json_path: Path) -> None:
    ch = r["checks"]
    print(f"\nchaos: {r['scenario']} {r['mode']}, {r['workers']} workers, {len(r['faults'])} faults -> {json_path}")
    for f in r["faults"]:
        t = f["timeline"]
        print(f"  {t.get('at_s', 0):7.1f} s {f['kind']:<8} {str(f['targets']):<12} declared "
              f"{_s(t.get('loss_declared_s'))} resent {_s(t.get('first_resend_s'))} at work "
              f"{_s(t.get('at_work_s'))} slowest query {_s(t.get('slowest_query_s'))} "
              f"({t.get('samples_resent', 0)} samples re-sent)")
    print("  per kind: count, recovery median / max (s), slowest query (s)")
    for kind, s in r["summary"].items():
        print(f"    {kind:<8} {s['count']:3d}  {_s(s['recovery_s']['median'])} / {_s(s['recovery_s']['max'])}  "
              f"{_s(s['slowest_query_s'])}")
    if "accuracy" in ch:
        x = ch["accuracy"]
        print(f"  accuracy: {x['entries']} entries for {x['samples']} samples, exactly once: {x['exactly_once']}, "
              f"F1 {x['f1']} vs direct {x['f1_direct']}: exact {x['f1_exact']}")
    if "performance" in ch:
        x = ch["performance"]
        print(f"  performance: LoadGen {x['verdict']}, {x['samples_completed']}/{x['samples_issued']} completed "
              f"({x['queries']} queries), slowest query {_s(x['slowest_query_s'])} s, p99 {_s(x['p99_s'])} s")
    print(f"  rank 0 exit {ch['rank0_exit']}; checks {'PASSED' if ch['passed'] else 'FAILED'}")


def _s(v: float | None) -> str:
    return "  -  " if v is None else f"{v:5.3f}"


if __name__ == "__main__":
    sys.exit(main())
