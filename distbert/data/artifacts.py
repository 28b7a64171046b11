"""The official MLPerf BERT artifacts: registry, downloads, checksums and local resolution.

Contracts:

- :func:`download` fetches one registered artifact into ``<dest>/<file>.part`` (resuming a partial
  ``.part`` with ``Range``), retries transient failures a bounded number of times, verifies it (the
  published md5 when there is one, else the sha256 + size recorded in ``<cache>/manifest.json`` at
  the first complete download) and only then renames it into place. So ``<dest>/<file>`` is always
  complete and verified; a failure leaves at most a ``.part`` that the next call resumes.
- :func:`resolve_squad` / :func:`resolve_model` find local files (explicit path > ``DISTBERT_DATA_DIR``
  > cache) and download only when asked to and nothing local exists.
- Every user-caused failure is one :class:`~distbert.errors.UserError` line naming the URL or file
  and the fix. Only urllib is used: no new dependency.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distbert import __version__, envs
from distbert.errors import UserError
from distbert.util.fs import atomic_write_text, file_digests, file_sha256, locked
from distbert.util.progress import Progress

log = logging.getLogger(__name__)

TRIES = 3          # consecutive failed attempts per URL before giving up (progress resets the count)
BACKOFF_S = 1.0    # sleep before retry k is BACKOFF_S * 2**(k-1)
TIMEOUT_S = 30.0   # per socket operation (connect, each read), not for the whole download
CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One official file. ``urls`` are tried in order; ``md5`` is None where none is published."""

    name: str          # registry key, e.g. "squad-dev"
    filename: str      # file name on disk (and under a mirror)
    urls: tuple[str, ...]
    md5: str | None
    subdir: str        # cache location: <cache>/<subdir>/<filename>
    data_subdir: str   # team copy: <DISTBERT_DATA_DIR>/<data_subdir>/<filename>
    flag: str          # the run flag that points at a local copy instead
    command: str       # the command that downloads it

    def cache_path(self) -> Path:
        return envs.cache_dir() / self.subdir / self.filename

    def data_path(self) -> Path | None:
        """The team copy; None when DISTBERT_DATA_DIR is unset (no team data dir)."""
        root = envs.data_dir()
        return None if root is None else root / self.data_subdir / self.filename


def _model(name: str, fmt: str, filename: str, url: str) -> Artifact:
    return Artifact(name, filename, (url,), None, f"models/{fmt}", f"models/{fmt}", "--model",
                    f"distbert download model --format {fmt}")


ARTIFACTS: dict[str, Artifact] = {a.name: a for a in (
    Artifact("squad-dev", "dev-v1.1.json",
             ("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",
              "https://github.com/rajpurkar/SQuAD-explorer/blob/master/dataset/dev-v1.1.json?raw=true"),
             "3e85deb501d4e538b6bc56f786231552", "data/squad", "squad", "--dataset",
             "distbert download squad"),
    Artifact("vocab", "vocab.txt", ("https://zenodo.org/record/3733910/files/vocab.txt?download=1",),
             "64800d5d8528ce344256daf115d4965e", "data/bert", "bert", "--vocab", "distbert download squad"),
    _model("model-onnx", "onnx", "model.onnx", "https://zenodo.org/record/3733910/files/model.onnx?download=1"),
    _model("model-onnx-int8", "onnx-int8", "bert_large_v1_1_fake_quant.onnx",
           "https://zenodo.org/record/3750364/files/bert_large_v1_1_fake_quant.onnx?download=1"),
    _model("model-pytorch", "pytorch", "model.pytorch",
           "https://zenodo.org/record/3733896/files/model.pytorch?download=1"),
)}

MODEL_ARTIFACTS: dict[str, str] = {"onnx": "model-onnx", "onnx-int8": "model-onnx-int8",
                                   "pytorch": "model-pytorch"}

# language/bert/bert_config.json (BERT-Large uncased), needed beside model.pytorch. Written, not downloaded.
BERT_LARGE_CONFIG: dict[str, Any] = {
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096,
    "max_position_embeddings": 512, "num_attention_heads": 16, "num_hidden_layers": 24,
    "type_vocab_size": 2, "vocab_size": 30522,
}


def get(name: str) -> Artifact:
    """The registered artifact ``name``; UserError naming the choices if unknown."""
    try:
        return ARTIFACTS[name]
    except KeyError:
        raise UserError(f"unknown artifact {name!r}: choose one of {', '.join(ARTIFACTS)}") from None


def model_artifact(fmt: str) -> Artifact:
    """The official model for ``fmt`` (``onnx``, ``onnx-int8``, ``pytorch``)."""
    if fmt not in MODEL_ARTIFACTS:
        raise UserError(f"unknown model format {fmt!r}: choose one of {', '.join(MODEL_ARTIFACTS)}")
    return ARTIFACTS[MODEL_ARTIFACTS[fmt]]


def urls_for(art: Artifact, base_url_override: str | None = None) -> list[str]:
    """URLs to try in order: ``<base>/<file name>`` if an override or ``DISTBERT_MIRROR`` is set,
    else the official ones."""
    base = base_url_override or envs.mirror_url()
    return [base.rstrip("/") + "/" + art.filename] if base else list(art.urls)


# ---------------------------------------------------------------- checksums and the manifest

def manifest_path() -> Path:
    """``<cache>/manifest.json``:
    ``{"version": 1, "artifacts": {name: {file, size, sha256, md5, url, downloaded}}}``."""
    return envs.cache_dir() / "manifest.json"


def _read_manifest() -> dict[str, Any]:
    path = manifest_path()
    fix = "delete it; model checksums are recorded again at the next download"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": 1, "artifacts": {}}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("artifacts"), dict):
        raise UserError(f"{path} is not a distbert manifest: {fix}")
    return data


def _check(art: Artifact, path: Path) -> tuple[bool | None, str]:
    """(True, _) verified; (False, why) mismatch; (None, why) nothing to compare against."""
    if art.md5 is not None:
        (md5,) = file_digests(path, "md5")
        return md5 == art.md5, f"md5 {md5}, expected {art.md5}"
    rec = _read_manifest()["artifacts"].get(art.name)
    if rec is None:
        return None, f"no checksum recorded for {art.name} in {manifest_path()}"
    size = path.stat().st_size
    if size != rec["size"]:   # cheap test first: a truncated model fails without hashing 1.3 GB
        return False, f"size {size} bytes, expected {rec['size']} (recorded in {manifest_path()})"
    sha = file_sha256(path)
    return sha == rec["sha256"], f"sha256 {sha}, expected {rec['sha256']} (recorded in {manifest_path()})"


def verify(artifact: str | Artifact, path: Path | str) -> bool | None:
    """Whether ``path`` is the official ``artifact``: its md5 when published, else the sha256 + size
    recorded at its first download. None when there is no reference (a model never downloaded here)."""
    art = get(artifact) if isinstance(artifact, str) else artifact
    ok, why = _check(art, Path(path))
    if not ok:
        log.warning("%s: %s", path, why)
    return ok


def _record(art: Artifact, path: Path, url: str, md5: str, sha256: str) -> None:
    cache = envs.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / ".manifest.lock"):   # read-modify-write: two ranks must not lose an entry
        data = _read_manifest()
        data["artifacts"][art.name] = {
            "file": art.filename, "size": path.stat().st_size, "sha256": sha256, "md5": md5, "url": url,
            "downloaded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(manifest_path(), json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_bert_config(model_dir: Path | str) -> Path:
    """Write ``bert_config.json`` (:data:`BERT_LARGE_CONFIG`) into ``model_dir`` unless one exists
    (an existing file is left alone, with a warning if it differs). Returns its path."""
    path = Path(model_dir) / "bert_config.json"
    if path.is_file():
        try:
            same = json.loads(path.read_text()) == BERT_LARGE_CONFIG
        except ValueError:
            same = False
        if not same:
            log.warning("%s differs from the MLPerf BERT-Large config; leaving it as is", path)
        return path
    atomic_write_text(path, json.dumps(BERT_LARGE_CONFIG, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------- HTTP

class _Transient(Exception):
    """Worth retrying: reset, timeout mid-transfer, short body, 5xx."""


class _Unreachable(Exception):
    """No answer from the host at all (DNS, refused, unroutable, connect timeout): try the next URL."""


def _part_paths(target: Path) -> tuple[Path, Path]:
    part = target.with_name(target.name + ".part")
    return part, part.with_name(part.name + ".json")   # .part.json: URL and validators the .part came from


def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _is_unreachable(reason: object) -> bool:
    if isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)):
        return True
    return isinstance(reason, OSError) and reason.errno in (
        errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EADDRNOTAVAIL)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL); None for what is absent or ``*``."""
    try:
        unit, spec = (value or "").split(" ", 1)
        first, total = spec.split("/", 1)
        start = int(first.split("-", 1)[0]) if unit == "bytes" and first != "*" else None
        return start, (int(total) if total.strip() != "*" else None)
    except ValueError:
        return None, None


def _attempt(url: str, part: Path, meta_path: Path, art: Artifact) -> None:
    """One request: append to ``part`` from its current size (or restart it); raise on any shortfall."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    offset = part.stat().st_size if part.exists() else 0
    # Only a .part known to come from this URL is a trustworthy prefix; anything else starts over.
    if offset and meta.get("url") != url:
        offset = 0
    if offset and offset == meta.get("total"):
        return   # complete already (a previous run stopped before verifying)
    headers = {"User-Agent": f"distbert/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        # If-Range: a server whose file changed since the .part began answers 200 with the new whole file.
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    opener = urllib.request.build_opener()   # per call: proxy variables are read now, not cached
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            _discard(part, meta_path)   # our .part is longer than the file: stale, start over
            raise _Transient("HTTP 416 for the resumed range; restarting from byte 0") from None
        if e.code in (408, 429) or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise UserError(f"{url} returned HTTP {e.code} ({e.reason}): check the URL or --mirror/DISTBERT_MIRROR, "
                        f"or download {art.filename} elsewhere and pass {art.flag}") from None
    except urllib.error.URLError as e:
        if _is_unreachable(e.reason):
            raise _Unreachable(str(e.reason) or type(e.reason).__name__) from None
        if isinstance(e.reason, ConnectionError):
            raise _Transient(str(e.reason)) from None
        raise UserError(f"cannot download {url}: {e.reason}; "
                        f"download {art.filename} elsewhere and pass {art.flag}") from None
    except (ConnectionError, TimeoutError, http.client.HTTPException) as e:   # raised after connecting
        raise _Transient(f"{type(e).__name__}: {e}") from None

    with resp:
        status = resp.status or 200   # file:// responses carry no status
        if status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                _discard(part, meta_path)
                raise _Transient(f"server answered Range bytes={offset}- with "
                                 f"{resp.headers.get('Content-Range')}; restarting")
            mode = "ab"
        else:
            if offset:
                log.info("%s ignored the Range request (HTTP %d): restarting from byte 0", url, status)
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        # Written before any byte, so a .part on disk is always described by its .part.json.
        atomic_write_text(meta_path, json.dumps({"url": url, "total": total, "etag": resp.headers.get("ETag"),
                                             "last_modified": resp.headers.get("Last-Modified")}))
        label = f"downloading {art.filename}" + (f" (resuming at {offset / 1e6:,.1f} MB)" if offset else "")
        got = 0
        with open(part, mode) as f, Progress(label, total=None if total is None else total - offset,
                                             unit="B", scale=1e6, scaled_unit="MB") as bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (ConnectionError, TimeoutError, http.client.HTTPException) as e:
                    raise _Transient(f"{type(e).__name__} after {offset + got} bytes: {e}") from None
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
            # http.client returns a short body silently when the peer closes early: the size is the check.
            if total is not None and offset + got != total:
                raise _Transient(f"connection closed after {offset + got} of {total} bytes")


def _fetch(url: str, part: Path, meta_path: Path, art: Artifact) -> None:
    """Download ``url`` into ``part`` with bounded retries. TRIES attempts in a row that do not grow
    the .part beyond its largest size so far end it; one that does resets the count (a flaky link
    still finishes a 1.3 GB model, a server that always cuts at the same byte does not loop)."""
    best, failures = -1, 0
    while True:
        try:
            _attempt(url, part, meta_path, art)
            return
        except _Transient as e:
            size = part.stat().st_size if part.exists() else 0
            if size > best:
                best, failures = size, 0
            failures += 1
            if failures >= TRIES:
                raise UserError(f"downloading {url} failed {TRIES} times in a row ({e}): run the same command again "
                                f"to resume, or download {art.filename} elsewhere and pass {art.flag}") from None
            delay = BACKOFF_S * 2 ** (failures - 1)
            log.warning("%s: %s; retrying in %.1f s (%d/%d)", url, e, delay, failures, TRIES - 1)
            time.sleep(delay)


def _finish(art: Artifact, dest: Path) -> None:
    if art.name == "model-pytorch":
        write_bert_config(dest)


def download(artifact: str | Artifact, dest_dir: Path | str | None = None, *,
             base_url_override: str | None = None, force: bool = False) -> Path:
    """Download ``artifact`` (a registry name or :class:`Artifact`) to ``<dest_dir>/<file name>``.

    ``dest_dir`` defaults to ``<cache>/<artifact.subdir>``. URLs: ``<base_url_override>/<file name>``,
    else ``<DISTBERT_MIRROR>/<file name>``, else the official ones in order. An existing file that
    verifies is returned as is unless ``force``; one that does not is downloaded again. A model with no
    recorded checksum is trusted with a warning. The file is verified before it is renamed into
    place; for models its sha256 + size are recorded in the manifest at the first complete download
    and a later download must match them. ``model-pytorch`` also gets ``bert_config.json`` beside it.
    Raises UserError (one line, naming the URL or path and the fix) on 404 and other 4xx, checksum
    mismatch (the download is deleted), retries exhausted (the .part is kept for resuming) and an
    unreachable host (offline).
    """
    art = get(artifact) if isinstance(artifact, str) else artifact
    dest = Path(dest_dir).expanduser() if dest_dir is not None else envs.cache_dir() / art.subdir
    target = dest / art.filename
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest} ({e.strerror}): pass a writable --dest or set DISTBERT_CACHE") from None
    part, meta_path = _part_paths(target)
    with locked(dest / f".{art.filename}.lock"):
        if target.exists() and not force:
            ok, why = _check(art, target)
            if ok is not False:
                if ok is None:
                    log.warning("%s: %s; trusting it (pass --force to download it again)", target, why)
                log.info("%s already present: %s", art.name, target)
                _finish(art, dest)
                return target
            log.warning("%s does not verify (%s): downloading it again", target, why)
        if force:
            _discard(part, meta_path)
        urls = urls_for(art, base_url_override)
        if not urls:
            raise UserError(f"no URL known for {art.name}: pass --mirror URL, or put {art.filename} in {target}")
        unreachable: list[tuple[str, str]] = []
        last_error: UserError | None = None
        for i, url in enumerate(urls):
            try:
                _fetch(url, part, meta_path, art)
                break
            except _Unreachable as e:
                unreachable.append((url, str(e)))
                err_text = f"cannot reach {urllib.parse.urlsplit(url).hostname} ({e})"
            except UserError as e:
                last_error, err_text = e, str(e)
            if i + 1 < len(urls):
                log.warning("%s; trying %s", err_text, urls[i + 1])
        else:
            if last_error is not None:
                raise last_error
            url, why = unreachable[0]
            raise UserError(f"cannot reach {urllib.parse.urlsplit(url).hostname} ({why}): this machine looks offline; "
                            f"download {url} elsewhere and pass {art.flag}, or put it in {target}")
        md5, sha256 = file_digests(part, "md5", "sha256")
        if art.md5 is not None and md5 != art.md5:
            _discard(part, meta_path)
            raise UserError(f"md5 mismatch for {url}: expected {art.md5}, got {md5}; the download was deleted, "
                            f"run the command again or download it elsewhere and pass {art.flag}")
        rec = _read_manifest()["artifacts"].get(art.name)
        if art.md5 is None and rec is not None and (rec["sha256"] != sha256 or rec["size"] != part.stat().st_size):
            _discard(part, meta_path)
            raise UserError(f"sha256 mismatch for {url}: expected {rec['sha256']} (recorded in {manifest_path()} "
                            f"at the first download), got {sha256}; the download was deleted (if the upstream file "
                            f"really changed, delete the {art.name!r} entry of that manifest)")
        if rec is None or rec["sha256"] != sha256:
            _record(art, part, url, md5, sha256)
        os.replace(part, target)   # the final name appears only once the content is verified
        _discard(meta_path)
        _finish(art, dest)
        log.info("%s downloaded to %s", art.name, target)
        return target


# ---------------------------------------------------------------- resolution

def present(artifact: str | Artifact, dest_dir: Path | str | None = None) -> Path | None:
    """A local copy that verifies (or, for a model, has no recorded checksum): ``<dest_dir>/<file>``
    when ``dest_dir`` is given, else the ``DISTBERT_DATA_DIR`` copy, else the cache copy. None if none."""
    art = get(artifact) if isinstance(artifact, str) else artifact
    if dest_dir is not None:
        candidates = [Path(dest_dir).expanduser() / art.filename]
    else:
        candidates = [p for p in (art.data_path(), art.cache_path()) if p is not None]
    for path in candidates:
        if path.is_file() and _check(art, path)[0] is not False:
            return path
    return None


def _resolve(art: Artifact, explicit: Path | str | None, download_missing: bool) -> Path | None:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(f"{art.flag} {path}: no such file; pass an existing {art.filename}, "
                            f"or drop {art.flag} to use the official one (`{art.command}`)")
        _warn_unofficial(art, path)
        return path
    local = art.data_path()
    if local is not None and local.is_file():
        _warn_unofficial(art, local)   # a team copy may be a deliberate subset: warn, do not refuse
        return local
    cached = art.cache_path()
    if cached.is_file():
        # The cache holds our own downloads, so a mismatch there is corruption, not a choice.
        ok, why = _check(art, cached)
        if ok is False:
            raise UserError(f"{cached} is corrupt ({why}): run `{art.command} --force`")
        if ok is None:
            log.warning("%s: %s; trusting it", cached, why)
        return cached
    return download(art) if download_missing else None


def _warn_unofficial(art: Artifact, path: Path) -> None:
    if art.md5 is not None:
        (md5,) = file_digests(path, "md5")
        if md5 != art.md5:
            log.warning("%s has md5 %s, not the official %s: results are not MLPerf-comparable", path, md5, art.md5)


def resolve_squad(dataset: Path | str | None, vocab: Path | str | None, *,
                  download_missing: bool = False) -> tuple[Path, Path]:
    """(dev-v1.1.json, vocab.txt), each from: the explicit path (must exist), else
    ``DISTBERT_DATA_DIR/{squad,bert}/``, else the cache (must verify), else a download when
    ``download_missing``, else UserError. Nothing is downloaded when a local copy exists."""
    found = []
    for art, explicit, what in ((ARTIFACTS["squad-dev"], dataset, "SQuAD dev set"),
                                (ARTIFACTS["vocab"], vocab, "BERT vocab")):
        path = _resolve(art, explicit, download_missing)
        if path is None:
            looked = " and ".join(str(p) for p in (art.data_path(), art.cache_path()) if p is not None)
            raise UserError(f"{what} not found: run `{art.command}` or pass {art.flag} (looked for {looked})")
        found.append(path)
    return found[0], found[1]


def resolve_model(format: str, model: Path | str | None, *, download_missing: bool = False) -> Path | None:
    """The official model file for ``format`` (``onnx``, ``onnx-int8``, ``pytorch``): the explicit
    path (must exist), else ``DISTBERT_DATA_DIR/models/<format>/``, else the cache (sha256 checked
    against the manifest), else a download when ``download_missing``, else None (the caller then
    builds a random-weight model). For a cached ``pytorch`` model, ``bert_config.json`` is ensured beside it."""
    art = model_artifact(format)
    path = _resolve(art, model, download_missing)
    if path is not None and format == "pytorch" and path.parent == art.cache_path().parent:
        write_bert_config(path.parent)
    return path
