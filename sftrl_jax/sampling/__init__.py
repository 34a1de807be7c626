"""Batched, jit-compiled sampling with a KV cache (text and image prompts), and a rollout policy."""

from sftrl_jax.sampling.inputs import batch_bucket, prompt_bucket
from sftrl_jax.sampling.logprobs import logprob_gap, max_gap, teacher_forced_logprobs
from sftrl_jax.sampling.methods import Method
from sftrl_jax.sampling.policy import Policy
from sftrl_jax.sampling.sampler import GenerateResult, SamplerConfig, compile_count, generate

__all__ = [
    "GenerateResult",
    "Method",
    "Policy",
    "SamplerConfig",
    "batch_bucket",
    "compile_count",
    "generate",
    "logprob_gap",
    "max_gap",
    "prompt_bucket",
    "teacher_forced_logprobs",
]
