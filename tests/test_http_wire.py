"""The HTTP deployment's parts without a server: wire format, tokens, configuration, layering."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from latentfuse.deploy.client.remote import chunks, read_token, upload_id
from latentfuse.deploy.config import DeployConfig, deploy_from_dict, load_deploy_config
from latentfuse.deploy.server.auth import TokenBook, issue_tokens
from latentfuse.deploy.wire import (
    META_KEY,
    SampleRequest,
    WireError,
    decode_handoff,
    decode_release,
    decode_sample_request,
    encode_handoff,
    encode_release,
    encode_sample_request,
)
from latentfuse.method.transport import ReleaseBatch
from latentfuse.pipelines import HandOff, SolverState

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "latentfuse" / "deploy"
SERVER_SIDE = sorted(p.stem for p in (DEPLOY / "server").glob("*.py") if p.stem != "__init__")
CLIENT_SIDE = sorted(p.stem for p in (DEPLOY / "client").glob("*.py") if p.stem != "__init__")
LIMIT = 1 << 20


def release(n: int = 3, labels: bool = True, client_id: int = 1, **changes) -> ReleaseBatch:
    """A valid release of `n` seeded 4x8x8 latents."""
    fields = {
        "client_id": client_id,
        "image_ids": tuple(range(10, 10 + n)),
        "latents": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(n)),
        "labels": torch.arange(n) % 4 if labels else None,
        "handoff_t": 100,
        "epoch": 2,
    }
    return ReleaseBatch(**(fields | changes))


def raw_release(tensors: dict[str, torch.Tensor], **meta) -> bytes:
    """Safetensors bytes with any tensors and release metadata (for malformed bodies)."""
    header = {"wire_version": 1, "kind": "release", "schema_version": 1, "client_id": 1}
    header |= {"t_cut": 100, "epoch": 0} | meta
    return save(tensors, metadata={META_KEY: json.dumps(header)})


# ---- wire --------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("fp16", [False, True])
def test_release_round_trip(labels, fp16):
    batch = release(labels=labels)
    back = decode_release(encode_release(batch, fp16=fp16), LIMIT, 16)
    assert (back.client_id, back.image_ids, back.handoff_t, back.epoch) == (1, (10, 11, 12), 100, 2)
    assert back.latents.dtype == torch.float32
    if fp16:
        torch.testing.assert_close(back.latents, batch.latents, atol=2e-3, rtol=1e-3)
    else:
        assert torch.equal(back.latents, batch.latents)
    assert (back.labels is None) == (not labels)
    if labels:
        assert torch.equal(back.labels, batch.labels)


GOOD = {"latents": torch.zeros(2, 4, 8, 8), "image_ids": torch.tensor([0, 1])}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "not safetensors"),
        (b"\xff" * 64, 400, "header length"),
        (b"\x10" + b"\x00" * 7 + b"{not json}......", 400, "unreadable"),
        (save(GOOD), 400, "metadata"),
        (raw_release(GOOD, wire_version=9), 400, "wire_version"),
        (raw_release(GOOD, kind="handoff"), 400, "'release'"),
        (raw_release(GOOD, schema_version=0), 400, "schema_version"),
        (raw_release(GOOD, client_id=-1), 400, "client_id"),
        (raw_release(GOOD, epoch="0"), 400, "epoch"),
        (raw_release({**GOOD, "latents": torch.zeros(2, 4, 8, 8, dtype=torch.long)}), 400, "dtype"),
        (raw_release({**GOOD, "latents": torch.zeros(2, 4, 8)}), 400, "dimensions"),
        (raw_release({**GOOD, "extra": torch.zeros(1)}), 400, "unexpected"),
        (raw_release({"latents": GOOD["latents"]}), 400, "missing"),
        (raw_release({**GOOD, "image_ids": torch.tensor([0, 0])}), 400, "unique"),
        (raw_release({**GOOD, "image_ids": torch.tensor([0, -1])}), 400, ">= 0"),
        (raw_release({**GOOD, "latents": torch.full((2, 4, 8, 8), float("nan"))}), 400, "NaN"),
        (raw_release({**GOOD, "latents": torch.full((2, 4, 8, 8), float("inf"))}), 400, "Inf"),
        (raw_release({**GOOD, "labels": torch.tensor([1])}), 400, "labels"),
        (raw_release({**GOOD, "image_ids": torch.arange(20)}), 413, "at most"),
        (raw_release({**GOOD, "latents": torch.zeros(64, 4, 64, 64)}), 413, "exceeds"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_release_bodies_are_refused(body, status, message):
    with pytest.raises(WireError, match=message) as info:
        decode_release(body, LIMIT, 16)
    assert info.value.status == status


def test_fp16_overflow_is_refused_at_the_client():
    with pytest.raises(ValueError, match="float16"):
        encode_release(release(latents=torch.full((3, 4, 8, 8), 1e6)), fp16=True)


@pytest.mark.parametrize("with_state", [False, True])
def test_handoff_round_trip_with_generator_states(with_state):
    state = SolverState((None, torch.randn(2, 4, 8, 8)), 1) if with_state else None
    handoff = HandOff(
        torch.randn(2, 4, 8, 8), torch.tensor([1, 3]), 1, 10, 4, torch.arange(6), state
    )
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    for g in generators:
        torch.randn(5, generator=g)
    back, states = decode_handoff(
        encode_handoff(handoff, [g.get_state() for g in generators]), LIMIT
    )
    assert torch.equal(back.latents, handoff.latents) and torch.equal(back.labels, handoff.labels)
    assert (back.step_index, back.num_inference_steps) == (4, 10)
    assert (back.solver_state is not None) == with_state
    fresh = torch.Generator()
    fresh.set_state(states[1].clone())
    assert torch.equal(torch.randn(3, generator=fresh), torch.randn(3, generator=generators[1]))


def test_sample_request_round_trip():
    request = SampleRequest(1, (5, 6), (2, 3), 8, 2.0, "dpm")
    assert decode_sample_request(encode_sample_request(request), LIMIT) == request


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seeds": []}, "seeds"),
        ({"seeds": [1, -2]}, "seeds"),
        ({"class_labels": [1]}, "class_labels"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": "2"}, "guidance_scale"),
        ({"scheduler": "pndm"}, "scheduler"),
        ({"wire_version": 2}, "wire_version"),
        ({"admin": True}, "unexpected"),
    ],
)
def test_bad_sample_requests_are_refused(change, message):
    values = json.loads(encode_sample_request(SampleRequest(1, (5, 6), (2, 3), 8)))
    with pytest.raises(WireError, match=message):
        decode_sample_request(json.dumps(values | change).encode(), LIMIT)


def test_chunks_and_upload_ids_are_deterministic():
    batch = release(n=7)
    parts = chunks(batch, 3)
    assert [p.image_ids for p in parts] == [(10, 11, 12), (13, 14, 15), (16,)]
    assert torch.equal(torch.cat([p.latents for p in parts]), batch.latents)
    keys = [upload_id(p) for p in parts]
    assert len(set(keys)) == 3 and keys == [upload_id(p) for p in chunks(batch, 3)]


# ---- tokens ------------------------------------------------------------------------------------
def test_tokens_are_stored_only_as_salted_hashes(tmp_path):
    written = issue_tokens(tmp_path / "clients.json", tmp_path / "tokens", [0, 1], iterations=1000)
    tokens = {cid: read_token(path) for cid, path in written.items()}
    stored = (tmp_path / "clients.json").read_text()
    assert all(token not in stored for token in tokens.values())
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in written.values())
    book = TokenBook.load(tmp_path / "clients.json")
    assert book.verify(0, tokens[0]) and book.verify(0, tokens[0])  # the second from the cache
    assert not book.verify(1, tokens[0]) and not book.verify(2, tokens[0])
    assert not book.verify(0, tokens[0] + "x") and not book.verify(0, "")
    assert [TokenBook.claimed_id(tokens[c]) for c in (0, 1)] == [0, 1]
    assert TokenBook.claimed_id("nonsense") is None and TokenBook.claimed_id("lfx.y") is None
    entries = json.loads(stored)["clients"]
    assert entries["0"]["salt"] != entries["1"]["salt"]
    again = issue_tokens(tmp_path / "clients.json", tmp_path / "tokens", [1], iterations=1000)
    book = TokenBook.load(tmp_path / "clients.json")  # client 0 keeps its token, 1 gets a new one
    assert book.verify(0, tokens[0]) and not book.verify(1, tokens[1])
    assert book.verify(1, read_token(again[1]))


def test_a_token_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "t.token"
    path.write_text("secret\n")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        read_token(path)


# ---- configuration and layering ----------------------------------------------------------------
def test_deploy_config_is_checked(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        DeployConfig()
    with pytest.raises(ValueError, match="unknown key"):
        deploy_from_dict({"class_names": ["a"], "chunk": 3})
    with pytest.raises(ValueError, match="upload_chunk_size"):
        deploy_from_dict({"class_names": ["a"], "upload_chunk_size": 0})
    toml = tmp_path / "c.toml"
    toml.write_text('[split]\nt_cut = 7\n[deploy]\nclass_names = ["a", "b"]\n')
    config, deploy = load_deploy_config(toml, ["deploy.max_sample_batch=3", "train.max_steps=5"])
    assert (config.split.t_cut, config.train.max_steps) == (7, 5)
    assert (deploy.num_classes, deploy.max_sample_batch) == (2, 3)
    toml.write_text("[split]\nt_cut = 7\n")
    with pytest.raises(ValueError, match=r"\[deploy\]"):
        load_deploy_config(toml)


def imports_of(path: Path) -> set[str]:
    """The modules a file imports, as absolute names (the package uses absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_both_sides_have_modules():
    assert {"app", "service", "store", "trainer"} <= set(SERVER_SIDE)
    assert {"job", "remote"} <= set(CLIENT_SIDE)


@pytest.mark.parametrize("module", CLIENT_SIDE)
def test_client_side_never_imports_the_server_side(module):
    imported = imports_of(DEPLOY / "client" / f"{module}.py")
    assert not {n for n in imported if n.startswith("latentfuse.deploy.server")}
    assert "latentfuse.method.server" not in imported


@pytest.mark.parametrize("module", SERVER_SIDE)
def test_server_side_never_imports_the_client_side(module):
    imported = imports_of(DEPLOY / "server" / f"{module}.py")
    assert not {n for n in imported if n.startswith("latentfuse.deploy.client")}
    assert "latentfuse.method.client" not in imported
