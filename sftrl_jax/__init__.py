"""sftrl_jax: SFT and RL post-training of vision-language models in JAX/Flax NNX."""

__version__ = "0.1.0"
