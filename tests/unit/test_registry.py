"""The warm model cache of a worker process: load once, LRU bound, reload a changed file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.model_spec import ModelSpec, builtin_spec
from tests.tiny_models import save_threshold_segmenter, segmentation_spec, to_spec
from workers.models import registry
from workers.models.torchscript import ModelError


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    registry.clear()
    yield
    registry.clear()


def _spec(folder: Path, name: str) -> ModelSpec:
    return to_spec(segmentation_spec(save_threshold_segmenter(folder / name, (0.5,)), (1,),
                                     name=name))


def test_a_model_is_loaded_once_and_kept(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "a")
    first = registry.get_model(spec, "cpu")
    assert registry.get_model(spec, "cpu") is first
    assert registry.warm_models() == [("a", "0.1", "cpu")]


def test_least_recently_used_model_leaves_first(tmp_path: Path) -> None:
    a, b, c = (_spec(tmp_path, n) for n in "abc")
    model_a = registry.get_model(a, "cpu", max_models=2)
    registry.get_model(b, "cpu", max_models=2)
    assert registry.get_model(a, "cpu", max_models=2) is model_a  # a is now the newest
    registry.get_model(c, "cpu", max_models=2)
    assert [m[0] for m in registry.warm_models()] == ["a", "c"]  # b left


def test_a_replaced_model_file_is_loaded_again(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "a")
    first = registry.get_model(spec, "cpu")
    assert spec.path is not None
    stat = spec.path.stat()
    os.utime(spec.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert registry.get_model(spec, "cpu") is not first


def test_builtin_models_come_from_their_declarations() -> None:
    ct = registry.get_model(builtin_spec("radnode-builtin-ct"), "cpu")
    mr = registry.get_model(builtin_spec("radnode-builtin-mr"), "cpu")
    assert (ct.name, mr.name) == ("radnode-builtin-ct", "radnode-builtin-mr")


def test_a_model_that_cannot_load_is_not_cached(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "a")
    assert spec.path is not None
    spec.path.write_bytes(b"not a TorchScript archive")
    with pytest.raises(ModelError, match="model 'a': .* is not a TorchScript file"):
        registry.get_model(spec, "cpu")
    assert registry.warm_models() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_bound_unloads_models_first(tmp_path: Path) -> None:
    a, b = _spec(tmp_path, "a"), _spec(tmp_path, "b")
    registry.get_model(a, "cuda")
    free_mb = torch.cuda.mem_get_info()[0] / 2**20
    # asking for more free memory than the GPU has: every warm model leaves first
    registry.get_model(b, "cuda", min_free_gpu_mb=free_mb * 10)
    assert [m[0] for m in registry.warm_models()] == ["b"]
