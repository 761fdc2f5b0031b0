"""Denoisers that start from a pretrained diffusers UNet: class rows matched to the run's
classes, the base's architecture with contradictions refused, full fine-tuning and LoRA
adapters, adapter exports that reload and sample as the merged export does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from latentfuse.config import UNetConfig, load_config
from latentfuse.data.autoencoder import latent_geometry, load_vae
from latentfuse.training.pretrained import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    add_lora,
    class_rows,
    denoiser_from_base,
    find_base,
    trainable_parameters,
)
from tests.worlds import tiny_config

BASE_NAMES = ("class1", "class0", "zebra")  # the base knows two of the run's classes, in
RUN_NAMES = ("class0", "class1", "class2", "class3")  # another order, and one it lacks


def save_base(
    folder: Path, channels: int, classes: int | None, names=BASE_NAMES, seed: int = 7
) -> Path:
    """A tiny UNet2DModel saved with diffusers' own save_pretrained (and its class names)."""
    torch.manual_seed(seed)
    UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32,),
        layers_per_block=1,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=8,
        num_class_embeds=None if classes is None else classes + 1,
    ).save_pretrained(folder)
    if names is not None:
        (folder / "base.json").write_text(json.dumps({"class_names": list(names)}))
    return folder


@pytest.fixture(scope="module")
def channels(tiny_world) -> int:
    return latent_geometry(load_vae(str(tiny_world["vae"])).config)[0]


@pytest.fixture
def base(tmp_path, channels) -> Path:
    return save_base(tmp_path / "base", channels, len(BASE_NAMES))


def from_base(folder: Path, channels: int, **cfg) -> torch.nn.Module:
    config = UNetConfig(pretrained=str(folder), **cfg)
    return denoiser_from_base(
        config,
        "class",
        8,
        channels,
        where="server_unet",
        num_class_embeds=len(RUN_NAMES) + 1,
        class_names=RUN_NAMES,
    )


def test_class_rows_follow_the_names_the_base_knows(base, channels):
    base_rows = load_file(base / "diffusion_pytorch_model.safetensors")["class_embedding.weight"]
    module = from_base(base, channels)
    table = module.class_embedding.weight.detach()
    mean = base_rows[:3].mean(0)
    expected = torch.stack([base_rows[1], base_rows[0], mean, mean, base_rows[3]])
    torch.testing.assert_close(table, expected)
    # every other weight is the base's
    state, weights = module.state_dict(), load_file(base / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in weights.items() if not k.startswith("class_"))
    # without recorded names the rows map by index; client ids (names None) match nothing
    by_index = class_rows(base_rows, 5, RUN_NAMES, None)
    torch.testing.assert_close(by_index[:3], base_rows[:3])
    torch.testing.assert_close(by_index[3], mean)
    ids = class_rows(base_rows, 3, None, BASE_NAMES)
    torch.testing.assert_close(ids, torch.stack([mean, mean, base_rows[3]]))


def test_an_unconditional_base_starts_the_run_as_itself(tmp_path, channels):
    folder = save_base(tmp_path / "plain", channels, None, names=None)
    module = from_base(folder, channels).eval()
    base = UNet2DModel.from_pretrained(folder).eval()
    x, t = torch.randn(2, channels, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        expected = base(x, t).sample
        for label in (0, 3, 4):
            got = module(x, t, class_labels=torch.tensor([label, label])).sample
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"block_out_channels": (16,), "norm_num_groups": 8}, "block_out_channels = \\(16,\\)"),
        ({"layers_per_block": 2}, "whose layers_per_block is 1"),
    ],
)
def test_a_config_that_contradicts_the_base_is_refused_naming_both(base, channels, cfg, message):
    with pytest.raises(ValueError, match=message):
        from_base(base, channels, **cfg)
    from_base(base, channels, block_out_channels=(32,))  # the base's own value is fine


def test_bad_bases_are_refused_by_name(base, tmp_path, channels):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_base(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no diffusers UNet there"):
        find_base(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="latents of"):
        from_base(base, channels + 1)
    with pytest.raises(ValueError, match="needs a UNet2DConditionModel"):
        denoiser_from_base(
            UNetConfig(pretrained=str(base)), "text", 8, channels, where="server_unet"
        )
    with pytest.raises(ValueError, match="unet.adapter"):
        UNetConfig(adapter="lora")  # adapters fine-tune a pretrained base


def test_lora_starts_as_the_base_and_trains_a_few_per_cent(base, channels):
    full = from_base(base, channels).eval()
    lora = add_lora(from_base(base, channels), UNetConfig(pretrained=str(base), adapter="lora"))
    lora.eval()
    x, t, y = torch.randn(2, channels, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(
            lora(x, t, class_labels=y).sample, full(x, t, class_labels=y).sample
        )
    trainable, total = trainable_parameters(lora), trainable_parameters(full)
    assert 0 < trainable < total / 2
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert "class_embedding.weight" in names and all(
        "lora_" in n or n.startswith("class_embedding") for n in names
    )


@pytest.fixture(scope="module")
def lora_runs(tiny_world, tmp_path_factory):
    """One tiny run with LoRA on both sides from a diffusers-saved base: its adapter export,
    then the same checkpoint exported merged."""
    from latentfuse.training.runner import train

    root = tmp_path_factory.mktemp("lora")
    channels = latent_geometry(load_vae(str(tiny_world["vae"])).config)[0]
    base = save_base(root / "base", channels, len(BASE_NAMES))
    both = [f'{side}.pretrained="{base}"' for side in ("server_unet", "client_unet")] + [
        'server_unet.adapter="lora"',
        'client_unet.adapter="lora"',
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))
        model = train(tiny_config(tiny_world, *both), root / "run")
        adapters = shutil.copytree(model, root / "adapters")
        merged = train(
            tiny_config(tiny_world, *both, "train.export_merged=true"), root / "run", resume=True
        )
    return {"base": base, "adapters": adapters, "merged": merged, "root": root}


def test_an_adapter_export_is_small_reloads_and_samples_as_the_merged_export(lora_runs):
    from latentfuse.pipelines import CollaFusePipeline

    adapters, merged, base = lora_runs["adapters"], lora_runs["merged"], lora_runs["base"]
    for folder in (adapters / "server_unet", adapters / "clients" / "0"):
        assert {p.name for p in folder.iterdir()} == {
            ADAPTER_CONFIG,
            ADAPTER_WEIGHTS,
            "config.json",
        }
        record = json.loads((folder / ADAPTER_CONFIG).read_text())
        assert record["base"] == str(base) and record["adapter"] == "lora"
    size = (adapters / "server_unet" / ADAPTER_WEIGHTS).stat().st_size
    full = (merged / "server_unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < full / 3  # rank 8 on a 32-channel toy; a real base's share is far smaller
    images = []
    for folder in (adapters, merged):
        pipe = CollaFusePipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(i) for i in range(3)]
        images.append(
            pipe(client_id=1, generator=generators, num_inference_steps=4, output_type="pt").images
        )
    torch.testing.assert_close(images[0], images[1], rtol=1e-5, atol=1e-5)
    # the frozen base did not move: the merged weights differ from it only by the adapters
    trained = load_file(merged / "server_unet" / "diffusion_pytorch_model.safetensors")
    start = load_file(base / "diffusion_pytorch_model.safetensors")
    assert torch.equal(trained["conv_in.weight"], start["conv_in.weight"])  # no adapter there
    conv = "down_blocks.0.resnets.0.conv1.weight"
    assert not torch.equal(trained[conv], start[conv])  # its adapter trained and merged in


def test_adapters_on_a_changed_base_are_refused(lora_runs, tmp_path):
    from latentfuse.pipelines.folder import load_unet

    folder = shutil.copytree(lora_runs["adapters"] / "server_unet", tmp_path / "server_unet")
    channels = json.loads((folder / "config.json").read_text())["in_channels"]
    other = save_base(tmp_path / "other", channels, len(BASE_NAMES), seed=8)  # other weights
    record = json.loads((folder / ADAPTER_CONFIG).read_text())
    record["base"] = str(other)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="trained on a base with sha256"):
        load_unet(folder)


@pytest.mark.e2e
def test_latentfuse_train_pretrained_with_lora_on_both_sides(tiny_world, tmp_path, monkeypatch):
    from latentfuse.cli.main import main as latentfuse
    from latentfuse.testing.shapes import make_shapes

    monkeypatch.setenv("LATENTFUSE_CACHE", str(tmp_path / "cache"))
    channels = latent_geometry(load_vae(str(tiny_world["vae"])).config)[0]
    base = save_base(tmp_path / "base", channels, 2, names=("circle", "square"))
    data = make_shapes(tmp_path / "shapes", classes=3, per_class=12, size=32)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--output-dir", str(out), "--vae", str(tiny_world["vae"])]
    args += ["--pretrained", str(base), "--adapter", "lora", "--lora-rank", "4"]
    args += ["--max-steps", "2", "--fit-vae", "never", "train.num_preview_images=2"]
    assert latentfuse(args) == 0
    config = json.loads((out / "config.json").read_text())
    for side in ("server_unet", "client_unet"):
        assert config[side]["pretrained"] == str(base) and config[side]["adapter"] == "lora"
        assert config[side]["lora_rank"] == 4
    assert (out / "model" / "server_unet" / ADAPTER_WEIGHTS).is_file()
    assert (out / "model" / "clients" / "0" / ADAPTER_WEIGHTS).is_file()


def test_the_new_keys_leave_saved_result_keys_as_they_were():
    from latentfuse.config import first_form

    plain = json.loads(json.dumps(load_config(None, []).to_dict()))
    assert "pretrained" not in first_form(plain)["server_unet"]
    changed = json.loads(json.dumps(load_config(None, ['server_unet.pretrained="x"']).to_dict()))
    assert first_form(changed)["server_unet"]["pretrained"] == "x"


def test_a_run_maps_its_own_class_names_onto_the_base_on_both_sides(base, tiny_world):
    from latentfuse.training.setup import build_run

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))
        over = [f'{side}.pretrained="{base}"' for side in ("server_unet", "client_unet")]
        run = build_run(tiny_config(tiny_world, *over))
    assert run.dataset.class_names == RUN_NAMES
    rows = load_file(base / "diffusion_pytorch_model.safetensors")["class_embedding.weight"]
    mean = rows[:3].mean(0)
    expected = torch.stack([rows[1], rows[0], mean, mean, rows[3]])
    for unet in (run.server_unet, *run.client_unets.values()):
        torch.testing.assert_close(unet.class_embedding.weight.detach(), expected)


def test_an_attribute_conditioned_base_must_project_as_many_attributes(tmp_path, channels):
    from latentfuse.conditioning import build_denoiser

    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(32,), norm_num_groups=8)
    build_denoiser(cfg, "attributes", 8, channels, num_attributes=6).save_pretrained(tmp_path / "b")
    started = denoiser_from_base(
        UNetConfig(pretrained=str(tmp_path / "b")),
        "attributes",
        8,
        channels,
        where="client_unet",
        num_attributes=6,
    )
    base = type(started).from_pretrained(tmp_path / "b")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in started.state_dict().items())
    with pytest.raises(ValueError, match="it projects 6 attributes, this run has 40"):
        denoiser_from_base(
            UNetConfig(pretrained=str(tmp_path / "b")),
            "attributes",
            8,
            channels,
            where="client_unet",
            num_attributes=40,
        )
