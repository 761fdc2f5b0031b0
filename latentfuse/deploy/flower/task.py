"""What the Flower ClientApp and ServerApp share: the settings and the message names."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

RELEASES, STATUS = "releases", "status"


# ---- settings ------------------------------------------------------------------------------------
def load_settings(run_config: dict[str, Any]) -> tuple[Any, Any]:
    """(RunConfig, DeployConfig) named by the run config: the `latentfuse client/serve` files."""
    from latentfuse.deploy.config import load_deploy_config

    overrides = str(run_config.get("overrides", "")).split()
    return load_deploy_config(str(run_config["config"]), overrides)
