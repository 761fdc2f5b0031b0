"""Server and client halves of CollaFuse sampling: together they are the full pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from latentfuse import CollaFusePipeline
from latentfuse.pipelines import (
    CollaFuseClientPipeline,
    CollaFuseServerPipeline,
    HandOff,
    SolverState,
)
from tests.test_pipeline import STEPS, T, tiny_pipeline, tiny_unet

SERVER_FILES = ("scheduler", "server_unet", "collafuse.json")
CLIENT_ID = 1
CLIENT_FILES = ("vae", "scheduler", "collafuse.json", f"clients/{CLIENT_ID}")


def save_model(folder: Path, t_cut: int, scheduler: str) -> Path:
    """A saved model with distinct server and client denoisers."""
    clients = {0: tiny_unet(2), 1: tiny_unet(3)}
    tiny_pipeline(t_cut, scheduler, tiny_unet(1), clients).save_pretrained(folder)
    return folder


def only(folder: Path, keep: tuple[str, ...], out: Path) -> Path:
    """A copy of `folder` in which every file outside `keep` is garbage, so reading it fails."""
    shutil.copytree(folder, out)
    for path in out.rglob("*"):
        relative = path.relative_to(out).as_posix()
        if path.is_file() and not any(relative == k or relative.startswith(k + "/") for k in keep):
            path.write_bytes(b"\x00 not for this half \x00")
    return out


def wire(handoff: HandOff) -> HandOff:
    """The hand-off after a round trip through safetensors bytes and a JSON header."""
    tensors, meta = handoff.to_tensors()
    return HandOff.from_tensors(load(save(tensors)), json.loads(json.dumps(meta)))


def generators() -> list[torch.Generator]:
    """The same three seeds every time."""
    return [torch.Generator().manual_seed(s) for s in (5, 6, 7)]


def make_halves(root: Path, scheduler: str) -> tuple:
    """(full pipeline, server half, client half) of one saved model; halves see only theirs."""
    model = save_model(root / "model", 500, scheduler)
    full = CollaFusePipeline.from_pretrained(model)
    server = CollaFuseServerPipeline.from_pretrained(only(model, SERVER_FILES, root / "s"))
    client = CollaFuseClientPipeline.from_pretrained(
        only(model, CLIENT_FILES, root / "c"), client_id=CLIENT_ID
    )
    for pipe in (full, server, client):
        pipe.set_progress_bar_config(disable=True)
    return full, server, client


@pytest.fixture(scope="module", params=["ddpm", "ddim", "dpm"])
def halves(request, tmp_path_factory) -> tuple:
    """The three pipelines for each scheduler the issue names."""
    return make_halves(tmp_path_factory.mktemp(request.param), request.param)


def test_server_and_client_halves_equal_the_full_pipeline(halves):
    full, server, client = halves
    call = dict(client_id=CLIENT_ID, num_inference_steps=STEPS, guidance_scale=2.0)
    expected = full(generator=generators(), output_type="pt", return_server_latents=True, **call)
    gens = generators()  # the client continues the streams the server started
    handoff = wire(server(generator=gens, **call))
    assert 0 < handoff.step_index < STEPS and torch.all(handoff.timesteps < 500)
    torch.testing.assert_close(handoff.latents, expected.server_latents)
    images = client(handoff, guidance_scale=2.0, generator=gens, output_type="pt").images
    torch.testing.assert_close(images, expected.images, rtol=1e-5, atol=1e-5)


def test_multistep_solver_without_state_restarts_its_order(tmp_path):
    full, server, client = make_halves(tmp_path, "dpm")
    handoff = server(client_id=CLIENT_ID, generator=generators(), num_inference_steps=STEPS)
    assert handoff.solver_state.lower_order_nums >= 1
    expected = full(
        client_id=CLIENT_ID, generator=generators(), num_inference_steps=STEPS, output_type="pt"
    ).images
    restarted = client(handoff.without_solver_state(), output_type="pt").images
    assert torch.isfinite(restarted).all()
    assert not torch.allclose(restarted, expected, rtol=1e-4, atol=1e-4)


def test_client_rejects_a_foreign_hand_off(halves):
    _, server, client = halves
    handoff = server(client_id=0, num_inference_steps=STEPS, generator=torch.manual_seed(0))
    with pytest.raises(ValueError, match="client 0"):
        client(handoff)
    other = server(client_id=CLIENT_ID, num_inference_steps=STEPS + 1, batch_size=1)
    shifted = HandOff(other.latents, other.labels, CLIENT_ID, STEPS + 1, 2, other.timesteps)
    with pytest.raises(ValueError, match="step 2"):
        client(shifted)
    with pytest.raises(ValueError, match="batch_size"):
        client(other, batch_size=1)


def test_client_samples_alone_when_there_is_no_server(tmp_path):
    model = save_model(tmp_path / "icm", T, "euler")
    assert not (model / "server_unet" / "config.json").exists()
    full = CollaFusePipeline.from_pretrained(model)
    client = CollaFuseClientPipeline.from_pretrained(
        only(model, CLIENT_FILES, tmp_path / "c"), client_id=CLIENT_ID
    )
    call = dict(class_labels=[2, 3, 2], num_inference_steps=STEPS, output_type="latent")
    expected = full(client_id=CLIENT_ID, generator=generators(), **call).images
    torch.testing.assert_close(client(generator=generators(), **call).images, expected)
    with pytest.raises(FileNotFoundError, match="server_unet"):
        CollaFuseServerPipeline.from_pretrained(model)


def test_global_model_client_only_decodes(tmp_path):
    model = save_model(tmp_path / "gm", 0, "ddim")
    full = CollaFusePipeline.from_pretrained(model)
    server = CollaFuseServerPipeline.from_pretrained(only(model, SERVER_FILES, tmp_path / "s"))
    client = CollaFuseClientPipeline.from_pretrained(
        only(model, CLIENT_FILES, tmp_path / "c"), client_id=CLIENT_ID
    )
    assert client.unet is None
    call = dict(client_id=CLIENT_ID, num_inference_steps=STEPS)
    handoff = wire(server(generator=generators(), **call))
    assert handoff.step_index == STEPS and len(handoff.timesteps) == 0
    expected = full(generator=generators(), output_type="pt", **call).images
    torch.testing.assert_close(client(handoff, output_type="pt").images, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": STEPS, "batch_size": 1}, "hand-off"),
        ({"batch_size": 1}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": STEPS, "output_type": "gif"}, "output_type"),
    ],
)
def test_client_without_hand_off_checks_its_arguments(halves, kwargs, message):
    _, _, client = halves
    with pytest.raises(ValueError, match=message):
        client(**kwargs)


@pytest.mark.parametrize("with_state", [True, False])
def test_hand_off_round_trip(with_state):
    outputs = (None, torch.randn(2, 4, 8, 8)) if with_state else ()
    state = SolverState(outputs, 1) if with_state else None
    handoff = HandOff(
        torch.randn(2, 4, 8, 8), torch.tensor([2, 3]), 1, 10, 4, torch.tensor([400.5, 0.0]), state
    )
    back = wire(handoff)
    for name in ("latents", "labels", "timesteps"):
        assert torch.equal(getattr(back, name), getattr(handoff, name)), name
    assert (back.client_id, back.num_inference_steps, back.step_index) == (1, 10, 4)
    if with_state:
        assert back.solver_state.model_outputs[0] is None
        assert torch.equal(back.solver_state.model_outputs[1], outputs[1])
        assert back.solver_state.lower_order_nums == 1
    else:
        assert back.solver_state is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": torch.tensor([1])}, "labels"),
        ({"latents": torch.zeros(2, 4, 8)}, "latents"),
        ({"step_index": 11}, "step_index"),
    ],
)
def test_hand_off_checks_its_fields(change, message):
    fields = dict(
        latents=torch.zeros(2, 4, 8, 8),
        labels=torch.tensor([2, 3]),
        client_id=1,
        num_inference_steps=10,
        step_index=4,
        timesteps=torch.arange(5),
    )
    with pytest.raises(ValueError, match=message):
        HandOff(**{**fields, **change})
