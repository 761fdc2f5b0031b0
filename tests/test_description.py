"""The model description (collafuse.json): one typed record, one writer, one reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentfuse.description import ClientEntry, ModelDescription

ROOT = Path(__file__).resolve().parents[1]


def described() -> ModelDescription:
    entry = ClientEntry(100, 100, (0, 1), ("cat", "dog"), 250, 20, 190, (0.5, 0.25))
    return ModelDescription(
        class_names=("cat", "dog"),
        clients={3: entry},
        conditioning={"kind": "attributes", "attribute_names": ["a", "b"]},
        run_config={"train": {"label_dropout": 0.1}},
        training={"steps": 4, "planned_steps": 4},
    )


def test_to_json_and_from_json_round_trip():
    first = described()
    text = json.dumps(first.to_json())
    again = ModelDescription.from_json(json.loads(text))
    assert again.to_json() == first.to_json()
    assert ModelDescription.from_json(again.to_json()) == again  # complete: a fixed point


def test_an_older_file_is_completed_in_one_place():
    """A collafuse.json from before conditioning kinds, release cuts and recorded guidance."""
    old = {
        "class_names": ["cat", "dog"],
        "clients": {"0": {"t_cut": 100, "classes": [0], "class_names": ["cat"]}},
        "server_labels": "class",
        "run_config": {"train": {"label_dropout": 0.1}},
    }
    complete = ModelDescription.from_json(old).to_json()
    assert complete["conditioning"] == {"kind": "class"}
    assert complete["clients"]["0"]["release_cut"] == 100
    assert complete["guidance_scale"] == 3.0  # label dropout on class labels: guided
    no_dropout = {**old, "run_config": {"train": {"label_dropout": 0.0}}}
    assert ModelDescription.from_json(no_dropout).default_guidance == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clients": {}}, "clients"),
        ({"conditioning": {"kind": "pixels"}}, "conditioning.kind"),
        ({"colour": "blue"}, "unknown keys"),
    ],
)
def test_a_bad_description_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelDescription.from_json({**described().to_json(), **change})


def test_the_shipped_model_reads_back_unchanged_in_what_it_says():
    raw = json.loads((ROOT / "checkpoints/cifar10-collafuse/collafuse.json").read_text())
    complete = ModelDescription.from_json(raw).to_json()
    for key, value in raw.items():
        if key != "clients":
            assert complete[key] == value, key
    for cid, entry in raw["clients"].items():
        assert {k: complete["clients"][cid][k] for k in entry} == entry


def test_the_deployment_server_describes_the_conditioning_too():
    from latentfuse.config import load_config
    from latentfuse.deploy.config import DeployConfig
    from latentfuse.deploy.server.service import server_description
    from latentfuse.deploy.server.trainer import server_splits

    config = load_config(None, ["data.num_clients=2"])
    deploy = DeployConfig(class_names=("cat", "dog"))
    description = server_description(config, deploy, server_splits(config))
    assert description["conditioning"] == {"kind": "class"}
    assert description["guidance_scale"] == 3.0 and set(description["clients"]) == {"0", "1"}
