"""What every `latentfuse` sub-command shares: help that shows defaults, and checks of the
user's arguments made before any work (one line each)."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the description's line breaks (its examples) and shows every default
    (except where the help already says what the default is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or not text:
            return text  # said already, nothing to say, or an option without help
        return super()._get_help_string(action)


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
