"""The messages between clients and server, and the in-process transport that carries them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentfuse.method.transport import SCHEMA_VERSION, InProcessTransport, ReleaseBatch


def release_fields(**changes) -> dict:
    """Keyword arguments of a valid three-image ReleaseBatch, with `changes` applied."""
    fields = {
        "client_id": 2,
        "image_ids": (0, 1, 2),
        "latents": torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
        "labels": torch.tensor([1, 0, 1]),
        "handoff_t": 100,
        "epoch": 0,
    }
    return fields | changes


def with_value(index: tuple, value: float) -> torch.Tensor:
    """Valid latents with one entry set to `value`."""
    latents = release_fields()["latents"].clone()
    latents[index] = value
    return latents


def test_valid_batch_is_accepted():
    """The reference batch is valid and carries the current schema version."""
    batch = ReleaseBatch(**release_fields())
    assert batch.schema_version == SCHEMA_VERSION
    assert batch.image_ids == (0, 1, 2)


def test_labels_may_be_withheld():
    """A client that does not share labels sends None."""
    assert ReleaseBatch(**release_fields(labels=None)).labels is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"latents": with_value((0, 0, 0, 0), float("nan"))}, "NaN or Inf"),
        ({"latents": with_value((2, 3, 3, 3), float("inf"))}, "NaN or Inf"),
        ({"latents": with_value((1, 1, 2, 0), float("-inf"))}, "NaN or Inf"),
        ({"latents": torch.zeros(3, 4, 4)}, "shape"),  # not (n, c, h, w)
        ({"latents": torch.zeros(3, 1, 4, 4, 4)}, "shape"),
        ({"latents": torch.zeros(2, 4, 4, 4)}, "shape"),  # fewer latents than ids
        ({"image_ids": (0, 1, 2, 3)}, "shape"),  # more ids than latents
        ({"labels": torch.tensor([1, 0])}, "labels"),
        ({"labels": torch.tensor([[1], [0], [1]])}, "labels"),
        ({"image_ids": (0, 1, 1)}, "unique"),
        ({"latents": torch.zeros(3, 4, 4, 4, dtype=torch.int64)}, "floating point"),
        ({"latents": torch.zeros(3, 4, 4, 4, dtype=torch.uint8)}, "floating point"),
        ({"latents": torch.zeros(3, 4, 4, 4, dtype=torch.bool)}, "floating point"),
    ],
    ids=[
        "nan",
        "inf",
        "minus_inf",
        "three_dim",
        "five_dim",
        "fewer_latents",
        "more_ids",
        "short_labels",
        "two_dim_labels",
        "duplicate_ids",
        "int64",
        "uint8",
        "bool",
    ],
)
def test_invalid_batch_is_rejected(changes, message):
    """A malformed release never reaches the server: ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        ReleaseBatch(**release_fields(**changes))


def test_batch_is_frozen():
    """A message cannot be edited after it is built (and validated)."""
    batch = ReleaseBatch(**release_fields())
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.latents = torch.zeros(3, 4, 4, 4)


def assert_same(got: list, expected: list) -> None:
    """The very same message objects, in the same order."""
    assert [id(m) for m in got] == [id(m) for m in expected]


def test_transport_delivers_in_order_once_and_logs_everything():
    """receive() returns what was sent since the last call, in order; the log keeps it all."""
    transport = InProcessTransport(keep_log=True)
    first = ReleaseBatch(**release_fields(client_id=0))
    second = ReleaseBatch(**release_fields(client_id=1))
    third = ReleaseBatch(**release_fields(client_id=0, epoch=1))
    transport.send(first)
    transport.send(second)
    assert_same(transport.receive(), [first, second])
    assert_same(transport.receive(), [])
    transport.send(third)
    assert_same(transport.receive(), [third])
    assert_same(transport.log, [first, second, third])


@pytest.mark.parametrize(
    "message",
    [release_fields(), torch.zeros(3, 4, 4, 4), "z_r", None],
    ids=["dict", "tensor", "str", "none"],
)
def test_transport_refuses_anything_but_release_batches(message):
    """Only ReleaseBatch crosses: a raw tensor (say, z0) is refused and never logged."""
    transport = InProcessTransport(keep_log=True)
    with pytest.raises(TypeError, match="ReleaseBatch"):
        transport.send(message)
    assert transport.log == [] and transport.receive() == []


@pytest.mark.parametrize(("image_ids", "match"), [((), "at least one"), ((0, -1), ">= 0")])
def test_release_batch_rejects_empty_and_negative_ids(image_ids, match):
    latents = torch.zeros(len(image_ids), 4, 2, 2)
    with pytest.raises(ValueError, match=match):
        ReleaseBatch(
            client_id=0, image_ids=image_ids, latents=latents, labels=None, handoff_t=10, epoch=0
        )
