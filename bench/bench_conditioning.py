"""The cost of each conditioning kind per sampling step, against class labels, in one process.

    python bench/bench_conditioning.py [--encoder clip|t5|DIR] [--size 16] [--batch 16]

For each kind it builds the server denoiser latentfuse trains (the collaboration benchmark's
width, [32, 64, 64], at a `--size` latent), times one guided sampling step (the conditional and
the null branch in one batch of 2b) and prints its ratio to the class-label denoiser's step;
for text it also times the frozen text encoder on b prompts, which runs once per prompt, not
once per step, and prints what it adds to a `--steps`-step chain. Without network access the
text encoder is a tiny random CLIP or T5 built here (`--encoder DIR` takes a real one), so the
encoder's own time is a lower bound; the cross-attention's cost depends only on its width
(`--width`, the encoder's hidden size: 512 for CLIP ViT-B/32, 512 for T5-small).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="clip", help="clip, t5 (tiny, built here) or DIR")
    parser.add_argument("--size", type=int, default=16, help="latent side (16: 32x32 images)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=512, help="text states' width")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--attributes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50, help="steps of a chain")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from latentfuse.conditioning import TextConditioner, build_denoiser, unet_inputs
    from latentfuse.config import UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig((32, 64, 64), norm_num_groups=8)
    b, size = args.batch, args.size
    x, t = torch.randn(2 * b, 4, size, size), torch.full((2 * b,), 500)
    conds = {
        "class": torch.randint(0, 10, (2 * b,)),
        "attributes": torch.randn(2 * b, args.attributes).sign(),
        "text": torch.randn(2 * b, args.tokens, args.width),
    }
    seconds = {}
    with torch.no_grad():
        for kind, cond in conds.items():
            unet = build_denoiser(
                cfg,
                kind,
                size,
                4,
                num_class_embeds=11,
                num_attributes=args.attributes,
                cross_attention_dim=args.width,
            ).eval()
            inputs = unet_inputs(unet, cond)
            seconds[kind] = timed(lambda u=unet, i=inputs: u(x, t, **i), args.repeats)
            params = sum(p.numel() for p in unet.parameters()) / 1e6
            print(
                f"{kind:>10}: {params:.2f}M parameters, {seconds[kind] * 1e3:.1f} ms a guided "
                f"step of {b} images ({seconds[kind] / seconds['class']:.2f}x class)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            if args.encoder in ("clip", "t5"):
                sys.path.insert(0, str(REPO))
                from tests.worlds import tiny_clip_text, tiny_t5

                make = tiny_clip_text if args.encoder == "clip" else tiny_t5
                source, note = make(Path(tmp) / "encoder"), f"a tiny random {args.encoder}"
            else:
                source, note = args.encoder, args.encoder
            text = TextConditioner.load(source, args.tokens)
            prompts = [f"smiling, young, eyeglasses {i}" for i in range(b)]
            encode = timed(lambda: text.embed(prompts), args.repeats)
    chain = seconds["text"] * args.steps
    print(
        f"text encoder ({note}): {encode * 1e3:.1f} ms for {b} prompts, once per prompt: "
        f"{encode / chain:.1%} of a {args.steps}-step text-conditioned chain; the whole chain "
        f"costs {(chain + encode) / (seconds['class'] * args.steps):.2f}x the class-label chain"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
