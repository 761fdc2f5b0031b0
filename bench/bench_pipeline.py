"""Sampling benchmarks of CollaFusePipeline (DDIM), both measured in the same run.

(a) overhead: pipeline wall time / the same UNet and decoder calls in a bare loop
    (same scheduler, same inputs); target <= 1.05.
(b) the client's share of sampling: wall time and FLOPs per image (client steps + decoder over
    the whole chain) at the model's t_cut; target <= 0.15 at t_cut <= 100.

    python bench/bench_pipeline.py --model checkpoints/cifar10-collafuse --batch-size 16
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMScheduler

from latentfuse import CollaFusePipeline
from latentfuse.evaluation.burden import count_flops


@torch.no_grad()
def bare_loop(
    pipe: CollaFusePipeline,
    client_id: int,
    labels: torch.Tensor,
    latents: torch.Tensor,
    steps: int,
    t_cut: int,
) -> torch.Tensor:
    """The same model calls as the pipeline with no pipeline around them."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    client_unet = pipe.client_unets.get(client_id)
    for t in scheduler.timesteps:
        unet = pipe.server_unet if t >= t_cut else client_unet
        noise = unet(latents, t, class_labels=labels).sample
        latents = scheduler.step(noise, t, latents).prev_sample
    scaling = pipe.vae.config.scaling_factor
    return pipe.vae.decode(latents / scaling).sample


def best_of(function, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="checkpoints/cifar10-collafuse")
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipe = CollaFusePipeline.from_pretrained(args.model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    t_cut = pipe.handoff_t(args.client)
    classes = pipe.collafuse_config["clients"][str(args.client)]["classes"]
    labels = torch.tensor(classes)[torch.arange(args.batch_size) % len(classes)]
    latents = torch.randn(args.batch_size, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def run_pipeline():
        gen = torch.Generator().manual_seed(0)
        return pipe(
            client_id=args.client,
            class_labels=labels,
            batch_size=args.batch_size,
            num_inference_steps=args.steps,
            generator=gen,
            output_type="pt",
        )

    def run_bare():
        return bare_loop(pipe, args.client, labels, latents.clone(), args.steps, t_cut)

    pipe_times, bare_times = [], []
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both
        pipe_times.append(best_of(run_pipeline, 1))
        bare_times.append(best_of(run_bare, 1))
    overhead = min(pipe_times) / min(bare_times)

    pipe.scheduler.set_timesteps(args.steps)
    server_steps = int((pipe.scheduler.timesteps >= t_cut).sum())
    client_steps = args.steps - server_steps
    one = latents[:1]
    y = labels[:1]
    t = torch.tensor([0])
    with torch.no_grad():
        server_step = lambda: pipe.server_unet(one, t, class_labels=y)  # noqa: E731
        client_step = lambda: pipe.client_unets[args.client](one, t, class_labels=y)  # noqa: E731
        decode = lambda: pipe.vae.decode(one)  # noqa: E731
        flops = {
            name: count_flops(f)
            for name, f in (("server", server_step), ("client", client_step), ("decode", decode))
        }
        seconds = {
            name: best_of(f, 5)
            for name, f in (("server", server_step), ("client", client_step), ("decode", decode))
        }
    client_flops = client_steps * flops["client"] + flops["decode"]
    server_flops = server_steps * flops["server"]
    client_time = client_steps * seconds["client"] + seconds["decode"]
    server_time = server_steps * seconds["server"]
    print(
        f"model {args.model}, client {args.client}, t_cut {t_cut}, DDIM-{args.steps}: "
        f"server {server_steps} steps, client {client_steps} steps + decoder; batch "
        f"{args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"(a) pipeline {min(pipe_times):.3f} s vs bare loop {min(bare_times):.3f} s: "
        f"overhead ratio {overhead:.3f}  (target <= 1.05)"
    )
    print(
        f"(b) per image: client {client_flops / 1e9:.3f} GFLOP of "
        f"{(client_flops + server_flops) / 1e9:.3f}: FLOP share "
        f"{client_flops / (client_flops + server_flops):.3f}; wall share "
        f"{client_time / (client_time + server_time):.3f}  (target <= 0.15 at t_cut <= 100)"
    )


if __name__ == "__main__":
    main()
