"""Client partitions: complete, disjoint, seeded, label-respecting, and attribute groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentfuse.data.datasets import ImageDataset, ImageRecord, load_celeba, load_image_folder
from latentfuse.data.partition import (
    ClientShare,
    load_shares,
    partition,
    partition_fingerprint,
    save_shares,
    shares_from_json,
    shares_to_json,
)
from latentfuse.paths import CIFAR10_ARCHIVE

NUM_IMAGES = 60
NUM_CLASSES = 6
SCHEMES = [
    pytest.param("iid", {}, id="iid"),
    pytest.param("classes", {}, id="classes"),
    pytest.param("dirichlet", {"alpha": 0.5}, id="dirichlet-0.5"),
    pytest.param("dirichlet", {"alpha": 100.0}, id="dirichlet-100"),
]


def labelled_dataset(num_images: int = NUM_IMAGES, num_classes: int = NUM_CLASSES) -> ImageDataset:
    """Records with labels i % num_classes; partitioning never opens the (absent) files."""
    records = tuple(ImageRecord(Path(f"{i:04d}.jpg"), i % num_classes) for i in range(num_images))
    return ImageDataset(records, tuple(f"class{c}" for c in range(num_classes)))


def all_indices(shares: list[ClientShare]) -> list[int]:
    """Every index of every client, train then eval, with repeats kept."""
    return [i for share in shares for i in share.indices]


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES)
def test_partition_is_complete_and_disjoint(scheme: str, kwargs: dict) -> None:
    shares = partition(labelled_dataset(), 3, scheme, **kwargs)
    assert [s.client_id for s in shares] == [0, 1, 2]
    assert sorted(all_indices(shares)) == list(range(NUM_IMAGES))


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES)
def test_partition_is_deterministic_by_seed(scheme: str, kwargs: dict) -> None:
    first = partition(labelled_dataset(), 3, scheme, seed=7, **kwargs)
    assert partition(labelled_dataset(), 3, scheme, seed=7, **kwargs) == first
    other = partition(labelled_dataset(), 3, scheme, seed=8, **kwargs)
    assert partition_fingerprint(other) != partition_fingerprint(first)


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES)
@pytest.mark.parametrize("eval_fraction", [0.01, 0.1, 0.5])
def test_every_client_has_train_and_eval_images(
    scheme: str, kwargs: dict, eval_fraction: float
) -> None:
    for share in partition(labelled_dataset(), 3, scheme, eval_fraction=eval_fraction, **kwargs):
        size = len(share.indices)
        assert share.train_indices and share.eval_indices
        assert len(share.eval_indices) == min(max(1, round(eval_fraction * size)), size - 1)


def test_eval_fraction_zero_keeps_everything_for_training() -> None:
    shares = partition(labelled_dataset(), 3, eval_fraction=0.0)
    assert all(not s.eval_indices and len(s.train_indices) == 20 for s in shares)


def test_iid_deals_evenly() -> None:
    sizes = [len(s.indices) for s in partition(labelled_dataset(61), 4)]
    assert sorted(sizes) == [15, 15, 15, 16]


@pytest.mark.parametrize(("num_clients", "classes_per_client"), [(2, {3}), (4, {1, 2}), (6, {1})])
def test_classes_scheme_gives_disjoint_whole_classes(
    num_clients: int, classes_per_client: set[int]
) -> None:
    dataset = labelled_dataset()
    shares = partition(dataset, num_clients, "classes", seed=3)
    assert {len(s.classes) for s in shares} == classes_per_client
    assert sorted(c for s in shares for c in s.classes) == list(range(NUM_CLASSES))
    for share in shares:
        held = set(dataset.labels[list(share.indices)].tolist())
        assert held == set(share.classes)
        assert (
            sorted(share.indices) == np.flatnonzero(np.isin(dataset.labels, share.classes)).tolist()
        )


def test_classes_scheme_rejects_more_clients_than_classes() -> None:
    with pytest.raises(ValueError, match="num_clients=7 .* 6 classes"):
        partition(labelled_dataset(), 7, "classes")


def test_classes_scheme_on_image_folder(image_folder: Path) -> None:
    shares = partition(load_image_folder(image_folder), 2, "classes")
    assert [len(s.classes) for s in shares] == [2, 2]
    assert [len(s.indices) for s in shares] == [12, 12]


@pytest.mark.parametrize(("alpha", "num_clients"), [(0.05, 5), (0.5, 10), (1000.0, 6)])
def test_dirichlet_gives_every_client_images(alpha: float, num_clients: int) -> None:
    shares = partition(labelled_dataset(), num_clients, "dirichlet", alpha=alpha)
    assert all(s.indices for s in shares)
    assert sorted(all_indices(shares)) == list(range(NUM_IMAGES))


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="raise alpha or use fewer clients"):
        partition(labelled_dataset(num_images=8, num_classes=1), 8, "dirichlet", alpha=1e-3)


GROUPS = [["Male"], ["Eyeglasses", "Wearing_Hat"]]


def group_members(dataset: ImageDataset, group: list[str]) -> set[int]:
    """Indices of images having any attribute in `group`."""
    columns = [dataset.attribute_names.index(name) for name in group]
    return set(np.flatnonzero(dataset.attributes[:, columns].any(axis=1)).tolist())


def test_attribute_groups_without_overlap(celeba_root: Path) -> None:
    dataset = load_celeba(celeba_root)
    shares = partition(dataset, 2, groups=GROUPS, eval_fraction=0.2)
    members = [group_members(dataset, group) for group in GROUPS]
    assert members[0] & members[1]  # the fixture has images in both groups
    for share, member in zip(shares, members, strict=True):
        assert set(share.indices) <= member
        assert share.classes == (0,)
    assert sorted(all_indices(shares)) == sorted(members[0] | members[1])  # no-group images dropped
    assert len(all_indices(shares)) < len(dataset)


def test_attribute_groups_with_overlap(celeba_root: Path) -> None:
    dataset = load_celeba(celeba_root)
    shares = partition(dataset, 2, groups=GROUPS, overlap=True)
    for share, group in zip(shares, GROUPS, strict=True):
        assert set(share.indices) == group_members(dataset, group)
        assert not set(share.train_indices) & set(share.eval_indices)
    assert set(shares[0].indices) & set(shares[1].indices)


def test_attribute_groups_are_seeded(celeba_root: Path) -> None:
    dataset = load_celeba(celeba_root)
    assert partition(dataset, 2, groups=GROUPS, seed=1) == partition(
        dataset, 2, groups=GROUPS, seed=1
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients must be an integer >= 1, got 0"),
        ({"num_clients": 2.5}, "num_clients .* got 2.5"),
        ({"scheme": "shards"}, "scheme must be one of .* got 'shards'"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"alpha": 0.0}, "alpha must be > 0, got 0.0"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be in \[0, 1\), got 1.0"),
        ({"eval_fraction": -0.1}, "eval_fraction .* got -0.1"),
        ({"overlap": True}, "overlap=True needs attribute groups"),
        ({"scheme": "attributes"}, "needs groups"),
        ({"groups": [["Male"], ["Bald"]]}, "has none"),
        ({"num_clients": 61}, "num_clients=61 is more than the 60 images"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"num_clients": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        partition(labelled_dataset(), **arguments)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([["Male"]], "groups has 1 entries, expected num_clients=2"),
        ([["Male"], ["Has_Wings"]], r"groups\[1\] names unknown attribute 'Has_Wings'"),
        ([["Male"], "Bald"], r"groups\[1\] must be a non-empty list"),
        ([["Male"], []], r"groups\[1\] must be a non-empty list"),
    ],
)
def test_partition_rejects_bad_groups(celeba_root: Path, groups: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(load_celeba(celeba_root), 2, groups=groups)


def test_json_round_trip(tmp_path: Path) -> None:
    shares = partition(labelled_dataset(), 3, "dirichlet", seed=5)
    assert shares_from_json(shares_to_json(shares)) == shares
    path = save_shares(shares, tmp_path / "runs" / "partition.json")
    assert load_shares(path) == shares
    assert [p.name for p in path.parent.iterdir()] == ["partition.json"]  # no temporary left


def test_json_detects_edited_indices() -> None:
    text = shares_to_json(partition(labelled_dataset(), 2))
    with pytest.raises(ValueError, match="fingerprint"):
        shares_from_json(text.replace('"train_indices": [', '"train_indices": [59, ', 1))


def test_client_split_rejects_index_in_train_and_eval() -> None:
    with pytest.raises(ValueError, match="client 0: index 3"):
        ClientShare(0, (1, 3), (3,), (0,))


@pytest.mark.skipif(not CIFAR10_ARCHIVE.is_file(), reason="CIFAR-10 archive not present")
def test_cifar10_classes_partition() -> None:
    from latentfuse.data.datasets import load_cifar10

    dataset = load_cifar10("train")
    assert len(dataset) == 50_000 and len(dataset.class_names) == 10
    shares = partition(dataset, 5, "classes")
    assert [len(s.classes) for s in shares] == [2] * 5
    assert [len(s.indices) for s in shares] == [10_000] * 5
    assert [len(s.eval_indices) for s in shares] == [1_000] * 5
    assert sorted(all_indices(shares)) == list(range(50_000))


def test_limit_train_images_draws_a_seeded_subset_of_every_class():
    """A prefix of the sorted indices would hold one class only (ImageFolder order)."""
    from latentfuse.data.partition import ClientShare, limit_train_images

    labels = [i // 50 for i in range(100)]  # two classes, in data set order
    share = ClientShare(3, tuple(range(90)), tuple(range(90, 100)), (0, 1))
    small = limit_train_images(share, 20, seed=0)
    assert len(small.train_indices) == 20 and set(small.train_indices) <= set(share.train_indices)
    assert list(small.train_indices) == sorted(small.train_indices)
    assert {labels[i] for i in small.train_indices} == {0, 1}
    assert small.eval_indices == share.eval_indices
    assert limit_train_images(share, 20, seed=0) == small
    assert limit_train_images(share, 20, seed=1) != small
    assert limit_train_images(share, 0, seed=0) == share
    assert limit_train_images(share, 500, seed=0) == share
