"""What every `latentfuse` sub-command shares: help that shows defaults, and checks of the
user's arguments made before any work (one line each)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the description's line breaks (its examples) and shows every default
    (except where the help already says what the default is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def looks_local(text: str) -> bool:
    """Whether a model argument names a local path rather than a hub id (`owner/name`):
    absolute, relative (`./`, `~`), more or fewer than one `/`, or under a folder that exists
    here (`checkpoints/no-such-model`)."""
    path = Path(text).expanduser()
    return (
        path.is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") != 1
        or Path(path.parts[0]).is_dir()
    )


def check_model_path(text: str, option: str = "--model") -> None:
    """A local-looking path that does not exist is reported as such, before any hub look-up."""
    if looks_local(text) and not Path(text).expanduser().exists():
        raise FileNotFoundError(f"{option} {text}: no such folder (a local path, not a hub id)")


def check_image_path(text: str, option: str = "--out") -> None:
    """An output file whose extension Pillow cannot write is refused before any sampling."""
    Image.init()
    suffix = Path(text).suffix.lower()
    if suffix not in Image.registered_extensions():
        raise ValueError(
            f"{option} {text}: unknown image extension {suffix or '(none)'!r}; use .png, .jpg "
            "or another Pillow format"
        )


def parse_client(text: str, clients: list[int]) -> list[int]:
    """`--client` as the list of client ids it names: an id of this model, or 'all'."""
    if text == "all":
        return clients
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"--client must be a client id (one of {clients}) or 'all', got {text!r}")
    if int(text) not in clients:
        raise ValueError(f"--client {text}: this model has clients {clients}")
    return [int(text)]


def default_guidance(description: dict[str, Any]) -> float:
    """The guidance a model was made for: recorded in collafuse.json, else 3 for a model trained
    with label dropout on class labels (it needs guidance to look class-like), else 1."""
    if "guidance_scale" in description:
        return float(description["guidance_scale"])
    run = description.get("run_config", {})
    dropout = run.get("train", {}).get("label_dropout", 0)
    return 3.0 if dropout and description.get("server_labels") == "class" else 1.0
