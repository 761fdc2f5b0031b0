"""A pytest plugin for comparing the HTTP path's server weights across source trees.

Run `tests/test_flower.py::test_flower_and_http_carry_the_same_bytes_to_the_same_server_weights`
in each tree with it; every `ServerTrainer.publish` appends (step, SHA-256 of the EMA weights)
to $HASH_OUT, and each client's release key is derived from its key file's path (the last two
parts) instead of the CSPRNG, so two trees get the same releases:

    KEY_MODULES=latentfuse.method.release_key TRAINER_MODULES=latentfuse.deploy.server.trainer \
    HASH_OUT=after.txt PYTHONPATH=.:experiments python -m pytest -p same_weights_http_plugin \
        "tests/test_flower.py::test_flower_and_http_carry_the_same_bytes_to_the_same_server_weights"

(an older tree: KEY_MODULES=latentfuse.release_key TRAINER_MODULES=latentfuse.http.trainer).
"""

import hashlib
import importlib
import os
import sys
from pathlib import Path


def _first_module(variable: str):
    """The first importable module of the comma-separated names in $variable."""
    for name in os.environ[variable].split(","):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of ${variable} imports: {os.environ[variable]}")


def pytest_configure(config) -> None:
    """Wrap ServerTrainer.publish to record the hash of the weights it publishes."""
    trainer = _first_module("TRAINER_MODULES")
    original = trainer.ServerTrainer.publish

    def publish(self):
        state = self.engine.ema_model("server").state_dict()
        digest = hashlib.sha256()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().cpu().numpy().tobytes())
        with open(os.environ["HASH_OUT"], "a") as f:
            f.write(f"{self.step} {digest.hexdigest()}\n")
        return original(self)

    trainer.ServerTrainer.publish = publish


def pytest_sessionstart(session) -> None:
    """Release keys from their file's path, so every tree gets the same ones."""
    keys = _first_module("KEY_MODULES")
    original = keys.load_or_create_release_key

    def by_path(path):
        tail = "/".join(Path(path).parts[-2:])
        keys.new_release_key = lambda: hashlib.sha256(f"fixed-{tail}".encode()).digest()
        return original(path)

    keys.load_or_create_release_key = by_path
    for module in list(sys.modules.values()):
        if getattr(module, "load_or_create_release_key", None) is original:
            module.load_or_create_release_key = by_path
