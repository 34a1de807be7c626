"""sftrl_jax: SFT and RL post-training of vision-language models in JAX/Flax NNX."""

__version__ = "0.1.0"

from sftrl_jax import hostmem as _hostmem

_hostmem.tune()  # before JAX starts its threads; see sftrl_jax/hostmem.py (SFTRL_MALLOC_TUNING=0: off)
