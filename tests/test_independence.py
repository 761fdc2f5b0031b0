"""Client and server are independent at run time: importing one side's entry module in a fresh
interpreter loads none of the other side's modules (not only in its own import lines)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

CLIENT_ONLY = {
    "latentfuse.client",
    "latentfuse.setup_run",
    "latentfuse.http.client_job",
    "latentfuse.http.remote",
    "latentfuse.http.remote_sample",
}
SERVER_ONLY = {
    "latentfuse.server",
    "latentfuse.http.app",
    "latentfuse.http.auth",
    "latentfuse.http.persist",
    "latentfuse.http.service",
    "latentfuse.http.trainer",
}
# What both sides meet in: the messages, the cut, the engine, the config (and the pipelines).
SHARED = {"latentfuse.transport", "latentfuse.split", "latentfuse.engine", "latentfuse.config"}


@functools.cache
def loaded_modules(module: str) -> frozenset[str]:
    """The latentfuse modules in sys.modules after importing `module` in a fresh interpreter."""
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('latentfuse'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return frozenset(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["latentfuse.http.client_job", "latentfuse.http.remote_sample"])
def test_client_side_loads_nothing_of_the_server(module):
    loaded = loaded_modules(module)
    assert module in loaded
    assert not loaded & SERVER_ONLY, sorted(loaded & SERVER_ONLY)


@pytest.mark.parametrize("module", ["latentfuse.http.app", "latentfuse.http.service"])
def test_server_side_loads_nothing_of_the_client(module):
    loaded = loaded_modules(module)
    assert module in loaded
    assert not loaded & CLIENT_ONLY, sorted(loaded & CLIENT_ONLY)


def test_both_sides_meet_in_the_shared_modules():
    """The check can fail: each side does load the role-neutral modules it shares."""
    client, server = (
        loaded_modules("latentfuse.http.client_job"),
        loaded_modules("latentfuse.http.service"),
    )
    assert client & server >= SHARED
    assert "latentfuse.client" in client and "latentfuse.server" in server
