"""distbert.data.artifacts and ``distbert download`` against a real threaded HTTP server on 127.0.0.1.

The server (written here) serves small generated files, honours or ignores ``Range``, can cut the
connection after N bytes (clean close or TCP reset) and can answer 404. No other address is contacted:
every registry URL used is pointed at it, and proxy variables are cleared.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.server
import json
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distbert import envs
from distbert.cli import download as download_cli
from distbert.data import artifacts
from distbert.errors import UserError

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass
class ServerState:
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    cut_after: int | None = None      # send only this many body bytes ...
    cut_requests: int = 1             # ... on the first this-many requests
    cut_mode: str = "eof"             # "eof": clean close; "reset": TCP RST
    ignore_range: bool = False        # answer 200 with the whole file even to a Range request
    status: dict[str, int] = dataclasses.field(default_factory=dict)   # file name -> forced error status
    requests: list[dict] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    base_url: str = ""

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    state: ServerState   # set on a per-server subclass

    def log_message(self, format: str, *args: object) -> None:   # keep test output quiet
        pass

    def do_GET(self) -> None:
        st = self.state
        name = urllib.parse.urlsplit(self.path).path.lstrip("/")
        rng = self.headers.get("Range")
        with st.lock:
            index = len(st.requests)
            entry: dict[str, Any] = {"name": name, "range": rng, "if_range": self.headers.get("If-Range"),
                                     "status": None}
            st.requests.append(entry)
        data = st.files.get(name)
        if name in st.status or data is None:
            entry["status"] = st.status.get(name, 404)
            self.send_error(entry["status"])
            return
        start = 0
        if rng and not st.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m.group(1))
            if start >= len(data):
                entry["status"] = 416
                self.send_error(416)
                return
        body = data[start:]
        entry["status"] = 206 if rng and not st.ignore_range else 200
        self.send_response(entry["status"])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.md5(data).hexdigest() + '"')
        if entry["status"] == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if st.cut_after is not None and index < st.cut_requests and st.cut_after < len(body):
            self.wfile.write(body[:st.cut_after])
            self.wfile.flush()
            if st.cut_mode == "reset":
                time.sleep(0.2)   # let the client read what was sent, then reset instead of closing
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            return   # HTTP/1.0: returning closes the connection -> a short body
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[ServerState]:
    state = ServerState()
    handler = type("Handler", (RangeHandler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fresh cache and empty data dir; no mirror, no proxies, no real back-off."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "DISTBERT_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("DISTBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DISTBERT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DISTBERT_NO_PROGRESS", "1")
    monkeypatch.setattr(artifacts, "BACKOFF_S", 0.01)
    monkeypatch.setattr(artifacts, "TIMEOUT_S", 10.0)
    return tmp_path


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible-looking bytes."""
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def register(monkeypatch: pytest.MonkeyPatch, server: ServerState, name: str, data: bytes, *,
             md5_known: bool = True, filename: str | None = None) -> artifacts.Artifact:
    """Point registry entry ``name`` at the test server serving ``data`` (md5 from the data, or None)."""
    base = artifacts.ARTIFACTS[name]
    art = dataclasses.replace(base, filename=filename or base.filename, urls=(server.url(filename or base.filename),),
                              md5=md5(data) if md5_known else None)
    server.files[art.filename] = data
    monkeypatch.setitem(artifacts.ARTIFACTS, name, art)
    return art


# ---------------------------------------------------------------- registry

def test_registry_matches_mlperf_sources():
    a = artifacts.ARTIFACTS
    assert a["squad-dev"].md5 == "3e85deb501d4e538b6bc56f786231552"
    assert a["squad-dev"].urls == (
        "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",
        "https://github.com/rajpurkar/SQuAD-explorer/blob/master/dataset/dev-v1.1.json?raw=true")
    assert a["vocab"].md5 == "64800d5d8528ce344256daf115d4965e" and "zenodo.org/record/3733910/" in a["vocab"].urls[0]
    assert a["model-onnx"].urls == ("https://zenodo.org/record/3733910/files/model.onnx?download=1",)
    int8 = a["model-onnx-int8"]
    assert int8.filename == "bert_large_v1_1_fake_quant.onnx" and "3750364" in int8.urls[0]
    assert a["model-pytorch"].urls == ("https://zenodo.org/record/3733896/files/model.pytorch?download=1",)
    assert all(a[m].md5 is None for m in artifacts.MODEL_ARTIFACTS.values())
    assert a["squad-dev"].cache_path().parts[-3:] == ("data", "squad", "dev-v1.1.json")
    assert a["vocab"].cache_path().parts[-3:] == ("data", "bert", "vocab.txt")
    assert a["model-onnx-int8"].cache_path().parent.parts[-2:] == ("models", "onnx-int8")
    assert artifacts.BERT_LARGE_CONFIG["hidden_size"] == 1024 and artifacts.BERT_LARGE_CONFIG["vocab_size"] == 30522
    with pytest.raises(UserError, match="unknown model format 'tf'"):
        artifacts.resolve_model("tf", None)


def test_mirror_and_override_urls(monkeypatch):
    art = artifacts.ARTIFACTS["vocab"]
    assert artifacts.urls_for(art) == list(art.urls)
    monkeypatch.setenv("DISTBERT_MIRROR", "http://mirror.invalid/bert/")
    assert artifacts.urls_for(art) == ["http://mirror.invalid/bert/vocab.txt"]
    assert artifacts.urls_for(art, "http://other.invalid") == ["http://other.invalid/vocab.txt"]


# ---------------------------------------------------------------- download

def test_complete_download_md5_ok(server, monkeypatch, isolated):
    data = payload(300_000)
    register(monkeypatch, server, "squad-dev", data)
    path = artifacts.download("squad-dev")
    assert path == isolated / "cache" / "data" / "squad" / "dev-v1.1.json"
    assert path.read_bytes() == data
    assert not path.with_name("dev-v1.1.json.part").exists()
    assert not path.with_name("dev-v1.1.json.part.json").exists()
    assert [r["range"] for r in server.requests] == [None]
    manifest = json.loads(artifacts.manifest_path().read_text())
    assert manifest["artifacts"]["squad-dev"]["md5"] == md5(data)
    # A verified copy is not fetched again.
    assert artifacts.download("squad-dev") == path and len(server.requests) == 1


@pytest.mark.parametrize("mode", ["eof", "reset"])
def test_resume_after_cut_connection(server, monkeypatch, tmp_path, mode):
    data = payload(400_000, seed=1)
    register(monkeypatch, server, "vocab", data)
    server.cut_after, server.cut_mode = 100_000, mode
    path = artifacts.download("vocab", tmp_path / "dest", base_url_override=server.base_url)
    assert path.read_bytes() == data
    assert len(server.requests) == 2 and server.requests[0]["range"] is None
    second = server.requests[1]
    assert second["status"] == 206 and second["range"] and second["range"].startswith("bytes=")
    assert second["if_range"] == '"' + md5(data) + '"'
    offset = int(second["range"][6:-1])
    if mode == "eof":
        assert offset == 100_000   # everything received before the close was kept
    else:
        assert 0 < offset <= 100_000


def test_partial_download_resumes_on_next_call(server, monkeypatch, tmp_path):
    data = payload(300_000, seed=2)
    register(monkeypatch, server, "vocab", data)
    # Every answer is the whole file cut at the same byte: no attempt makes progress, so it gives up.
    server.cut_after, server.cut_requests, server.ignore_range = 50_000, 99, True
    with pytest.raises(UserError) as err:
        artifacts.download("vocab", tmp_path)
    msg = str(err.value)
    assert "failed 3 times in a row" in msg and "run the same command again to resume" in msg and "--vocab" in msg
    assert len(server.requests) == 3
    part = tmp_path / "vocab.txt.part"
    assert part.stat().st_size == 50_000 and not (tmp_path / "vocab.txt").exists()
    server.cut_after, server.ignore_range = None, False
    assert artifacts.download("vocab", tmp_path).read_bytes() == data
    assert (server.requests[3]["range"], server.requests[3]["status"]) == ("bytes=50000-", 206)
    assert not part.exists()


def test_progress_resets_retry_budget(server, monkeypatch, tmp_path):
    data = payload(300_000, seed=22)
    register(monkeypatch, server, "vocab", data)
    server.cut_after, server.cut_requests = 40_000, 99   # every request cut, but each one advances
    assert artifacts.download("vocab", tmp_path).read_bytes() == data
    assert len(server.requests) == 8 and all(r["status"] == 206 for r in server.requests[1:])


def test_server_ignoring_range_restarts_from_zero(server, monkeypatch, tmp_path):
    data = payload(350_000, seed=3)
    register(monkeypatch, server, "squad-dev", data)
    server.cut_after, server.ignore_range = 120_000, True
    path = artifacts.download("squad-dev", tmp_path)
    assert path.read_bytes() == data
    assert [(r["range"], r["status"]) for r in server.requests] == [(None, 200), ("bytes=120000-", 200)]


def test_md5_mismatch_deletes_and_explains(server, monkeypatch, tmp_path):
    data = payload(200_000, seed=4)
    art = register(monkeypatch, server, "squad-dev", data)
    monkeypatch.setitem(artifacts.ARTIFACTS, "squad-dev", dataclasses.replace(art, md5="0" * 32))
    with pytest.raises(UserError) as err:
        artifacts.download("squad-dev", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "md5 mismatch" in msg and server.url("dev-v1.1.json") in msg
    assert "0" * 32 in msg and md5(data) in msg
    assert list(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []


def test_http_404(server, monkeypatch, tmp_path):
    register(monkeypatch, server, "vocab", payload(1000))
    server.status["vocab.txt"] = 404
    with pytest.raises(UserError, match=r"returned HTTP 404") as err:
        artifacts.download("vocab", tmp_path)
    assert server.url("vocab.txt") in str(err.value) and len(server.requests) == 1   # 404 is not retried


def test_connection_refused_says_offline(tmp_path, isolated):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()   # nothing listens there now
    with pytest.raises(UserError) as err:
        artifacts.download("squad-dev", base_url_override=f"http://127.0.0.1:{port}")
    msg = str(err.value)
    assert msg.startswith("cannot reach 127.0.0.1") and "looks offline" in msg and "--dataset" in msg
    assert f"http://127.0.0.1:{port}/dev-v1.1.json" in msg
    assert str(isolated / "cache" / "data" / "squad" / "dev-v1.1.json") in msg


def test_fallback_url_used_after_404(server, monkeypatch, tmp_path):
    data = payload(10_000, seed=5)
    art = register(monkeypatch, server, "squad-dev", data)
    monkeypatch.setitem(artifacts.ARTIFACTS, "squad-dev",
                        dataclasses.replace(art, urls=(server.url("missing.json"), server.url("dev-v1.1.json"))))
    assert artifacts.download("squad-dev", tmp_path).read_bytes() == data
    assert [r["status"] for r in server.requests] == [404, 200]


def test_model_sha256_recorded_then_checked(server, monkeypatch, isolated):
    data = payload(250_000, seed=6)
    register(monkeypatch, server, "model-onnx", data, md5_known=False)
    monkeypatch.setenv("DISTBERT_MIRROR", server.base_url)
    path = artifacts.download("model-onnx")
    assert path == isolated / "cache" / "models" / "onnx" / "model.onnx" and path.read_bytes() == data
    rec = json.loads(artifacts.manifest_path().read_text())["artifacts"]["model-onnx"]
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
    assert artifacts.resolve_model("onnx", None) == path and artifacts.verify("model-onnx", path) is True
    # Same-size corruption: caught by the sha256 on the next use.
    corrupt = bytearray(data)
    corrupt[1000] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    assert artifacts.verify("model-onnx", path) is False
    with pytest.raises(UserError, match=r"corrupt .*sha256.*distbert download model --format onnx --force"):
        artifacts.resolve_model("onnx", None)
    # download() fetches a corrupt copy again; truncation is caught by the size alone.
    assert artifacts.download("model-onnx").read_bytes() == data and len(server.requests) == 2
    path.write_bytes(data[:-1])
    with pytest.raises(UserError, match="size 249999 bytes, expected 250000"):
        artifacts.resolve_model("onnx", None, download_missing=True)


def test_model_download_must_match_recorded_sha256(server, monkeypatch, tmp_path):
    register(monkeypatch, server, "model-onnx", payload(20_000, seed=7), md5_known=False)
    artifacts.download("model-onnx", tmp_path / "a")
    server.files["model.onnx"] = payload(20_000, seed=8)   # upstream "changed" (or a bad mirror)
    with pytest.raises(UserError, match="sha256 mismatch .*recorded in .*manifest.json"):
        artifacts.download("model-onnx", tmp_path / "b")
    assert not (tmp_path / "b" / "model.onnx").exists() and not (tmp_path / "b" / "model.onnx.part").exists()


def test_pytorch_model_gets_bert_config(server, monkeypatch):
    register(monkeypatch, server, "model-pytorch", payload(5_000, seed=9), md5_known=False)
    assert artifacts.resolve_model("pytorch", None) is None and server.requests == []
    path = artifacts.resolve_model("pytorch", None, download_missing=True)
    cfg = json.loads((path.parent / "bert_config.json").read_text())
    assert cfg == artifacts.BERT_LARGE_CONFIG and cfg["num_hidden_layers"] == 24


# ---------------------------------------------------------------- resolution

def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_resolve_squad_precedence(server, monkeypatch, isolated, tmp_path):
    dev, voc = payload(30_000, seed=10), payload(20_000, seed=11)
    register(monkeypatch, server, "squad-dev", dev)
    register(monkeypatch, server, "vocab", voc)
    data_dev = _write(isolated / "data" / "squad" / "dev-v1.1.json", dev)
    data_voc = _write(isolated / "data" / "bert" / "vocab.txt", voc)
    cache_dev = _write(isolated / "cache" / "data" / "squad" / "dev-v1.1.json", dev)
    cache_voc = _write(isolated / "cache" / "data" / "bert" / "vocab.txt", voc)
    mine = _write(tmp_path / "mine" / "small.json", b"{}")

    # explicit > data dir (each file on its own)
    assert artifacts.resolve_squad(mine, None, download_missing=True) == (mine, data_voc)
    with pytest.raises(UserError, match=r"--vocab .*nope\.txt: no such file"):
        artifacts.resolve_squad(None, tmp_path / "nope.txt")
    # data dir > cache
    assert artifacts.resolve_squad(None, None) == (data_dev, data_voc)
    # cache when the data dir has nothing
    monkeypatch.setenv("DISTBERT_DATA_DIR", str(tmp_path / "empty"))
    assert artifacts.resolve_squad(None, None) == (cache_dev, cache_voc)
    assert server.requests == []
    # a corrupt cache copy is refused with the fix
    cache_voc.write_bytes(b"x")
    with pytest.raises(UserError, match=r"vocab\.txt is corrupt .*distbert download squad --force"):
        artifacts.resolve_squad(None, None)
    # nothing local: error unless download_missing
    cache_dev.unlink()
    cache_voc.unlink()
    with pytest.raises(UserError, match=r"^SQuAD dev set not found: run `distbert download squad` or pass --dataset"):
        artifacts.resolve_squad(None, None)
    assert server.requests == []
    assert artifacts.resolve_squad(None, None, download_missing=True) == (cache_dev, cache_voc)
    assert cache_dev.read_bytes() == dev and cache_voc.read_bytes() == voc
    assert sorted(r["name"] for r in server.requests) == ["dev-v1.1.json", "vocab.txt"]


def test_unset_data_dir_means_none_and_the_cache(server, monkeypatch, isolated):
    """No DISTBERT_DATA_DIR: no team data dir at all (no default next to the checkout), so local
    resolution is the cache alone, and the error names only the cache."""
    monkeypatch.delenv("DISTBERT_DATA_DIR")
    assert envs.data_dir() is None and artifacts.ARTIFACTS["vocab"].data_path() is None
    monkeypatch.setenv("DISTBERT_DATA_DIR", "")
    assert envs.data_dir() is None
    dev, voc = payload(3000, seed=18), payload(2000, seed=19)
    register(monkeypatch, server, "squad-dev", dev)
    register(monkeypatch, server, "vocab", voc)
    cache_dev = _write(isolated / "cache" / "data" / "squad" / "dev-v1.1.json", dev)
    cache_voc = _write(isolated / "cache" / "data" / "bert" / "vocab.txt", voc)
    assert artifacts.resolve_squad(None, None) == (cache_dev, cache_voc)
    assert artifacts.present("vocab") == cache_voc
    assert artifacts.resolve_model("onnx", None) is None
    cache_dev.unlink()
    with pytest.raises(UserError) as info:
        artifacts.resolve_squad(None, None)
    assert str(info.value).endswith(f"(looked for {cache_dev})") and "None" not in str(info.value)
    assert server.requests == []


def test_nothing_downloaded_when_local_files_exist(server, monkeypatch, isolated):
    dev, voc, model = payload(1000, seed=12), payload(1000, seed=13), payload(1000, seed=14)
    register(monkeypatch, server, "squad-dev", dev)
    register(monkeypatch, server, "vocab", voc)
    register(monkeypatch, server, "model-onnx-int8", model, md5_known=False)
    monkeypatch.setenv("DISTBERT_MIRROR", server.base_url)
    _write(isolated / "data" / "squad" / "dev-v1.1.json", dev)
    _write(isolated / "data" / "bert" / "vocab.txt", voc)
    local_model = _write(isolated / "data" / "models" / "onnx-int8" / "bert_large_v1_1_fake_quant.onnx", model)
    artifacts.resolve_squad(None, None, download_missing=True)
    assert artifacts.resolve_model("onnx-int8", None, download_missing=True) == local_model
    explicit = _write(isolated / "elsewhere" / "m.onnx", b"mine")
    assert artifacts.resolve_model("onnx", explicit, download_missing=True) == explicit
    with pytest.raises(UserError, match=r"--model .*gone\.onnx: no such file"):
        artifacts.resolve_model("onnx", isolated / "gone.onnx", download_missing=True)
    assert server.requests == []


# ---------------------------------------------------------------- CLI

def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distbert")
    download_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_download_squad_then_already_present(server, monkeypatch, tmp_path, capsys):
    register(monkeypatch, server, "squad-dev", payload(40_000, seed=15))
    register(monkeypatch, server, "vocab", payload(20_000, seed=16))
    dest = tmp_path / "dl"
    assert _cli(["download", "squad", "--dest", str(dest), "--mirror", server.base_url]) == 0
    out = capsys.readouterr().out
    assert f"dev-v1.1.json: downloaded to {dest / 'dev-v1.1.json'}" in out and "vocab.txt: downloaded to" in out
    assert _cli(["download", "squad", "--dest", str(dest), "--mirror", server.base_url]) == 0
    assert capsys.readouterr().out.count("already present") == 2 and len(server.requests) == 2
    assert _cli(["download", "squad", "--dest", str(dest), "--mirror", server.base_url, "--force"]) == 0
    assert len(server.requests) == 4


def test_cli_download_model_pytorch(server, monkeypatch, capsys, isolated):
    register(monkeypatch, server, "model-pytorch", payload(8_000, seed=17), md5_known=False)
    monkeypatch.setenv("DISTBERT_MIRROR", server.base_url)
    assert _cli(["download", "model", "--format", "pytorch"]) == 0
    out = capsys.readouterr().out
    model_dir = isolated / "cache" / "models" / "pytorch"
    assert f"model.pytorch: downloaded to {model_dir / 'model.pytorch'}" in out
    assert f"bert_config.json: {model_dir / 'bert_config.json'}" in out
    assert _cli(["download", "model", "--format", "pytorch"]) == 0
    assert "already present" in capsys.readouterr().out and len(server.requests) == 1
