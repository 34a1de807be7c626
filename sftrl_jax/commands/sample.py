"""`sftrl sample`: generate a reply to one prompt (optionally with an image) for a quick check."""

from __future__ import annotations

import os
import time

from sftrl_jax.errors import UserError

HELP = "generate from a model for a quick interactive check"
EXAMPLES = """examples:
  sftrl sample --model ckpts/init --prompt 'Hello'
  sftrl sample --model /path/to/Llama-3.2-11B-Vision-Instruct --prompt 'What cards are these?' --image cards.png
  sftrl sample --model runs/rl/gp_l_tiny/final --prompt 'Hi' --temperature 0.7 --top-p 0.9 --seed 3

--model is a Hugging Face folder (config.json + safetensors) or our checkpoint (`sftrl convert`, a
run's final/). The prompt goes through the chat template as one user message (with the image first
when --image is given) followed by the assistant header; generation stops at the tokenizer's stop
tokens. The tokenizer is --tokenizer, else the model folder's, else the small one shipped for CPU runs.
"""


def add_arguments(parser):
    parser.add_argument("--model", required=True, metavar="PATH", help="HF folder or sftrl checkpoint folder")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--image", default=None, metavar="FILE", help="an image shown before the prompt (Mllama)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: see below)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="parameter dtype")
    parser.add_argument("--show-tokens", action="store_true", help="also print token ids and log-probs")


def _load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f"--image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--image {path!r} is not a readable image ({e})") from None


def run(args) -> int:
    from sftrl_jax import sampling
    from sftrl_jax.data.processor import for_model
    from sftrl_jax.models import logprobs as model_logprobs
    from sftrl_jax.sampling import inputs
    from sftrl_jax.train.state import ModelSection, load_model, tokenizer_for

    # the settings first: a bad --temperature is refused before the model loads
    inputs.check_method(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )
    path = args.model
    if not os.path.isdir(path):
        raise UserError(f"--model {path!r} is not a folder")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "model_config.json")):
        raise UserError(
            f"--model {path!r} is neither an HF folder (config.json) nor our checkpoint (model_config.json)"
        )
    section = ModelSection(init=path, tokenizer=args.tokenizer, param_dtype=args.dtype or "float32")
    tokenizer = tokenizer_for(section)
    model = load_model(section)
    config = model.config
    if tokenizer.vocab_size > config.text.num_embeddings:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {config.text.num_embeddings} "
            "embeddings: pass the model's tokenizer with --tokenizer"
        )

    image_inputs, content = {}, args.prompt
    if args.image is not None:
        processor = for_model(model)
        if processor is None:
            raise UserError(f"--image needs a vision model; {path} is a text-only {config.architecture}")
        if tokenizer.image_token_id != config.image_token_index:
            raise UserError(
                f"the tokenizer's <|image|> id {tokenizer.image_token_id} is not the model's image_token_index "
                f"{config.image_token_index}: pass the model's tokenizer with --tokenizer"
            )
        arrays = processor([[_load_image(args.image)]])
        image_inputs = {k: arrays[k] for k in model_logprobs.PIXEL_KEYS}
        content = [{"type": "image"}, {"type": "text", "text": args.prompt}]
    ids = tokenizer.chat_ids([{"role": "user", "content": content}], add_generation_prompt=True)

    start = time.perf_counter()
    result = sampling.generate(
        model,
        [ids],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop_tokens=[t for t in tokenizer.stop_ids if t < config.text.vocab_size],
        seed=args.seed,
        pad_id=tokenizer.pad_id,
        **image_inputs,
    )
    seconds = time.perf_counter() - start
    response = result.responses()[0]
    print(tokenizer.decode([t for t in response if t not in tokenizer.stop_ids]))
    if args.show_tokens:
        print("tokens:", response)
        print("logprobs:", [round(float(x), 4) for x in result.logprobs_temperature[0, : len(response)]])
    stopped = bool(response) and response[-1] in tokenizer.stop_ids
    print(
        f"[{len(ids)} prompt tokens, {len(response)} generated ({'stop token' if stopped else 'max_new_tokens'}), "
        f"{seconds:.1f}s including compilation]"
    )
    return 0
