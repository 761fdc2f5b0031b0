"""What a client pays: FLOPs and wall time per image on each side, and bytes on the wire.

FLOPs come from torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, 2 per
multiply-add; normalisation and activations are not counted). Training counts one forward
and backward pass per image per step; sampling counts the steps each side runs in one chain
of `num_inference_steps`, split at t_cut exactly as the pipeline splits it, and the client's
decoder. Wall times are measured here, on this machine, and are only comparable within a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from latentfuse.data.autoencoder import Autoencoder
from latentfuse.method.split import DiffusionSplit

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs of one call of `function`."""
    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def wall_time(function: Callable[[], object], repeats: int = 1) -> float:
    """Best-of-`repeats` seconds of one call of `function`, after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def _unet_inputs(unet, batch_size: int) -> dict:
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    inputs = {
        "sample": torch.randn(batch_size, cfg.in_channels, size, size, device=unet.device),
        "timestep": torch.zeros(batch_size, dtype=torch.long, device=unet.device),
    }
    if cfg.num_class_embeds:
        inputs["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=unet.device)
    return inputs


def _unet_costs(unet, batch_size: int, repeats: int, measure_time: bool) -> dict[str, float]:
    """Per image: forward FLOPs, forward+backward FLOPs, and their wall times."""
    inputs = _unet_inputs(unet, batch_size)

    @torch.no_grad()
    def forward() -> None:
        unet(**inputs)

    def train_step() -> None:
        with torch.enable_grad():
            out = unet(**inputs).sample
            out.pow(2).mean().backward()  # an MSE-shaped loss: one backward through the net
        unet.zero_grad(set_to_none=True)

    frozen = [p for p in unet.parameters() if not p.requires_grad]
    for parameter in frozen:  # a loaded, frozen net still costs what training it would
        parameter.requires_grad_(True)

    costs = {
        "forward_flops": count_flops(forward) / batch_size,
        "train_flops": count_flops(train_step) / batch_size,
    }
    if measure_time:
        costs["forward_seconds"] = wall_time(forward, repeats) / batch_size
        costs["train_seconds"] = wall_time(train_step, repeats) / batch_size
    for parameter in frozen:
        parameter.requires_grad_(False)
    return costs


def _decoder_costs(vae: Autoencoder, latent_shape, batch_size, repeats, measure_time) -> dict:
    from latentfuse.data.autoencoder import decode

    latents = torch.randn(batch_size, *latent_shape, device=vae.device, dtype=vae.dtype)
    call = lambda: decode(vae, latents)
    costs = {"flops": count_flops(call) / batch_size}
    if measure_time:
        costs["seconds"] = wall_time(call, repeats) / batch_size
    return costs


def _share(client: float, server: float) -> float:
    total = client + server
    return client / total if total > 0 else 0.0


def client_burden(
    client_unet: torch.nn.Module | None,
    server_unet: torch.nn.Module | None,
    vae: Autoencoder,
    scheduler,
    t_cut: int,
    num_inference_steps: int = 50,
    bytes_per_element: int = 4,
    batch_size: int = 2,
    measure_time: bool = True,
    repeats: int = 1,
) -> dict:
    """Client and server FLOPs and seconds per image in training and sampling, and bytes per
    image each way, for one client at cut `t_cut` (UNet None where a side owns no step)."""
    if bytes_per_element not in (2, 4):
        raise ValueError(f"bytes_per_element must be 4 (fp32) or 2 (fp16), got {bytes_per_element}")
    split = DiffusionSplit.from_scheduler(scheduler, t_cut)
    if split.handoff_t > 0 and client_unet is None:
        raise ValueError(f"t_cut={t_cut} gives the client timesteps but client_unet is None")
    if not split.is_independent and server_unet is None:
        raise ValueError(f"t_cut={t_cut} leaves server timesteps but server_unet is None")
    denoiser = client_unet if client_unet is not None else server_unet
    cfg = denoiser.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    latent_shape = (cfg.in_channels, size, size)
    zero = {"forward_flops": 0, "train_flops": 0, "forward_seconds": 0.0, "train_seconds": 0.0}
    owns = {"client": split.handoff_t > 0, "server": not split.is_independent}
    nets = {"client": client_unet, "server": server_unet}
    costs = {
        side: _unet_costs(nets[side], batch_size, repeats, measure_time) if owns[side] else zero
        for side in ("client", "server")
    }
    decoder = _decoder_costs(vae, latent_shape, batch_size, repeats, measure_time)
    sampler = type(scheduler).from_config(scheduler.config)
    sampler.set_timesteps(num_inference_steps)
    server_steps, client_steps = split.split_timesteps(sampler.timesteps.cpu())
    steps = {"client": len(client_steps), "server": len(server_steps)}
    latent_bytes = int(torch.Size(latent_shape).numel()) * bytes_per_element
    return {
        "t_cut": split.handoff_t,
        "num_inference_steps": num_inference_steps,
        "latent_shape": list(latent_shape),
        "training": _training(costs, measure_time),
        "sampling": _sampling(costs, steps, decoder, measure_time),
        "bytes_per_image": {
            # once: one release per image; fresh: one per image per epoch.
            "training_upload_per_release": latent_bytes if owns["server"] else 0,
            "training_download": 0,
            "sampling_upload": 0,  # class label and seed only (a few bytes), not counted
            "sampling_download": latent_bytes if steps["server"] else 0,  # hand-off latents
        },
    }


def _training(costs: dict, measure_time: bool) -> dict:
    client, server = costs["client"]["train_flops"], costs["server"]["train_flops"]
    out: dict = {
        "client_flops_per_image": client,
        "server_flops_per_image": server,
        "client_share": _share(client, server),
    }
    if measure_time:
        out["client_seconds_per_image"] = costs["client"]["train_seconds"]
        out["server_seconds_per_image"] = costs["server"]["train_seconds"]
    return out


def _sampling(costs: dict, steps: dict, decoder: dict, measure_time: bool) -> dict:
    client_steps = steps["client"] * costs["client"]["forward_flops"]
    server = steps["server"] * costs["server"]["forward_flops"]
    client = client_steps + decoder["flops"]
    out: dict = {
        "client_steps": steps["client"],
        "server_steps": steps["server"],
        "client_step_flops_per_image": client_steps,
        "decoder_flops_per_image": decoder["flops"],
        "client_flops_per_image": client,
        "server_flops_per_image": server,
        "client_step_share": _share(client_steps, server),  # denoising steps only
        "client_share": _share(client, server),  # steps and decoder
    }
    if measure_time:
        out["client_seconds_per_image"] = (
            steps["client"] * costs["client"]["forward_seconds"] + decoder["seconds"]
        )
        out["server_seconds_per_image"] = steps["server"] * costs["server"]["forward_seconds"]
    return out
