"""Test set-up: 8 fake CPU devices so sharding is exercised for real, offline Hugging Face."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; parse them once with defaults.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def n_devices():
    import jax

    return jax.device_count()
