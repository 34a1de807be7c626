"""`sampling.generate`: log-probs vs the training forward, seeds, stops, truncation support,
compilation count per bucket, bad input, and sharded == one device."""

import jax
import numpy as np
import pytest

from sftrl_jax import sampling
from sftrl_jax.errors import UserError
from sftrl_jax.models import config as config_lib
from sftrl_jax.parallel import make_mesh
from sftrl_jax.sampling import methods
from tests.sampling.helpers import peaked_model

M = 8  # max_new_tokens of most tests (one compiled decode program per config)
SAMPLE = dict(temperature=1.5, top_k=4, top_p=0.6)  # the sampling config most tests share (compiled once)
PROMPTS = [[1, 5, 9, 22, 7], [1, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]  # ragged: left padded to 16


@pytest.fixture(scope="module")
def llama():
    return peaked_model(config_lib.LlamaConfig.tiny(), seed=1)


@pytest.fixture(scope="module")
def mllama():
    return peaked_model(config_lib.MllamaConfig.tiny(), seed=2)


def image_inputs(cfg: config_lib.MllamaConfig, *, seed: int = 0):
    """Two prompts with one image each (2x2 and 1x2 tiles), ragged, image token not first."""
    v, img = cfg.vision, cfg.image_token_index
    ratios = [list(r) for r in v.supported_aspect_ratios]
    ar_ids = np.array([[ratios.index([2, 2]) + 1], [ratios.index([1, 2]) + 1]])
    ar_mask = np.zeros((2, 1, v.max_num_tiles), np.int64)
    ar_mask[0, 0, :4], ar_mask[1, 0, :2] = 1, 1
    rng = np.random.default_rng(seed)
    px = rng.standard_normal((2, 1, v.max_num_tiles, 3, v.image_size, v.image_size)).astype(np.float32)
    px *= ar_mask[..., None, None, None]
    prompts = [[1, 5, img, 9, 22, 7, 40], [1, img, 3]]
    return prompts, dict(pixel_values=px, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask)


def test_logprobs_equal_the_teacher_forced_training_forward(llama):
    for kw in (SAMPLE, dict(temperature=0.0)):
        result = sampling.generate(llama, PROMPTS, max_new_tokens=M, stop_tokens=(2,), seed=5, **kw)
        assert sampling.logprob_gap(llama, PROMPTS, result) < 1e-5
        # raw log-probs: the same forward at T = 1
        trainer = sampling.teacher_forced_logprobs(llama, PROMPTS, result.responses(), temperature=1.0)
        for b, lp in enumerate(trainer):
            np.testing.assert_allclose(result.logprobs_raw[b, : len(lp)], lp, atol=1e-5)


def test_logprobs_with_images_equal_the_teacher_forced_forward(mllama):
    prompts, images = image_inputs(mllama.config)
    result = sampling.generate(mllama, prompts, max_new_tokens=M, temperature=0.8, seed=0, **images)
    assert sampling.logprob_gap(mllama, prompts, result, **images) < 1e-5
    # the image matters: another image, other log-probs for the same tokens
    _, other = image_inputs(mllama.config, seed=1)
    forced = sampling.teacher_forced_logprobs(mllama, prompts, result.responses(), temperature=0.8, **other)
    assert np.abs(np.stack(forced) - result.logprobs_temperature).max() > 1e-3


def test_fixed_seed_is_reproducible(llama):
    kw = dict(max_new_tokens=M, **SAMPLE)
    a, b = (sampling.generate(llama, PROMPTS, seed=11, **kw) for _ in range(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    c = sampling.generate(llama, PROMPTS, seed=12, **kw)
    assert np.any(a.tokens != c.tokens)


def test_stop_tokens_end_rows_and_the_loop(llama):
    greedy = sampling.generate(llama, PROMPTS, max_new_tokens=M, temperature=0.0)
    assert greedy.steps == M and np.all(greedy.lengths == M)
    # stop row 0 at its 3rd token and row 2 at its 1st; row 1 runs to the end
    stops = (int(greedy.tokens[0, 2]), int(greedy.tokens[2, 0]))
    assert not set(stops) & set(greedy.tokens[1].tolist())
    r = sampling.generate(llama, PROMPTS, max_new_tokens=M, temperature=0.0, stop_tokens=stops, pad_id=0)
    first_stop = [next((i + 1 for i, t in enumerate(row) if t in stops), M) for row in greedy.tokens.tolist()]
    np.testing.assert_array_equal(r.lengths, first_stop)
    for b, n in enumerate(r.lengths):
        np.testing.assert_array_equal(r.tokens[b, :n], greedy.tokens[b, :n])
        assert np.all(r.tokens[b, n:] == 0) and np.all(r.logprobs_temperature[b, n:] == 0)
    # every row stops at its first token: the decode loop exits after the prefill's token
    first = tuple({int(t) for t in greedy.tokens[:, 0]})
    early = sampling.generate(llama, PROMPTS, max_new_tokens=M, temperature=0.0, stop_tokens=first)
    assert early.steps == 1 and np.all(early.lengths == 1)


@jax.jit
def _logits(model, ids):
    return model(ids).logits


def test_top_k_and_top_p_tokens_lie_in_the_teacher_forced_kept_set(llama):
    prompts = PROMPTS
    for method in (methods.Method(**SAMPLE),):
        r = sampling.generate(
            llama, prompts, max_new_tokens=M, temperature=method.temperature, top_k=method.top_k, top_p=method.top_p
        )
        # the full distribution at every generated position, from one right-padded training forward
        seqs = [p + resp for p, resp in zip(prompts, r.responses())]
        ids = np.zeros((len(seqs), 32), np.int32)
        for b, seq in enumerate(seqs):
            ids[b, : len(seq)] = seq
        logits = np.asarray(_logits(llama, ids)) / method.temperature
        for b, (p, resp) in enumerate(zip(prompts, r.responses())):
            keep = np.asarray(methods.kept(logits[b, len(p) - 1 : len(p) - 1 + len(resp)], **_filters(method)))
            assert keep[np.arange(len(resp)), resp].all(), (method, b)
            assert keep.sum(-1).max() < logits.shape[-1]


def _filters(method):
    return dict(top_k=method.top_k, top_p=method.top_p)


def test_compiles_once_per_bucket(llama):
    kw = dict(max_new_tokens=4, temperature=0.0, stop_tokens=(5,))
    start = sampling.compile_count()
    for prompts in ([[1, 2, 3], [4, 5, 6, 7, 8]], [[9] * 12, [1]], [[1] * 16, [2] * 15]):  # bucket 16, batch 2
        sampling.generate(llama, prompts, **kw)
    assert sampling.compile_count() - start == 2  # one prefill, one decode
    for prompts in ([[1] * 17, [2] * 20], [[3] * 32, [1, 2]]):  # bucket 32
        sampling.generate(llama, prompts, **kw)
    assert sampling.compile_count() - start == 4
    for prompts in ([[1, 2]] * 3, [[1, 2, 3]] * 4):  # batch bucket 4
        sampling.generate(llama, prompts, **kw)
    assert sampling.compile_count() - start == 6
    assert [sampling.prompt_bucket(n) for n in (1, 16, 17, 200, 257, 300)] == [16, 16, 32, 256, 384, 384]
    assert [sampling.batch_bucket(n, 4) for n in (1, 3, 5, 9)] == [4, 4, 8, 16]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[]), "non-empty list"),
        (dict(prompts=[[1, 999]]), "token id 999 outside"),
        (
            dict(max_length=40, prompts=[[1] * 33]),
            "33 tokens \\(padded to 64\\).*needs 71 slots, more than max_length=40",
        ),
        (dict(max_length=20), "needs 23 slots, more than max_length=20"),
        (dict(stop_tokens=(2, 256)), "stop token 256 is outside the vocabulary"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(pixel_values=np.zeros((3, 1, 4, 3, 28, 28))), "no vision tower"),
    ],
)
def test_bad_requests_are_user_errors(llama, kwargs, match):
    kwargs = {"prompts": PROMPTS, "max_new_tokens": M, **kwargs}
    with pytest.raises(UserError, match=match):
        sampling.generate(llama, **kwargs)


def test_bad_image_inputs_are_user_errors(mllama):
    prompts, images = image_inputs(mllama.config)
    v = mllama.config.vision
    cases = [
        (dict(pixel_values=images["pixel_values"][:, :, :, :, :14]), "pixel_values has shape"),
        (dict(pixel_values=images["pixel_values"][:1]), "pixel_values has shape"),
        (dict(aspect_ratio_ids=images["aspect_ratio_ids"][:, :0]), "aspect_ratio_ids has shape"),
        (dict(aspect_ratio_mask=np.ones((2, 1, v.max_num_tiles + 1))), "aspect_ratio_mask has shape"),
        (dict(aspect_ratio_mask=None), "missing \\['aspect_ratio_mask'\\]"),
        (dict(cross_attention_mask=[np.ones((3, 1, 4))] * 2), "cross_attention_mask\\[0\\] has shape"),
    ]
    for change, match in cases:
        with pytest.raises(UserError, match=match):
            sampling.generate(mllama, prompts, max_new_tokens=M, **{**images, **change})
    with pytest.raises(UserError, match="has 2 <\\|image\\|> tokens but pixel_values holds 1"):
        sampling.generate(
            mllama, [prompts[0] + [mllama.config.image_token_index], prompts[1]], max_new_tokens=M, **images
        )
    with pytest.raises(UserError, match="no pixel_values were given"):
        sampling.generate(mllama, prompts, max_new_tokens=M)


@pytest.mark.parametrize("name", ["llama", pytest.param("mllama", marks=pytest.mark.slow)])
def test_sharded_matches_one_device(name, llama, mllama, n_devices):
    if n_devices < 8:
        pytest.skip("needs 8 devices")
    one = llama if name == "llama" else mllama
    mesh = make_mesh((2, 2, 2))
    sharded = peaked_model(one.config, seed=1 if name == "llama" else 2, mesh=mesh)
    q = sharded.model.layers[0].self_attn.q_proj[...] if name == "llama" else None
    assert q is None or len(q.sharding.device_set) == 8
    if name == "llama":
        prompts, extra, kw = PROMPTS, {}, dict(**SAMPLE, seed=3)
    else:
        prompts, extra = image_inputs(one.config)
        kw = dict(temperature=0.0)
    ref = sampling.generate(one, prompts, max_new_tokens=M, **kw, **extra)
    out = sampling.generate(sharded, prompts, max_new_tokens=M, **kw, **extra)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs_temperature, ref.logprobs_temperature, atol=1e-5)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", pytest.param("mllama", marks=pytest.mark.slow)])
def test_decode_layout_is_tensor_parallel_and_samples_what_one_device_does(name, n_devices):
    """`sampling.layout`: on a mesh whose fsdp x tensor (4 here) divides the heads and the MLP width,
    "auto" samples tensor-parallel: the prepared weights hold 1/4 of each matrix per device, split
    by heads / MLP width (not by the embedding dimension, as training's FSDP does), and the tokens
    and log-probs are those of one device."""
    if n_devices < 8:
        pytest.skip("needs 8 devices")
    from flax import nnx

    from sftrl_jax.sampling import sampler

    cls = config_lib.LlamaConfig if name == "llama" else config_lib.MllamaConfig
    cfg = cls.tiny(num_heads=8, num_kv_heads=4, head_dim=8)
    if name == "mllama":
        import dataclasses

        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_heads=4))
    mesh = make_mesh((2, 2, 2))
    assert sampler.resolve_layout("auto", cfg, mesh) == "decode"
    assert sampler.resolve_layout("auto", cls.tiny(), mesh) == "train"  # 2 kv heads on 4 ways
    assert sampler.resolve_layout("auto", cfg, None) == "train"
    with pytest.raises(UserError, match="unknown sampling layout 'tp'"):
        sampler.resolve_layout("tp", cfg, mesh)
    one = peaked_model(cfg, seed=4)
    sharded = peaked_model(cfg, seed=4, mesh=mesh)
    _, params = nnx.split(sharded)
    prepared = sampler.prepare_weights(params, sharded.dtype, mesh=mesh, layout="decode")
    lm = "model" if name == "llama" else "language_model"
    layer = prepared[lm]["layers"][0]
    q, o, down = layer["self_attn"]["q_proj"][...], layer["self_attn"]["o_proj"][...], layer["mlp"]["down_proj"][...]
    train_q = params[lm]["layers"][0]["self_attn"]["q_proj"][...]
    assert train_q.sharding.spec[0] is not None  # training: FSDP over the embedding rows
    assert q.sharding.spec[0] is None and q.sharding.spec[1] == ("fsdp", "tensor")  # [D, N, H]: by heads
    assert o.sharding.spec[0] == ("fsdp", "tensor")  # [N, H, D]: by its input heads
    assert down.sharding.spec[0] == ("fsdp", "tensor")  # [F, D]: by the MLP width
    for x in (q, o, down):
        assert x.addressable_shards[0].data.size * 4 == x.size  # a quarter of the matrix per device
    if name == "llama":
        prompts, extra, kw = PROMPTS, {}, dict(**SAMPLE, seed=3)
    else:
        prompts, extra = image_inputs(cfg)
        kw = dict(temperature=0.0)
    ref = sampling.generate(one, prompts, max_new_tokens=M, **kw, **extra)
    for layout in ("auto", "decode", "train"):
        out = sampling.generate(sharded, prompts, max_new_tokens=M, layout=layout, **kw, **extra)
        np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=layout)
        np.testing.assert_allclose(out.logprobs_temperature, ref.logprobs_temperature, atol=1e-5, err_msg=layout)
