"""CollaFusePipeline on disk: what training writes loads, save/load round trip, the hub upload."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from latentfuse import CollaFusePipeline
from latentfuse.pipelines import CollaFuseClientPipeline, CollaFuseServerPipeline

REPO = Path(__file__).resolve().parent.parent
T_CUT = 100


def sample(pipe, client_id: int, **kwargs) -> torch.Tensor:
    """Two images in [0, 1] from fixed seeds, 4 steps."""
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe(
        client_id=client_id, generator=gens, num_inference_steps=4, output_type="pt", **kwargs
    ).images


@pytest.mark.parametrize("client_id", [0, 1])
def test_loads_what_training_writes(tiny_model, client_id):
    pipe = CollaFusePipeline.from_pretrained(tiny_model)
    assert pipe.client_ids == [0, 1] and pipe.handoff_t(client_id) == T_CUT
    images = sample(pipe, client_id)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    server = CollaFuseServerPipeline.from_pretrained(tiny_model)
    client = CollaFuseClientPipeline.from_pretrained(tiny_model, client_id=client_id)
    client.set_progress_bar_config(disable=True)
    server.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    handoff = server(client_id=client_id, generator=gens, num_inference_steps=4)
    halves = client(handoff, generator=gens, output_type="pt").images
    torch.testing.assert_close(halves, images)


@pytest.mark.parametrize("scheduler", [None, EulerDiscreteScheduler])
def test_save_then_load_gives_identical_images(tiny_model, tmp_path, scheduler):
    pipe = CollaFusePipeline.from_pretrained(tiny_model)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "copy")
    loaded = CollaFusePipeline.from_pretrained(tmp_path / "copy")
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.collafuse_config == pipe.collafuse_config
    for client_id in pipe.client_ids:
        assert torch.equal(sample(loaded, client_id), sample(pipe, client_id))


@pytest.mark.parametrize("path", ["{tmp}/missing", "./missing-model", "runs/none/model"])
@pytest.mark.parametrize(
    "load",
    [
        CollaFusePipeline.from_pretrained,
        CollaFuseServerPipeline.from_pretrained,
        lambda p: CollaFuseClientPipeline.from_pretrained(p, client_id=0),
    ],
    ids=["full", "server", "client"],
)
def test_missing_local_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, path, load):
    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub looked up for {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(FileNotFoundError, match="missing|none"):
        load(path.format(tmp=tmp_path))


def test_repo_id_is_fetched_from_the_hub(tiny_model, monkeypatch):
    asked = []

    def fake_download(repo_id: str, **kwargs) -> str:
        asked.append((repo_id, kwargs))
        return str(tiny_model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert CollaFusePipeline.from_pretrained("someone/collafuse").client_ids == [0, 1]
    CollaFuseClientPipeline.from_pretrained("someone/collafuse", client_id=1)
    assert asked[0] == ("someone/collafuse", {})
    assert "clients/1/*" in asked[1][1]["allow_patterns"]
    assert not any("server_unet" in p or "clients/0" in p for p in asked[1][1]["allow_patterns"])


@pytest.mark.parametrize("recorded", [{}, {"fid": {"client_0": 41.25}}])
def test_push_to_hub_uploads_the_folder_with_a_model_card(tiny_model, monkeypatch, recorded):
    uploads = []

    def create_repo(repo_id: str, token=None, private=False, exist_ok=False, **kwargs):
        uploads.append({"created": repo_id, "private": private, "token": token})
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(repo_id: str, folder_path: str, token=None, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        uploads.append(
            {"repo": repo_id, "files": files, "card": (folder / "README.md").read_text()}
        )
        return "https://huggingface.co/someone/collafuse/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    pipe = CollaFusePipeline.from_pretrained(tiny_model)
    pipe.collafuse_config["metrics"] = recorded
    pipe.push_to_hub("someone/collafuse", token="t0k", private=True, metrics={"psnr": 12.5})
    created, uploaded = uploads
    assert created == {"created": "someone/collafuse", "private": True, "token": "t0k"}
    assert uploaded["repo"] == "someone/collafuse"
    assert {"model_index.json", "collafuse.json", "README.md"} <= uploaded["files"]
    assert {"clients/0/config.json", "server_unet/config.json"} <= uploaded["files"]
    card = uploaded["card"]
    assert f"t_cut: {T_CUT} of T = 1000" in card and "| psnr | 12.5 |" in card
    assert pipe.collafuse_config["vae_sha256"] in card
    for cid, client in pipe.collafuse_config["clients"].items():
        assert f"| {cid} | {T_CUT} | {client['classes']} |" in card
    assert ("| fid.client_0 | 41.25 |" in card) == bool(recorded)


@pytest.mark.e2e
def test_example_writes_a_grid_per_client(tiny_model, tmp_path):
    main = runpy.run_path(str(REPO / "examples" / "sample.py"))["main"]
    args = [str(tiny_model), "--out", str(tmp_path), "--num-images", "3", "--steps", "2"]
    assert main([*args, "--scheduler", "ddim"]) == 0
    for client_id in (0, 1):
        with Image.open(tmp_path / f"client-{client_id}.png") as grid:
            assert grid.size == (2 * 32, 2 * 32)


def test_card_metrics_come_from_an_evaluate_results_file():
    from latentfuse.hub import metrics_from_results, model_card

    entry = lambda fid: {  # noqa: E731
        "fid": fid,
        "kid": 0.01234567,
        "fcd": None,
        "fcd_status": "unavailable: no CLIP model given",
        "num_real": 1000,
    }
    results = {
        "num_samples": 64,
        "clients": {"1": entry(210.123456), "0": entry(199.5)},
        "pooled": entry(141.8),
        "settings": {"num_inference_steps": 50, "seed": 0},
    }
    metrics = metrics_from_results(results, "latentfuse evaluate --num-samples 64")
    assert list(metrics) == ["client_0", "client_1", "pooled", "note"]
    assert metrics["client_1"] == {"fid": 210.1235, "kid": 0.0123}  # no FCD without CLIP
    note = metrics["note"]
    # No sampler recorded: the model folder's DDPMScheduler ran (ancestral), so it says so.
    assert "--num-samples 64: 64 generated per client (DDPM-50 ancestral, seed 0)" in note
    results["settings"]["scheduler"] = "ddim"
    ddim = metrics_from_results(results, "latentfuse evaluate")["note"]
    assert "(DDIM-50, seed 0)" in ddim
    assert "1000 held-out" in note and "FCD: unavailable: no CLIP model given" in note
    card = model_card({"clients": {}, "metrics": metrics})
    assert "| client_0.fid | 199.5 |" in card and "| pooled.kid | 0.0123 |" in card
    with pytest.raises(ValueError, match="metrics: not a `latentfuse evaluate`.*'fid'"):
        metrics_from_results({"fid": 1.0})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"client_id": "0"}, "client_id must be an int, got '0' (str)"),
        ({"client_id": 0, "class_labels": ["cat"]}, "class_labels must be class indices (ints)"),
        ({"client_id": 0, "class_labels": "cat"}, "class_labels must be class indices (ints)"),
        ({"client_id": 0, "class_labels": [1.5]}, "class_labels must be class indices (ints)"),
    ],
)
def test_user_mistakes_are_named_before_any_work(kwargs, message):
    from latentfuse.pipelines.sampling import check_label_values, client_entry

    with pytest.raises(ValueError, match=re.escape(message)):
        client_entry({"clients": {"0": {}}}, kwargs["client_id"])
        check_label_values(kwargs["class_labels"])


# ---- diffusers' call conventions ----------------------------------------------------------------
@pytest.mark.parametrize("argument", ["dtype", "torch_dtype"])
def test_dtype_casts_every_denoiser_and_sampling_runs(tiny_model, argument):
    pipe = CollaFusePipeline.from_pretrained(tiny_model, **{argument: torch.bfloat16})
    dtypes = {pipe.server_unet.dtype, pipe.vae.dtype} | {
        u.dtype for u in pipe.client_unets.values()
    }
    assert dtypes == {torch.bfloat16}
    assert sample(pipe, 0).shape == (2, 3, 32, 32)


def test_num_images_per_prompt_latents_and_step_callbacks(tiny_model):
    pipe = CollaFusePipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    label = int(pipe.collafuse_config["clients"]["0"]["classes"][0])
    out = pipe(
        client_id=0,
        class_labels=[label],
        num_images_per_prompt=3,
        output_type="pt",
        num_inference_steps=4,
    )
    assert out.images.shape[0] == 3
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = []

    def callback(p, index, t, tensors):
        steps.append(index)
        return {"latents": tensors["latents"] * 0} if index == 3 else tensors

    kwargs = {"client_id": 0, "num_inference_steps": 4, "output_type": "latent"}
    first = pipe(latents=noise, generator=torch.Generator().manual_seed(1), **kwargs).images
    again = pipe(latents=noise, generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(first, again)  # the given noise, not a draw, starts the chain
    zeroed = pipe(latents=noise, callback_on_step_end=callback, **kwargs).images
    assert steps == [0, 1, 2, 3]  # server and client steps, counted over the whole chain
    assert torch.count_nonzero(zeroed) == 0  # the callback's latents replace the chain's
    with pytest.raises(ValueError, match=re.escape("latents must have shape (2, 4, 16, 16)")):
        pipe(latents=noise[:, :, :8], **kwargs)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(callback_on_step_end_tensor_inputs=["prompt_embeds"], **kwargs)
    with pytest.raises(NotImplementedError, match="enable_model_cpu_offload"):
        pipe.enable_model_cpu_offload()


def test_diffusers_own_loader_and_components_give_a_working_pipeline(tiny_model):
    """`DiffusionPipeline.from_pretrained(folder, custom_pipeline=...)` (diffusers' loader, not
    ours) reads the clients too, and `CollaFusePipeline(**pipe.components)` samples the same."""
    from diffusers import DiffusionPipeline

    code = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_collafuse.py"
    theirs = DiffusionPipeline.from_pretrained(
        tiny_model, custom_pipeline=str(code), trust_remote_code=True
    )
    ours = CollaFusePipeline.from_pretrained(tiny_model)
    assert theirs.client_ids == ours.client_ids == [0, 1]
    rebuilt = CollaFusePipeline(**ours.components)
    expected = sample(ours, 1)
    torch.testing.assert_close(sample(theirs, 1), expected)
    torch.testing.assert_close(sample(rebuilt, 1), expected)


def test_push_to_hub_offline_says_so_and_keeps_the_folder(tiny_model, monkeypatch, tmp_path):
    import httpx

    def offline(*args, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    pipe = CollaFusePipeline.from_pretrained(tiny_model)
    folder = tmp_path / "saved"
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face Hub.*offline"):
        pipe.push_to_hub("someone/collafuse", save_directory=folder)
    assert (folder / "collafuse.json").is_file()  # the model is saved whatever the network


def test_a_pipeline_called_without_client_id_says_which_client_it_samples(tiny_model):
    pipe = CollaFusePipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning, match=r"no client_id given: sampling client 0's images"):
        unnamed = pipe(generator=torch.Generator().manual_seed(3), num_inference_steps=2,
                       output_type="pt").images  # fmt: skip
    named = pipe(client_id=0, generator=torch.Generator().manual_seed(3), num_inference_steps=2,
                 output_type="pt").images  # fmt: skip
    torch.testing.assert_close(unnamed, named)
