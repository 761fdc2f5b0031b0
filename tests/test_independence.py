"""Client and server are independent at run time: importing one side's entry module in a fresh
interpreter loads none of the other side's modules (not only in its own import lines)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

CLIENT_ONLY = {
    "latentfuse.method.client",
    "latentfuse.training.setup",
    "latentfuse.deploy.client.job",
    "latentfuse.deploy.client.remote",
    "latentfuse.deploy.client.remote_sample",
    "latentfuse.deploy.flower.client_app",
}
SERVER_ONLY = {
    "latentfuse.method.server",
    "latentfuse.deploy.server.app",
    "latentfuse.deploy.server.auth",
    "latentfuse.deploy.server.persist",
    "latentfuse.deploy.server.service",
    "latentfuse.deploy.server.trainer",
    "latentfuse.deploy.flower.server_app",
}
# What both sides meet in: the messages, the cut, the engine, the config (and the pipelines).
SHARED = {
    "latentfuse.method.transport",
    "latentfuse.method.split",
    "latentfuse.training.engine",
    "latentfuse.config",
}


ENTRY_MODULES = (
    "latentfuse.deploy.client.job",
    "latentfuse.deploy.client.remote_sample",
    "latentfuse.deploy.server.app",
    "latentfuse.deploy.server.service",
    "latentfuse.deploy.flower.client_app",
    "latentfuse.deploy.flower.server_app",
)


@functools.cache
def _all_loaded() -> dict[str, frozenset[str]]:
    """Import every entry module, each in its own fresh interpreter, all at once."""
    template = (
        "import importlib, json, sys; importlib.import_module({!r}); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('latentfuse'))))"
    )
    children = {
        module: subprocess.Popen(
            [sys.executable, "-c", template.format(module)], stdout=subprocess.PIPE, text=True
        )
        for module in ENTRY_MODULES
    }
    out = {}
    for module, child in children.items():
        stdout, _ = child.communicate(timeout=300)
        assert child.returncode == 0, module
        out[module] = frozenset(json.loads(stdout.strip().splitlines()[-1]))
    return out


def loaded_modules(module: str) -> frozenset[str]:
    """The latentfuse modules in sys.modules after importing `module` in a fresh interpreter."""
    return _all_loaded()[module]


@pytest.mark.parametrize(
    "module",
    [
        "latentfuse.deploy.client.job",
        "latentfuse.deploy.client.remote_sample",
        "latentfuse.deploy.flower.client_app",
    ],
)
def test_client_side_loads_nothing_of_the_server(module):
    loaded = loaded_modules(module)
    assert module in loaded
    assert not loaded & SERVER_ONLY, sorted(loaded & SERVER_ONLY)


@pytest.mark.parametrize(
    "module",
    [
        "latentfuse.deploy.server.app",
        "latentfuse.deploy.server.service",
        "latentfuse.deploy.flower.server_app",
    ],
)
def test_server_side_loads_nothing_of_the_client(module):
    loaded = loaded_modules(module)
    assert module in loaded
    assert not loaded & CLIENT_ONLY, sorted(loaded & CLIENT_ONLY)


def test_both_sides_meet_in_the_shared_modules():
    """The check can fail: each side does load the role-neutral modules it shares."""
    client, server = (
        loaded_modules("latentfuse.deploy.client.job"),
        loaded_modules("latentfuse.deploy.server.service"),
    )
    assert client & server >= SHARED
    assert "latentfuse.method.client" in client and "latentfuse.method.server" in server
