"""Model registry: models by name, loaded lazily and kept warm per worker process."""

from __future__ import annotations

import threading
from collections.abc import Callable

from workers.inference.base import SegmentationModel

_lock = threading.Lock()
_warm: dict[str, SegmentationModel] = {}


def _builtin_ct() -> SegmentationModel:
    from workers.models.builtin_ct import BuiltinCTModel

    return BuiltinCTModel()


#: Factories of the models this worker can run, by model name.
FACTORIES: dict[str, Callable[[], SegmentationModel]] = {
    "radnode-builtin-ct": _builtin_ct,
}


def get_model(name: str) -> SegmentationModel:
    """Return the model called ``name``, loading it on first use in this process.

    Raises
    ------
    KeyError
        If no model of that name is registered.
    """
    with _lock:
        model = _warm.get(name)
        if model is None:
            if name not in FACTORIES:
                raise KeyError(f"no model named {name!r}; known: {', '.join(sorted(FACTORIES))}")
            model = FACTORIES[name]()
            _warm[name] = model
        return model
