"""`latentfuse config`: every run-config key with its value, as TOML (the defaults, or a file
with overrides applied). What `train.py --config` and `latentfuse train --config` accept."""

from __future__ import annotations

import argparse
import json
from typing import Any

from latentfuse.cli.common import HelpFormatter


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if value is None:
        raise ValueError("None has no TOML form")
    return repr(value)


def to_toml(values: dict[str, Any]) -> str:
    """A config dict as TOML: scalars first, then one table per section, `[[clients]]` last;
    keys whose value is None (unset optional ones) are left out."""
    values = json.loads(json.dumps(values))  # tuples as lists
    lines = [f"{k} = {_value(v)}" for k, v in values.items() if not isinstance(v, dict | list)]
    lines += [
        f"{k} = {_value(v)}" for k, v in values.items() if isinstance(v, list) and k != "clients"
    ]
    for name, table in values.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"]
            lines += [
                f"{k} = {_value(v)}"
                for k, v in table.items()
                if not isinstance(v, dict) and v is not None
            ]
    for client in values.get("clients", []):
        lines += ["", "[[clients]]"]
        for k, v in client.items():
            if isinstance(v, dict):
                inline = ", ".join(f"{a} = {_value(b)}" for a, b in v.items() if b is not None)
                lines.append(f"{k} = {{ {inline} }}")
            elif v is not None:
                lines.append(f"{k} = {_value(v)}")
    return "\n".join(lines) + "\n"


def add_config_parser(commands: argparse._SubParsersAction) -> None:
    """The `config` sub-command."""
    config = commands.add_parser(
        "config",
        help="print every run-config key with its value (TOML)",
        description="Example: latentfuse config --config configs/cifar10.toml split.t_cut=50",
        formatter_class=HelpFormatter,
    )
    config.add_argument("--config", default=None, help="TOML run config (default: the defaults)")
    config.add_argument("overrides", nargs="*", help="section.key=value overrides")
    config.set_defaults(func=run_config)


def run_config(args: argparse.Namespace) -> int:
    """Validate, then print the resolved configuration."""
    from latentfuse.config import load_config

    print(to_toml(load_config(args.config, args.overrides).to_dict()), end="")
    return 0
