"""The paper's compute accounting (SPEC.md §3.4), so SFT and RL runs can be plotted against FLOPs.

Paper (App. C.3), with N parameters and D tokens:

    X_SFT = 6 N (D_init + D_SFT)
    X_RL  = 6 N (D_init + D_RL) + 2 N D_buffer,     D_buffer ~= lambda * D_RL

with lambda = 6 for GeneralPoints and 5.1 for V-IRL (inference tokens spent filling the rollout
buffer per trained token). Plots use GFLOPs (= FLOPs / 1e9).

The reference code instead counts `compute_tokens`: + the prompt length per generation call, and
+ 6 x (sequence length, + 1600 image tokens when pixel values are present) per PPO forward/backward.
`ComputeCounter` keeps both: measured token counts (which make the paper's formula exact instead of
using lambda) and the reference's counter.
"""

from __future__ import annotations

import dataclasses

LAMBDA = {"gp": 6.0, "virl": 5.1}
IMAGE_TOKENS = 1600  # reference: "llama 3.2 has 1601 visual tokens" (one tile's patches + class token)


def lambda_for(task: str) -> float:
    """The paper's lambda of a task's env family ("gp-l" -> GeneralPoints' 6)."""
    return LAMBDA[task.split("-")[0]]


def sft_flops(n_params: float, d_init: float, d_sft: float) -> float:
    """X_SFT = 6 N (D_init + D_SFT)."""
    return 6.0 * n_params * (d_init + d_sft)


def rl_flops(
    n_params: float, d_init: float, d_rl: float, *, lam: float | None = None, d_buffer: float | None = None
) -> float:
    """X_RL = 6 N (D_init + D_RL) + 2 N D_buffer; D_buffer = lam * D_RL unless measured."""
    if d_buffer is None:
        if lam is None:
            raise ValueError("rl_flops needs lam (6 for GP, 5.1 for V-IRL) or a measured d_buffer")
        d_buffer = lam * d_rl
    return 6.0 * n_params * (d_init + d_rl) + 2.0 * n_params * d_buffer


@dataclasses.dataclass
class ComputeCounter:
    """Running token counts of a run; `flops()` applies the paper's formula.

    `d_init` are the tokens of the SFT warm-up that produced the Init checkpoint (both arms share it).
    """

    n_params: int
    d_init: int = 0
    trained_tokens: int = 0  # D_SFT or D_RL: tokens in forward+backward passes
    buffer_tokens: int = 0  # D_buffer: tokens processed by inference (prompt + generated) in rollouts
    reference_tokens: int = 0  # the reference code's `compute_tokens`

    def add_train(self, tokens: int, *, n_images: int = 0) -> None:
        """A forward+backward over `tokens` tokens (one PPO/GRPO micro-batch or an SFT batch)."""
        self.trained_tokens += int(tokens)
        self.reference_tokens += 6 * (int(tokens) + IMAGE_TOKENS * int(n_images))

    def add_generation(self, prompt_tokens: int, generated_tokens: int) -> None:
        """One sampling call: the buffer spends inference on the prompt and on each generated token."""
        self.buffer_tokens += int(prompt_tokens) + int(generated_tokens)
        self.reference_tokens += int(prompt_tokens)

    def flops(self, *, rl: bool) -> float:
        if rl:
            return rl_flops(self.n_params, self.d_init, self.trained_tokens, d_buffer=self.buffer_tokens)
        return sft_flops(self.n_params, self.d_init, self.trained_tokens)

    def state(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, int]) -> ComputeCounter:
        return cls(**state)
