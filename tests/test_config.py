"""Run configuration: defaults, TOML files, key=value overrides, validation, round trips."""

from __future__ import annotations

import json
import re

import pytest

from latentfuse.config import (
    ClientOverride,
    RunConfig,
    UNetConfig,
    config_from_dict,
    load_config,
    parse_override,
)


def test_defaults():
    """No file and no overrides gives the dataclass defaults."""
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.split.t_cut == 100 and cfg.split.objective == "exact"
    assert cfg.split.release_policy == "once"
    assert cfg.clients == ()


@pytest.mark.parametrize(
    ("override", "path", "expected"),
    [
        ("train.max_steps=3", ("train", "max_steps"), 3),
        ("split.t_cut=50", ("split", "t_cut"), 50),
        ("split.t_cut=0", ("split", "t_cut"), 0),
        ("split.t_cut=1000", ("split", "t_cut"), 1000),
        ("train.learning_rate=1e-3", ("train", "learning_rate"), 1e-3),
        ("train.learning_rate=1", ("train", "learning_rate"), 1.0),  # int widens to float
        ("split.objective=original", ("split", "objective"), "original"),  # bare string
        ('split.weighting="inverse_lambda2"', ("split", "weighting"), "inverse_lambda2"),
        ("server_unet.attention=true", ("server_unet", "attention"), True),
        (
            "server_unet.block_out_channels=[32, 64]",
            ("server_unet", "block_out_channels"),
            (32, 64),
        ),
        ("vae=checkpoints/other-vae", ("vae",), "checkpoints/other-vae"),
        ("server_labels=none", ("server_labels",), "none"),
    ],
)
def test_override_parses(override, path, expected):
    """A key=value override lands on its field with the field's type."""
    value = load_config(overrides=[override])
    for name in path:
        value = getattr(value, name)
    assert value == expected and type(value) is type(expected)


def test_clients_list_override():
    """A TOML array of inline tables becomes per-client overrides, nested UNet included."""
    cfg = load_config(
        overrides=[
            "split.t_cut=200",
            "clients=[{id=1, t_cut=10}, {id=3, unet={block_out_channels=[32]}}]",
        ]
    )
    assert cfg.clients == (
        ClientOverride(id=1, t_cut=10),
        ClientOverride(id=3, unet=UNetConfig(block_out_channels=(32,))),
    )
    assert [cfg.client_t_cut(i) for i in range(4)] == [200, 10, 200, 200]
    assert cfg.client_unet_config(3).block_out_channels == (32,)
    assert cfg.client_unet_config(0) == cfg.client_unet


def test_file_then_overrides(tmp_path):
    """Overrides apply on top of the file, merging into its tables."""
    path = tmp_path / "run.toml"
    path.write_text('[split]\nt_cut = 20\nobjective = "original"\n[train]\nmax_steps = 7\n')
    cfg = load_config(path, ["split.t_cut=30"])
    assert (cfg.split.t_cut, cfg.split.objective, cfg.train.max_steps) == (30, "original", 7)


def test_later_override_wins():
    """Overrides apply in order."""
    assert load_config(overrides=["train.seed=1", "train.seed=2"]).train.seed == 2


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.nope=1"], "nope"),
        (["nope=1"], "nope"),
        (["split.t_cut=-1"], "split.t_cut"),
        (["split.t_cut=1001"], "split.t_cut"),
        (["split.num_train_timesteps=50", "split.t_cut=51"], "split.t_cut"),
        (["clients=[{id=0, t_cut=1001}]"], "clients.t_cut"),
        (["clients=[{id=5}]"], "clients.id"),  # only 5 clients: ids 0..4
        (["clients=[{id=0, colour=1}]"], "colour"),
        (["data.partition=bogus"], "data.partition"),
        (["split.objective=approximate"], "split.objective"),
        (["split.release_policy=sometimes"], "split.release_policy"),
        (["server_labels=secret"], "server_labels"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["train.max_steps=1.5"], "train.max_steps"),
        (["train.max_steps=true"], "train.max_steps"),
        (["train.learning_rate=fast"], "train.learning_rate"),
        (["split.objective=3"], "split.objective"),
        (["server_unet.block_out_channels=64"], "server_unet.block_out_channels"),
        # UNetConfig validates itself without knowing where it sits: names unet.block_out_channels
        (["server_unet.block_out_channels=[64, 100]"], "unet.block_out_channels"),
        (["train=3"], "train"),
        (["train.max_steps"], "train.max_steps"),
        (["split.t_cut 50"], "split.t_cut"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(overrides, key):
    """Unknown keys, out-of-range values, wrong types and malformed overrides: ValueError
    whose message names the offending key."""
    with pytest.raises(ValueError, match=re.escape(key)):
        load_config(overrides=overrides)


def test_parse_override_requires_equals_sign():
    """An override without '=' is refused with an example of the right form."""
    with pytest.raises(ValueError, match="key=value"):
        parse_override("train.max_steps")


def test_missing_file():
    """A config path that does not exist is an error, not the defaults."""
    with pytest.raises(FileNotFoundError, match="no-such.toml"):
        load_config("/nonexistent/no-such.toml")


CONFIGS = {
    "defaults": [],
    "customised": [
        "split.t_cut=250",
        "split.weighting=inverse_lambda",
        "train.learning_rate=5e-4",
        "server_unet.block_out_channels=[32, 64, 96]",
        "clients=[{id=0, t_cut=0}, {id=2, unet={block_out_channels=[16], norm_num_groups=16}}]",
    ],
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_dict_round_trip(overrides):
    """config_from_dict(cfg.to_dict()) == cfg, also through JSON (tuples become lists)."""
    cfg = load_config(overrides=overrides)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_duplicate_client_ids_rejected():
    with pytest.raises(ValueError, match="clients.id"):
        load_config(None, ["clients=[{id=1, t_cut=20}, {id=1, t_cut=50}]"])


def test_a_renamed_key_is_read_under_its_old_name_everywhere(tmp_path):
    """data.split became data.subfolder: saved configs, TOML files and overrides still work,
    a resume does not see a difference, and setting both names is an error."""
    from latentfuse.config import config_from_dict, first_form, load_config
    from latentfuse.training.engine import config_differences

    saved = first_form(load_config(overrides=['data.subfolder=""']).to_dict())
    assert "split" in saved["data"] and "subfolder" not in saved["data"]
    assert config_from_dict(saved).data.subfolder == ""
    assert load_config(overrides=['data.split=""']).data.subfolder == ""
    toml = tmp_path / "old.toml"
    toml.write_text('[data]\nsplit = "valid"\n')
    assert load_config(toml).data.subfolder == "valid"
    current = load_config(overrides=['data.subfolder=""']).to_dict()
    assert config_differences(saved, current) == []
    with pytest.raises(ValueError, match="sets both 'subfolder' and its old name 'split'"):
        load_config(toml, ['data.subfolder="train"'])


@pytest.mark.e2e
@pytest.mark.parametrize("source", [None, "configs/cifar10.toml", "configs/smoke.toml"])
def test_latentfuse_config_prints_every_key_as_toml_that_reads_back(source, capsys):
    """`latentfuse config` is the key reference: its output is the same config again."""
    import tomllib
    from pathlib import Path

    from latentfuse.cli.main import main
    from latentfuse.config import config_from_dict, load_config

    root = Path(__file__).resolve().parents[1]
    path = str(root / source) if source else None
    client = "{id = 1, t_cut = 20, unet = {block_out_channels = [8]}}"
    overrides = ["split.t_cut=50", f"clients=[{client}]"]
    assert main(["config", *(["--config", path] if path else []), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "[train]" in printed and "max_steps = " in printed and "[[clients]]" in printed
    assert config_from_dict(tomllib.loads(printed)) == load_config(path, overrides)
