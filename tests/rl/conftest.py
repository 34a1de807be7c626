"""Fixtures of the RL tests."""

import jax
import pytest


@pytest.fixture
def xla_cache(tmp_path):
    """A persistent XLA cache for one test: later Trainers (and subprocesses given the returned
    environment variables) reuse the first run's executables instead of compiling them again (same
    HLO, same executable)."""
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path / "xla_cache")
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for k, v in before.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
