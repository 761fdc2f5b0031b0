"""Conditioning kinds (class, attributes, text): the denoisers, the text encoders, the CelebA
and AwA2 settings end to end, and what the server receives of each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from latentfuse.conditioning import (
    TextConditioner,
    attribute_vectors,
    build_denoiser,
    image_prompts,
    null_condition,
    unet_inputs,
)
from latentfuse.config import UNetConfig, load_config
from latentfuse.data.datasets import load_dataset
from latentfuse.testing.fixtures import CELEBA_ATTRIBUTES, make_awa2_fixture, make_celeba_fixture
from latentfuse.training.engine import make_accelerator
from latentfuse.training.runner import build_pipeline, train
from latentfuse.training.setup import build_run
from latentfuse.training.trainer import Trainer
from tests.worlds import tiny_clip_text, tiny_t5

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "server_unet.block_out_channels=[32]",
    "server_unet.attention=false",
    "server_unet.norm_num_groups=8",
    "client_unet.block_out_channels=[32]",
    "train.server_batch_size=8",
    "train.client_batch_size=4",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.num_preview_images=2",
    "train.preview_inference_steps=2",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conditioning")
    return {
        **tiny_world,
        "celeba": make_celeba_fixture(root / "celeba", num_images=80, size=64),
        "awa2": make_awa2_fixture(root / "awa2", images_per_class=6, size=64),
        "clip": tiny_clip_text(root / "clip"),
        "t5": tiny_t5(root / "t5"),
    }


@pytest.fixture(autouse=True)
def isolated(world, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTFUSE_CACHE", str(world["cache"]))


def celeba_config(world, *overrides: str):
    """configs/celeba.toml on the CelebA-format fixture, with tiny models."""
    base = [f'vae="{world["vae"]}"', f'data.source="{world["celeba"]}"', *TINY]
    return load_config(REPO / "configs" / "celeba.toml", base + list(overrides))


def text_overrides(world, encoder: str = "clip") -> list[str]:
    """Text conditioning at 32x32 (cross-attention over a 64x64 image's 32x32 latent tokens is
    the slow part of these tests), cross-attention below the first level only."""
    return [
        'conditioning.kind="text"',
        f'conditioning.text_encoder="{world[encoder]}"',
        "data.resolution=32",
        "server_unet.block_out_channels=[16, 32]",
        "client_unet.block_out_channels=[16, 32]",
    ]


# ---- the pieces ------------------------------------------------------------------------------
def test_attribute_vectors_and_prompts_follow_the_data_set(world):
    dataset = load_dataset(world["celeba"])
    assert dataset.attribute_names == tuple(CELEBA_ATTRIBUTES)
    vectors = attribute_vectors(dataset.attributes[:5])
    assert vectors.shape == (5, 40) and set(vectors.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(vectors > 0, torch.as_tensor(dataset.attributes[:5]) == 1)
    prompts = image_prompts(dataset, [0, 1], "a face: {}")
    present = [
        n.replace("_", " ")
        for n, v in zip(CELEBA_ATTRIBUTES, dataset.attributes[0], strict=True)
        if v
    ]
    assert prompts[0] == "a face: " + ", ".join(present)
    with pytest.raises(ValueError, match="0/1"):
        attribute_vectors(torch.tensor([[0, 2]]))
    shapes = load_dataset(world["images"])  # no attributes: the class name is the prompt
    assert image_prompts(shapes, [0], "{}") == [shapes.class_names[shapes.records[0].label]]


@pytest.mark.parametrize("encoder", ["clip", "t5"])
def test_text_encoders_embed_prompts_and_round_trip_in_the_diffusers_layout(
    world, encoder, tmp_path
):
    text = TextConditioner.load(world[encoder], max_length=12)
    states = text.embed(["a smiling man", "", "a woman with hat"])
    assert states.shape == (3, 12, text.hidden_size)
    assert not torch.allclose(states[0], states[1])  # the prompt reaches the states
    text.save(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"tokenizer", "text_encoder"}
    again = TextConditioner.load(tmp_path / "model", max_length=12)
    torch.testing.assert_close(again.embed(["a smiling man"]), states[:1])
    with pytest.raises(FileNotFoundError, match="conditioning.text_encoder"):
        TextConditioner.load(tmp_path / "no-such-encoder")


@pytest.mark.parametrize("kind", ["class", "attributes", "text"])
def test_each_kind_builds_its_denoiser_and_feeds_it_its_null(kind):
    cfg = UNetConfig((32,), norm_num_groups=8)
    unet = build_denoiser(
        cfg, kind, 8, 4, num_class_embeds=5, num_attributes=6, cross_attention_dim=16
    )
    expected = UNet2DModel if kind == "class" else UNet2DConditionModel
    assert type(unet) is expected
    cond = {
        "class": torch.tensor([0, 3]),
        "attributes": torch.tensor([[1.0, -1, 1, -1, 1, 1], [-1.0] * 6]),
        "text": torch.randn(2, 7, 16),
    }[kind]
    null = {
        "class": null_condition("class", num_classes=4),
        "attributes": null_condition("attributes", num_attributes=6),
        "text": torch.zeros(7, 16),
    }[kind]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    out = unet(x, t, **unet_inputs(unet, cond)).sample
    nulled = unet(x, t, **unet_inputs(unet, null.expand_as(cond).clone())).sample
    assert out.shape == x.shape
    assert not torch.allclose(out, nulled)  # the conditioning reaches the output


# ---- the CelebA setting end to end -------------------------------------------------------------
def test_celeba_setting_trains_attribute_groups_and_samples_with_attributes(world, tmp_path):
    config = celeba_config(world)
    assert config.data.num_clients == 5 and config.data.overlap
    model = train(config, tmp_path / "run")
    described = json.loads((model / "collafuse.json").read_text())
    assert described["conditioning"]["kind"] == "attributes"
    assert described["conditioning"]["attribute_names"] == list(CELEBA_ATTRIBUTES)
    for entry in described["clients"].values():
        assert len(entry["attribute_rates"]) == 40
    black = described["clients"]["0"]["attribute_rates"][CELEBA_ATTRIBUTES.index("Black_Hair")]
    assert black == 1.0  # client 0 is the Black_Hair group: every one of its images has it

    from latentfuse.pipelines import CollaFusePipeline

    pipe = CollaFusePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.server_unet, UNet2DConditionModel)
    kwargs = {"num_inference_steps": 3, "output_type": "pt", "guidance_scale": 3.0}

    def sample(**extra):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(client_id=0, generator=generators, **kwargs, **extra).images

    smiling = sample(attributes=[["Smiling", "Black_Hair"]])
    rows = torch.zeros(2, 40, dtype=torch.long)
    rows[:, [CELEBA_ATTRIBUTES.index("Smiling"), CELEBA_ATTRIBUTES.index("Black_Hair")]] = 1
    torch.testing.assert_close(sample(attributes=rows), smiling)  # names and rows agree
    assert smiling.shape == (2, 3, 64, 64)
    assert not torch.allclose(sample(attributes=[["Bald"]]), smiling)
    assert sample().shape == (2, 3, 64, 64)  # attributes drawn from the client's rates
    with pytest.raises(ValueError, match="unknown attribute names"):
        sample(attributes=[["Smilling"]])
    with pytest.raises(ValueError, match="text-conditioned"):
        sample(prompt="a smiling face")
    with pytest.raises(ValueError, match="attributes="):
        sample(class_labels=[0, 0])


@pytest.mark.e2e
def test_latentfuse_train_runs_the_celeba_config_and_sample_draws_attributes(
    world, tmp_path, capsys
):
    from latentfuse.cli.main import main

    out = tmp_path / "run"
    args = ["train", "--data", str(world["celeba"]), "--config", str(REPO / "configs/celeba.toml")]
    args += ["--output-dir", str(out), "--fit-vae", "never", "--vae", str(world["vae"])]
    assert main([*args, *TINY]) == 0
    printed = capsys.readouterr().out
    assert "conditioning: attributes (40 attributes); server_labels class" in printed
    assert printed.count("training images") == 5  # the 5 attribute-group clients
    grid = tmp_path / "grid.png"
    sample = ["sample", "--model", str(out / "model"), "--client", "all", "--num-images", "2"]
    assert main([*sample, "--num-inference-steps", "2", "--out", str(grid)]) == 0
    assert grid.is_file()


@pytest.mark.e2e
@pytest.mark.slow
def test_celeba_setting_is_evaluated_per_client(world, tmp_path):
    from latentfuse.cli.main import main

    model = train(celeba_config(world), tmp_path / "run")
    out = tmp_path / "results.json"
    args = ["evaluate", "--model", str(model), "--num-samples", "4", "--out", str(out)]
    assert main([*args, "--num-inference-steps", "2", "--batch-size", "4"]) == 0
    results = json.loads(out.read_text())
    assert set(results["clients"]) == {str(c) for c in range(5)}
    for entry in results["clients"].values():  # (a client with 1 held-out image has no FID)
        assert entry["num_generated"] == 4 and (entry["fid"] is not None or entry["fid_status"])
    pooled = results["pooled"]
    assert pooled["num_generated"] == 4 * 5 and np.isfinite(pooled["fid"]) and pooled["fid"] > 0


def test_awa2_setting_conditions_on_each_class_predicates(world, tmp_path):
    base = [f'vae="{world["vae"]}"', f'data.source="{world["awa2"]}"', "data.num_clients=2"]
    model = train(load_config(REPO / "configs" / "awa2.toml", base + TINY), tmp_path / "run")
    described = json.loads((model / "collafuse.json").read_text())
    assert described["conditioning"]["attribute_names"][:2] == ["black", "white"]
    rates = {cid: e["attribute_rates"] for cid, e in described["clients"].items()}
    assert all(set(r) <= {0.0, 1.0} for r in rates.values()) or len(rates) == 2

    from latentfuse.pipelines import CollaFusePipeline

    pipe = CollaFusePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        client_id=1,
        attributes=[["black", "white", "stripes"]],
        num_inference_steps=2,
        output_type="pt",
    ).images
    assert images.shape == (1, 3, 64, 64)


# ---- text --------------------------------------------------------------------------------------
def test_a_text_conditioned_run_samples_with_prompts_and_ships_its_encoder(world, tmp_path):
    model = train(celeba_config(world, *text_overrides(world)), tmp_path / "run")
    assert (model / "tokenizer").is_dir() and (model / "text_encoder").is_dir()
    index = json.loads((model / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]

    from latentfuse.pipelines import CollaFusePipeline

    pipe = CollaFusePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "output_type": "pt", "guidance_scale": 2.0}

    def sample(**extra):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(client_id=2, generator=generators, **kwargs, **extra).images

    prompts = ["smiling, male", "eyeglasses, wearing hat"]
    by_prompt = sample(prompt=prompts)
    states = pipe.text_conditioner().embed(prompts)
    torch.testing.assert_close(sample(prompt_embeds=states), by_prompt)
    assert not torch.allclose(sample(prompt=prompts, negative_prompt="bald"), by_prompt)
    assert not torch.allclose(sample(prompt=["bald", "young"]), by_prompt)
    assert sample().shape == (2, 3, 32, 32)  # prompts made of drawn attributes
    with pytest.raises(ValueError, match="not both"):
        sample(prompt=prompts, prompt_embeds=states)
    from latentfuse.pipelines import CollaFuseServerPipeline

    with pytest.raises(ValueError, match="pass conditioning="):
        CollaFuseServerPipeline.from_pretrained(model)(client_id=2, batch_size=1)
    rebuilt = CollaFusePipeline(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    again = rebuilt(client_id=2, generator=generators, prompt=prompts, **kwargs).images
    torch.testing.assert_close(again, by_prompt)


# ---- what the server receives ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["class", "client", "none"])
@pytest.mark.parametrize("kind", ["attributes", "text"])
def test_what_the_server_receives_of_each_kind(world, tmp_path, kind, mode):
    overrides = [f'server_labels="{mode}"', "data.num_clients=2", "data.overlap=false"]
    overrides += ['data.groups=[["Black_Hair"], ["Blond_Hair"]]']
    overrides += text_overrides(world) if kind == "text" else []
    run = build_run(celeba_config(world, *overrides), tmp_path / "run")
    trainer = Trainer(run, make_accelerator(run.config.train), tmp_path / "run", True)
    trainer.train_step()
    released = trainer.transport.log
    assert released and all(m.latents.ndim == 4 for m in released)
    for message in released:
        client = trainer.clients[message.client_id]
        if mode == "class":  # the release carries each image's conditioning, nothing else
            torch.testing.assert_close(message.labels, client.labels)
        else:
            assert message.labels is None
    server = run.server_unet
    if mode == "class":
        assert isinstance(server, UNet2DConditionModel)
    else:
        assert isinstance(server, UNet2DModel)
        expected = run.config.data.num_clients + 1 if mode == "client" else None
        assert server.config.num_class_embeds == expected
    if kind != "text":
        return
    # sampling: under "none" the server's steps run unconditioned, so two prompts share the
    # hand-off latents; under "class" the prompt reaches the server
    pipe = build_pipeline(run, trainer)
    pipe.set_progress_bar_config(disable=True)
    handoffs = []
    for prompt in ("smiling, male", "bald, eyeglasses"):
        generators = [torch.Generator().manual_seed(0)]
        out = pipe(
            client_id=0,
            prompt=prompt,
            generator=generators,
            num_inference_steps=4,
            guidance_scale=2.0,
            return_server_latents=True,
            output_type="latent",
        )
        handoffs.append(out.server_latents)
    same = torch.allclose(handoffs[0], handoffs[1])
    assert same == (mode != "class")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('conditioning.kind="pixels"', "conditioning.kind"),
        ('conditioning.kind="text"', "conditioning.text_encoder"),
        ('conditioning.prompt_template="no slot"', "prompt_template"),
    ],
)
def test_bad_conditioning_config_is_named(world, override, message):
    with pytest.raises(ValueError, match=message):
        celeba_config(world, override)


def test_attribute_conditioning_needs_attributes(world, tmp_path):
    config = load_config(
        None,
        [
            f'vae="{world["vae"]}"',
            f'data.source="{world["images"]}"',
            'data.subfolder=""',
            'conditioning.kind="attributes"',
            "data.num_clients=2",
            *TINY,
        ],
    )
    with pytest.raises(ValueError, match="needs a data set with attributes"):
        build_run(config, tmp_path / "run")
