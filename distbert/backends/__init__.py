"""Backend registry: ``create(spec)`` imports a backend module only when it is asked for.

Optional runtimes (onnxruntime, torch, openvino) are imported lazily so a CPU-only install never
needs them; asking for one that is missing is a :class:`~distbert.errors.UserError` that names the
extra to install.
"""

from __future__ import annotations

import importlib

from distbert.backends.base import Backend, BackendSpec
from distbert.errors import UserError

# name -> (module, class name, pip extra that provides it)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "null": ("distbert.backends.harness", "NullBackend", None),
    "oracle": ("distbert.backends.harness", "OracleBackend", None),
    "sim": ("distbert.backends.harness", "SimBackend", None),
    "onnxruntime": ("distbert.backends.onnxruntime", "OnnxRuntimeBackend", "cpu"),
    "torch": ("distbert.backends.torch", "TorchBackend", "torch"),
    "openvino": ("distbert.backends.openvino", "OpenVinoBackend", "openvino"),
    "deepsparse": ("distbert.backends.deepsparse", "DeepSparseBackend", "deepsparse"),
}

NAMES = tuple(_REGISTRY)
#: Backends that run no model (the harness ceiling, the oracle, the latency simulator).
HARNESS = frozenset({"null", "oracle", "sim"})


def backend_class(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise UserError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")
    module, cls, extra = _REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        hint = f"pip install 'distbert[{extra}]'" if extra else "reinstall distbert"
        raise UserError(f"backend {name!r} needs the missing module {exc.name!r}: {hint}") from exc
    return getattr(mod, cls)


def create(spec: BackendSpec) -> Backend:
    return backend_class(spec.name)(spec)
