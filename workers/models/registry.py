"""Model registry: models loaded from their declarations and kept warm per worker process.

Each Celery worker process keeps the models it has used (a bounded LRU cache):
the first job of a model loads it, later jobs reuse it. On a GPU, models leave
the cache, least recently used first, when the device is short of memory.
The parent worker process never loads a model or touches CUDA (models load
in the pool's child processes, after fork).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from typing import TypeAlias

from service.model_spec import ModelSpec
from workers.inference.base import ClassificationModel, SegmentationModel

log = logging.getLogger("radnode.worker")

Model: TypeAlias = SegmentationModel | ClassificationModel

_lock = threading.Lock()
_warm: OrderedDict[tuple[str, str, str, str], Model] = OrderedDict()


def _key(spec: ModelSpec, device: str) -> tuple[str, str, str, str]:
    path = ""
    if spec.path is not None:
        try:  # a replaced model file gets a new key, so it is loaded again
            path = f"{spec.path}@{spec.path.stat().st_mtime_ns}"
        except OSError:
            path = str(spec.path)
    return spec.name, spec.version, device, path


def _load(spec: ModelSpec, device: str) -> Model:
    if spec.source == "builtin":
        if spec.name == "radnode-builtin-ct":
            from workers.models.builtin_ct import BuiltinCTModel

            return BuiltinCTModel()
        from workers.models.builtin_mr import BuiltinMRModel

        return BuiltinMRModel()
    if spec.source == "torchscript":
        from workers.models.torchscript import TorchScriptModel

        return TorchScriptModel(spec, device)
    from workers.models.bundle import BundleModel

    return BundleModel(spec, device)


def _free_gpu_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free / 2**20


def _evict_one() -> bool:
    if not _warm:
        return False
    key, _model = _warm.popitem(last=False)
    del _model
    gc.collect()
    if key[2].startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    log.info("model %s %s unloaded from %s (cache bound)", key[0], key[1], key[2])
    return True


def get_model(spec: ModelSpec, device: str, *, max_models: int = 4,
              min_free_gpu_mb: float = 0) -> Model:
    """Return the model ``spec`` on ``device``, loading it on first use in this process.

    Parameters
    ----------
    spec : ModelSpec
        The model's declaration.
    device : str
        Resolved torch device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    max_models : int
        At most this many models stay loaded; the least recently used leaves
        first.
    min_free_gpu_mb : float
        On a CUDA device, unload least recently used models before loading
        this one until this much memory (MiB) is free.

    Raises
    ------
    workers.models.torchscript.ModelError, OSError
        If the model cannot be loaded; nothing is cached then.
    """
    key = _key(spec, device)
    with _lock:
        model = _warm.get(key)
        if model is not None:
            _warm.move_to_end(key)
            return model
        while len(_warm) >= max_models and _evict_one():
            pass
        free = _free_gpu_mb(device)
        while free is not None and free < min_free_gpu_mb and _evict_one():
            free = _free_gpu_mb(device)
        model = _load(spec, device)
        _warm[key] = model
        log.info("model %s %s loaded on %s (%d warm)", spec.name, spec.version, device,
                 len(_warm))
        return model


def warm_models() -> list[tuple[str, str, str]]:
    """``(name, version, device)`` of the models loaded in this process, oldest first."""
    with _lock:
        return [(k[0], k[1], k[2]) for k in _warm]


def clear() -> None:
    """Unload every model (tests; a worker about to exit)."""
    with _lock:
        while _evict_one():
            pass
