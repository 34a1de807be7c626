"""One GPU, under 8 minutes, nothing downloaded: parity, sampler speed and step MFU at 1B shape.

    python tools/device_check.py [--json device_check.json] [--peak-flops 989e12]
    python tools/device_check.py --smoke        # tiny shapes on CPU (the test suite runs this)

Every model has random weights (ours, `models.build.create_model`), written once with our converter
(`models.save_pretrained`, bf16) and read back by both sides, so both hold the same weights.
- parity_llama / parity_mllama: bf16 logits of a 1B-shaped Llama (`LlamaConfig.llama_3_2_1b`) and a
  small Mllama (text 512 x 8 layers, vision 256 x 8 + 2, one 112-px image of 2 or 4 tiles per row),
  ours and transformers' (torch on the same device), each against transformers in fp32 on the same
  weights (max |x - ref| / max |ref|). Ours passes when its error is within 2x transformers' own bf16
  error + 1e-3.
- sampler: our `sampling.generate` vs transformers' `generate` on the bf16 1B Llama, greedy, the same
  random prompts, no stop tokens (every row decodes `max_new_tokens`): tokens/s after a warm-up call
  and their ratio (`ours_over_hf`). `greedy_agree` (the mean fraction of each row's tokens before the two first differ)
  is for information: random weights give near-ties that bf16 rounding breaks either way.
- sft_step / ppo_step: our SFT step (`sft.train.make_train_step`) and PPO update
  (`rl.ppo.make_update_step`, value head on the shared backbone) at 1B shape: fp32 parameters, bf16
  compute, AdamW, median step time after the compile; MFU = model FLOPs per step
  (`planning.flops.ideal_train_flops`: 3 forwards' matrix products) / time / `--peak-flops`
  (H200 bf16 dense: 989 TFLOP/s); also against the measured bf16 matmul peak (`matmul_peak`).
- sft_step_lora / ppo_step_lora: the same two steps on the same 1B model with LoRA adapters
  (`models.lora.add`, rank 16, alpha 32, on the attention and MLP products; the base frozen): the
  gradients and the AdamW state cover the adapters (and PPO's value head) only, as in `sftrl sft` /
  `sftrl rl` with a `lora:` section. MFU's model FLOPs: `ideal_train_flops(..., frozen_base=True)`
  (2 forwards: no weight gradients of the base). Also the trainable and total parameter counts, and
  whether the base came out of the steps unchanged and every trainable parameter moved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")  # torch shares the GPU with JAX

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = {
    "full": dict(
        parity_rows=2, parity_len=256, gen_batch=8, gen_prompt=64, gen_new=128,
        sft_rows=8, sft_len=2048, sft_accum=2, ppo_rows=16, ppo_micro=8, ppo_len=1024, steps=5, matmul=8192,
        value_hidden=(1024, 512),
    ),
    "smoke": dict(
        parity_rows=2, parity_len=16, gen_batch=2, gen_prompt=16, gen_new=8,
        sft_rows=2, sft_len=16, sft_accum=1, ppo_rows=2, ppo_micro=1, ppo_len=16, steps=2, matmul=256,
        value_hidden=(32, 16),
    ),
}  # fmt: skip
ROWS = (
    "parity_llama", "parity_mllama", "sampler", "sft_step", "ppo_step", "sft_step_lora", "ppo_step_lora", "matmul_peak",
)  # fmt: skip


def llama_config(smoke: bool):
    from sftrl_jax.models import config as mc

    return mc.LlamaConfig.tiny() if smoke else mc.LlamaConfig.llama_3_2_1b()


def mllama_config(smoke: bool):
    from sftrl_jax.models import config as mc

    tiny = mc.MllamaConfig.tiny()
    if smoke:
        return tiny.with_transformers_semantics()
    text = dataclasses.replace(
        tiny.text, vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
        num_kv_heads=4, head_dim=64, cross_attention_layers=(3, 7), max_position_embeddings=2048,
    )  # fmt: skip
    vision = dataclasses.replace(
        tiny.vision, hidden_size=256, intermediate_size=1024, num_layers=8, num_global_layers=2, num_heads=4,
        image_size=112, intermediate_layers_indices=(3, 7),
    )  # fmt: skip
    return mc.MllamaConfig(text, vision, image_token_index=8192).with_transformers_semantics()


def rel_diff(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


class Torch:
    """transformers' side on the device JAX uses (cuda when torch sees a GPU, else cpu)."""

    def __init__(self):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32 (convs too)
        torch.backends.cudnn.allow_tf32 = False

    def load(self, folder: str, config, dtype: str):
        import transformers

        from sftrl_jax.models import config as mc

        cls = transformers.MllamaForConditionalGeneration
        if not isinstance(config, mc.MllamaConfig):
            cls = transformers.LlamaForCausalLM
        model = cls.from_pretrained(folder, dtype=getattr(self.torch, dtype), attn_implementation="sdpa")
        return model.to(self.device).eval()

    def logits(self, model, batch: dict[str, np.ndarray]) -> np.ndarray:
        with self.torch.no_grad():
            inputs = {k: self.torch.from_numpy(np.asarray(v)).to(self.device) for k, v in batch.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            return model(**inputs).logits.float().cpu().numpy()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def free(self, *models):
        for m in models:
            m.to("meta")
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def our_logits(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        inputs = dict(inputs)
        return nnx.merge(graphdef, state)(inputs.pop("input_ids"), **inputs).logits

    return np.asarray(forward(state, {k: jnp.asarray(v) for k, v in batch.items()}), np.float32)


def text_batch(config, rows: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(3, config.text.vocab_size, (rows, length))
    return {"input_ids": ids, "attention_mask": np.ones((rows, length), np.int64)}


def image_batch(config, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Two rows, one image each (2x2 and 1x2 tiles), the image token at position 1."""
    v = config.vision
    rng = np.random.default_rng(seed)
    ratios = [tuple(r) for r in v.supported_aspect_ratios]
    ar_ids = np.array([[ratios.index((2, 2)) + 1], [ratios.index((1, 2)) + 1]], np.int64)
    ar_mask = np.zeros((2, 1, v.max_num_tiles), np.int64)
    ar_mask[0, 0, :4], ar_mask[1, 0, :2] = 1, 1
    px = rng.standard_normal((2, 1, v.max_num_tiles, v.num_channels, v.image_size, v.image_size))
    px = (px * ar_mask[..., None, None, None]).astype(np.float32)
    batch = text_batch(config, 2, length, seed)
    batch["input_ids"][:, 1] = config.image_token_index
    xmask = np.zeros((2, length, 1, v.max_num_tiles), np.int64)
    xmask[:, 1:] = ar_mask[:, None]
    batch.update(pixel_values=px, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask, cross_attention_mask=xmask)
    return batch


def parity(th: Torch, folder: str, config, batch) -> tuple[dict, tuple]:
    """Our bf16 logits and transformers' bf16 ones against transformers' fp32; returns the row and
    (our bf16 model, transformers' bf16 model) for the sampler check."""
    import jax.numpy as jnp

    from sftrl_jax import models

    hf32 = th.load(folder, config, "float32")
    ref = th.logits(hf32, batch)
    th.free(hf32)
    hf16 = th.load(folder, config, "bfloat16")
    theirs = th.logits(hf16, batch)
    ours_model = models.from_pretrained(folder, dtype=jnp.bfloat16, config=config)
    ours = our_logits(ours_model, batch)
    err, hf_err = rel_diff(ours, ref), rel_diff(theirs, ref)
    row = {
        "ours_vs_fp32": err,
        "hf_bf16_vs_fp32": hf_err,
        "ours_vs_hf_bf16": rel_diff(ours, theirs),
        "tolerance": 2 * hf_err + 1e-3,
        "ok": bool(err <= 2 * hf_err + 1e-3),
        "shape": list(batch["input_ids"].shape),
    }
    return row, (ours_model, hf16)


def sampler(th: Torch, ours_model, hf_model, config, s: dict) -> dict:
    from sftrl_jax.sampling import generate

    b, p, n = s["gen_batch"], s["gen_prompt"], s["gen_new"]
    prompts = np.random.default_rng(1).integers(3, config.text.vocab_size, (b, p))

    def ours():
        r = generate(ours_model, prompts.tolist(), max_new_tokens=n, temperature=0.0, pad_id=0, max_length=p + n)
        return np.asarray(r.tokens)  # no stop tokens: every row decodes n tokens

    torch = th.torch
    hf_model.generation_config.eos_token_id = None  # every row decodes n tokens, as ours do
    ids = torch.from_numpy(prompts).to(th.device)

    def theirs():
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
            )
        th.sync()
        return out[:, p:].cpu().numpy()

    (compile_s, ours_tokens, ours_s), (_, hf_tokens, hf_s) = _time(ours), _time(theirs)
    agree = [int(np.argmax(np.append(a != h, True))) / n for a, h in zip(ours_tokens, hf_tokens)]
    return {
        "ours_tokens_per_s": b * n / ours_s,
        "hf_tokens_per_s": b * n / hf_s,
        "ours_over_hf": hf_s / ours_s,
        "greedy_agree": float(np.mean(agree)),
        "first_call_s": compile_s,
        "shape": [b, p, n],
    }


def _time(fn):
    """(first call's seconds, last result, second call's seconds)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn()
    return first, out, time.perf_counter() - t0


def step_row(step, state, batch, flops: float, peak: float, measured: float, steps: int, check=None) -> dict:
    """Median step time after the compile, MFU and losses; `check(final state) -> dict` adds its cells."""
    import jax

    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times, losses = [], [float(m["loss"])]
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
    t = statistics.median(times)
    row = {
        "step_s": t,
        "first_call_s": compile_s,
        "model_flops": flops,
        "mfu": flops / t / peak,
        "mfu_vs_measured_peak": flops / t / measured,
        "finite": bool(all(math.isfinite(x) for x in losses)),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    return row | (check(state) if check else {})


def lora_check(params):
    """A LoRA row's extra cells: parameter counts, and (on the state after the steps) whether the
    frozen base is bit-for-bit the one it started from and every trainable parameter moved."""
    import jax
    import jax.numpy as jnp

    from sftrl_jax.models import lora

    trainable0, frozen0 = lora.partition(params)

    def count(tree):
        return int(sum(x.size for x in jax.tree.leaves(tree)))

    def check(state) -> dict:
        trainable, frozen = lora.partition(state.params)
        same = jax.tree.map(lambda a, b: jnp.array_equal(a, b), frozen, frozen0)
        moved = jax.tree.map(lambda a, b: jnp.any(a != b), trainable, trainable0)
        return {
            "trainable_params": count(trainable0),
            "params": count(trainable0) + count(frozen0),
            "base_unchanged": bool(all(jax.tree.leaves(same))),
            "trainable_moved": bool(all(jax.tree.leaves(moved))),
        }

    return check


def train_steps(config, params, graphdef, rest, mesh, s: dict, peak: float, measured: float) -> dict:
    """The SFT and PPO step rows on copies of the fp32 1B parameters (each step donates its state),
    without and with LoRA adapters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sftrl_jax import ops
    from sftrl_jax.models import lora
    from sftrl_jax.planning.flops import ideal_train_flops
    from sftrl_jax.rl import ppo
    from sftrl_jax.rl.value_head import PolicyWithValue, ValueHead
    from sftrl_jax.sft.train import make_train_step
    from sftrl_jax.train import optim
    from sftrl_jax.train.state import TrainState, rng_data

    policy = ops.policy_for(mesh)
    ocfg = optim.OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant")
    lr_fn = optim.schedule(ocfg, 1000)
    rng = np.random.default_rng(2)
    V = config.text.vocab_size
    out = {}

    def state_for(p):
        p = jax.tree.map(jnp.copy, p)
        trainable = lora.partition(p)[0]  # a LoRA model's optimiser sees its adapters only (train/run.py)
        tx = optim.make_optimizer(ocfg, trainable, total_steps=1000)
        opt_state = optim.init_state(tx, trainable, mesh)
        return tx, TrainState(step=jnp.int32(0), params=p, opt_state=opt_state, rng=rng_data(0))

    B, T = s["sft_rows"], s["sft_len"]
    ids = rng.integers(3, V, (B, T))
    mask = np.ones((B, T), np.float32)
    mask[:, -1] = 0
    sbatch = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones((B, T), np.int32),
        "targets": np.roll(ids, -1, axis=1).astype(np.int32),
        "loss_mask": mask,
    }

    def sft(name, graphdef, params, rest, frozen_base):
        tx, state = state_for(params)
        fn = make_train_step(graphdef, rest, tx, grad_accum=s["sft_accum"], lr_fn=lr_fn, policy=policy)
        flops = ideal_train_flops(config, rows=B, length=T, remat=False, frozen_base=frozen_base)
        check = lora_check(params) if frozen_base else None
        batch = {k: jnp.asarray(v) for k, v in sbatch.items()}
        out[name] = step_row(jax.jit(fn, donate_argnums=0), state, batch, flops, peak, measured, s["steps"], check)
        out[name]["shape"] = [B, T, s["sft_accum"]]

    P, L = s["ppo_rows"], s["ppo_len"]
    c = L // 4  # prompt tokens; the rest is the response
    ids = rng.integers(3, V, (P, L))
    resp = np.zeros((P, L), np.float32)
    resp[:, c - 1 : L - 1] = 1.0
    pbatch = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones((P, L), np.int32),
        "targets": (np.roll(ids, -1, axis=1) * resp).astype(np.int32),
        "resp_mask": resp,
        "weights": resp,
        "old_token_logp": resp * -math.log(V),  # about a random model's: ratios near 1
        "value_index": np.full((P,), c - 1, np.int32),
        "old_values": np.zeros((P,), np.float32),
        "advantages": rng.standard_normal(P).astype(np.float32),
        "returns": rng.standard_normal(P).astype(np.float32),
    }

    def ppo_step(name, model, frozen_base):
        # the value head after `lora.add`: trainable beside the adapters, as in `sftrl rl`
        head = ValueHead(config.text.hidden_size, hidden=s["value_hidden"], rngs=nnx.Rngs(1))
        pgraph, pparams, prest = nnx.split(PolicyWithValue(model, head), nnx.Param, ...)
        pcfg = ppo.PPOConfig(samples_per_step=P, micro_batch=s["ppo_micro"])
        tx, state = state_for(pparams)
        fn = ops.traced_with(ppo.make_update_step(pgraph, prest, tx, pcfg, lr_fn=lr_fn, temperature=1.0), policy)
        flops = ideal_train_flops(config, rows=P, length=L, remat=False, frozen_base=frozen_base)
        check = lora_check(pparams) if frozen_base else None
        batch = {k: jnp.asarray(v) for k, v in pbatch.items()}
        out[name] = step_row(jax.jit(fn, donate_argnums=0), state, batch, flops, peak, measured, s["steps"], check)
        out[name]["shape"] = [P, L, s["ppo_micro"]]

    with jax.set_mesh(mesh):
        sft("sft_step", graphdef, params, rest, frozen_base=False)
        ppo_step("ppo_step", nnx.merge(graphdef, params, rest), frozen_base=False)
        # copy: `lora.add` marks the variables it freezes, and a plain merge shares them with `params`
        model = nnx.merge(graphdef, params, rest, copy=True)
        lora.add(model, lora.LoRASection(rank=16, alpha=32), seed=0)
        lgraph, lparams, lrest = nnx.split(model, nnx.Param, ...)
        sft("sft_step_lora", lgraph, lparams, lrest, frozen_base=True)
        ppo_step("ppo_step_lora", model, frozen_base=True)
    return out


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    from sftrl_jax import models
    from sftrl_jax.models import build
    from sftrl_jax.parallel import mesh as mesh_lib
    from sftrl_jax.train import metrics
    from sftrl_jax.train.state import split_params

    t_start = time.perf_counter()
    s = SHAPES["smoke" if args.smoke else "full"]
    th = Torch()
    rows: dict[str, dict] = {}
    info = {
        "mode": "smoke" if args.smoke else "full",
        "jax_device": str(jax.devices()[0].device_kind),
        "torch_device": th.device,
        "peak_flops_flag": args.peak_flops,
    }
    measured = metrics.peak_flops(n=s["matmul"], dtype="bfloat16")
    rows["matmul_peak"] = {"measured_flops": measured, "fraction_of_flag": measured / args.peak_flops}
    t0 = _lap(info, "matmul_peak", t_start)
    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("data=1,fsdp=1,tensor=1"), devices=jax.devices()[:1])
    llama = llama_config(args.smoke)
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        # The 1B Llama: random fp32 weights, written as bf16 for both sides' parity and sampler checks.
        model = build.create_model(llama, mesh=mesh, param_dtype=jnp.float32, dtype=jnp.bfloat16, seed=0)
        models.save_pretrained(model, os.path.join(tmp, "llama"), dtype=jnp.bfloat16)
        batch = text_batch(llama, s["parity_rows"], s["parity_len"])
        rows["parity_llama"], (ours16, hf16) = parity(th, os.path.join(tmp, "llama"), llama, batch)
        t0 = _lap(info, "parity_llama", t0)
        rows["sampler"] = sampler(th, ours16, hf16, llama, s)
        t0 = _lap(info, "sampler", t0)
        th.free(hf16)
        del ours16, hf16

        mllama = mllama_config(args.smoke)
        small = build.create_model(mllama, param_dtype=jnp.float32, seed=3)
        models.save_pretrained(small, os.path.join(tmp, "mllama"), dtype=jnp.bfloat16)
        del small
        rows["parity_mllama"], (m16, hf_m16) = parity(
            th, os.path.join(tmp, "mllama"), mllama, image_batch(mllama, s["parity_len"])
        )
        th.free(hf_m16)
        del m16, hf_m16
        t0 = _lap(info, "parity_mllama", t0)
    graphdef, params, rest = split_params(model)
    del model
    rows.update(train_steps(llama, params, graphdef, rest, mesh, s, args.peak_flops, measured))
    _lap(info, "train_steps", t0)
    info["total_s"] = time.perf_counter() - t_start
    return {"info": info, "rows": {name: rows[name] for name in ROWS}}


def _lap(info: dict, name: str, t0: float) -> float:
    """Records the seconds since `t0` as `info["phase_s"][name]`; returns now."""
    now = time.perf_counter()
    info.setdefault("phase_s", {})[name] = round(now - t0, 2)
    return now


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3e}" if v and (abs(v) < 1e-2 or abs(v) >= 1e5) else f"{v:.4g}"
    return str(v)


def table(result: dict) -> str:
    """One line per row: name, then its numbers as key=value."""
    info = result["info"]
    lines = [
        f"device_check ({info['mode']}): jax on {info['jax_device']}, torch on {info['torch_device']}, "
        f"peak flag {info['peak_flops_flag']:.3e} FLOP/s, total {info['total_s']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in info['phase_s'].items())})",
        f"{'check':<14} | numbers",
        f"{'-' * 14}-+-{'-' * 60}",
    ]
    for name in ROWS:
        cells = ", ".join(f"{k}={_fmt(v)}" for k, v in result["rows"][name].items())
        lines.append(f"{name:<14} | {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU in well under a minute)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--peak-flops", type=float, default=989e12, help="MFU's peak, FLOP/s (H200 bf16 dense: 989e12)")
    args = p.parse_args(argv)
    import jax

    if not args.smoke and jax.default_backend() == "cpu":
        print("device_check: JAX sees no accelerator; the 1B checks need a GPU (or use --smoke)", file=sys.stderr)
        return 2
    result = run(args)
    print(table(result))
    if result["info"]["total_s"] > 480 and not args.smoke:
        print(f"device_check: took {result['info']['total_s']:.0f} s, over the 8-minute budget", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(result["rows"][r]["ok"] for r in ("parity_llama", "parity_mllama")) else 1


if __name__ == "__main__":
    sys.exit(main())
