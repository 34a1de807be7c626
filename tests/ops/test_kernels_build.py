"""`sftrl_jax.kernels`: built once into the cache, the fallback when they cannot be built, and the
seam's policy following them (`ops.policy_for`)."""

import os
import shutil

import jax
import pytest

from sftrl_jax import kernels, ops, sampling
from sftrl_jax.models import config as config_lib
from sftrl_jax.parallel import mesh as mesh_lib
from tests.sampling.helpers import peaked_model

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_kernels = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the kernels cannot be built here")


def test_kernels_fall_back_when_they_cannot_be_built(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SFTRL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not kernels.available()
    assert "no C++ compiler" in kernels.error() and "no-such-compiler" in kernels.error()
    model = peaked_model(config_lib.LlamaConfig.tiny(), seed=3)
    one_cpu = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("fsdp=-1"), devices=jax.devices()[:1])
    assert not ops.policy_for(one_cpu).cpu_kernels
    result = sampling.generate(model, [[1, 5, 9]], max_new_tokens=4, temperature=0.0)
    assert result.tokens.shape == (1, 4)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SFTRL_CPU_KERNELS", "0")
    assert not kernels.available() and kernels.error() is None


@needs_kernels
def test_kernels_build_into_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SFTRL_KERNEL_CACHE", str(tmp_path))
    assert kernels.available(), kernels.error()
    built_files = list(tmp_path.glob("cpu_kernels-*.so"))
    assert len(built_files) == 1 and kernels._state["path"] == built_files[0]
    stamp = built_files[0].stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.available()
    assert list(tmp_path.glob("*")) == built_files and built_files[0].stat().st_mtime_ns == stamp
