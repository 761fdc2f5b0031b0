"""Loaders for ImageFolder, CelebA and AwA2 layouts, archives, and their errors on bad input."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    AWA2_CLASSES,
    AWA2_MATRIX,
    AWA2_PREDICATES,
    CELEBA_ATTRIBUTES,
    CELEBA_IMAGES,
    IMAGE_FOLDER_CLASSES,
    IMAGES_PER_CLASS,
    celeba_row,
)

from latentfuse.data.datasets import (
    load_awa2,
    load_celeba,
    load_dataset,
    load_image,
    load_image_folder,
    sha256_file,
    verify_images,
)
from latentfuse.paths import CIFAR10_ARCHIVE, CIFAR10_SHA256


def test_load_image_folder(image_folder: Path) -> None:
    dataset = load_image_folder(image_folder)
    assert dataset.class_names == IMAGE_FOLDER_CLASSES
    assert np.bincount(dataset.labels).tolist() == [IMAGES_PER_CLASS] * len(IMAGE_FOLDER_CLASSES)
    image = load_image(dataset.records[0].path)
    assert image.shape == (3, 8, 8)
    assert -1.0 <= image.min() <= image.max() <= 1.0
    verify_images(dataset)


def test_load_celeba_without_label(celeba_root: Path) -> None:
    dataset = load_celeba(celeba_root)
    assert len(dataset) == CELEBA_IMAGES
    assert dataset.class_names == ("face",)
    assert dataset.attribute_names == tuple(CELEBA_ATTRIBUTES)
    assert set(dataset.labels.tolist()) == {0}
    assert [r.path.name for r in dataset.records][:2] == ["000001.jpg", "000002.jpg"]
    expected = np.array([celeba_row(i) for i in range(CELEBA_IMAGES)])
    np.testing.assert_array_equal(dataset.attributes, expected)  # -1 -> 0, 1 -> 1


@pytest.mark.parametrize("attribute", ["Male", "Eyeglasses", "Young", "5_o_Clock_Shadow"])
def test_load_celeba_label_attribute(celeba_root: Path, attribute: str) -> None:
    dataset = load_celeba(celeba_root, label_attribute=attribute)
    assert dataset.class_names == (f"not_{attribute}", attribute)
    column = CELEBA_ATTRIBUTES.index(attribute)
    np.testing.assert_array_equal(dataset.labels, dataset.attributes[:, column])


def test_load_celeba_accepts_crlf_line_ends(celeba_root: Path) -> None:
    table = celeba_root / "list_attr_celeba.txt"
    table.write_bytes(table.read_text().replace("\n", "\r\n").encode())
    assert len(load_celeba(celeba_root)) == CELEBA_IMAGES


def test_load_awa2(awa2_root: Path) -> None:
    dataset = load_awa2(awa2_root)
    assert dataset.class_names == AWA2_CLASSES  # classes.txt order, not alphabetical
    assert dataset.attribute_names == AWA2_PREDICATES
    for record in dataset.records:
        assert record.path.parent.name == AWA2_CLASSES[record.label]
        assert record.attributes == AWA2_MATRIX[record.label]
    assert np.bincount(dataset.labels).tolist() == [4, 4, 4]


@pytest.mark.parametrize(
    ("fixture", "num_images", "class_names"),
    [
        ("image_folder", 24, IMAGE_FOLDER_CLASSES),
        ("celeba_root", CELEBA_IMAGES, ("face",)),
        ("awa2_root", 12, AWA2_CLASSES),
    ],
)
def test_load_dataset_detects_format(
    request: pytest.FixtureRequest, fixture: str, num_images: int, class_names: tuple
) -> None:
    dataset = load_dataset(request.getfixturevalue(fixture))
    assert (len(dataset), dataset.class_names) == (num_images, class_names)


def test_load_dataset_passes_label_attribute(celeba_root: Path) -> None:
    dataset = load_dataset(celeba_root, format="celeba", label_attribute="Male")
    assert dataset.class_names == ("not_Male", "Male")


@pytest.mark.parametrize("layout", ["{split}", "cifar10/{split}"])
def test_load_dataset_split_folder(image_folder: Path, tmp_path: Path, layout: str) -> None:
    root = tmp_path / "with_splits"
    for split in ("train", "test"):
        shutil.copytree(image_folder, root / layout.format(split=split))
    assert len(load_dataset(root, subfolder="train")) == 24
    with pytest.raises(FileNotFoundError, match="valid"):
        load_dataset(root, subfolder="valid")


def test_load_dataset_unpacks_archive(image_archive: Path, isolated_cache: Path) -> None:
    dataset = load_dataset(image_archive, sha256=sha256_file(image_archive))
    assert dataset.class_names == IMAGE_FOLDER_CLASSES and len(dataset) == 24
    assert dataset.records[0].path.is_relative_to(isolated_cache)
    assert len(load_dataset(image_archive)) == 24  # second call reuses the unpacked copy


def test_load_dataset_rejects_wrong_checksum(image_archive: Path, isolated_cache: Path) -> None:
    with pytest.raises(ValueError, match=f"{image_archive.name}.*expected 0000"):
        load_dataset(image_archive, sha256="0" * 64)
    assert not any(isolated_cache.glob("archives/*"))


def _drop_last_value(root: Path) -> Path:
    table = root / "list_attr_celeba.txt"
    lines = table.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]
    table.write_text("\n".join(lines))
    return root


def _drop_last_row(root: Path) -> Path:
    table = root / "list_attr_celeba.txt"
    lines = table.read_text().splitlines()
    table.write_text("\n".join([str(CELEBA_IMAGES - 1), *lines[1:-1]]))
    return root


def _edit(path: str, old: str, new: str) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        (root / path).write_text((root / path).read_text().replace(old, new, 1))
        return root

    return mutate


def _delete(path: str) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        target = root / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return root

    return mutate


def _make_dir(path: str) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        (root / path).mkdir(parents=True)
        return root

    return mutate


def _garbage_image(root: Path) -> Path:
    (root / "dog" / "0003.jpg").write_bytes(b"definitely not a jpeg" * 10)
    return root


def _empty_awa2_class(root: Path) -> Path:
    for image in (root / "JPEGImages" / "antelope").iterdir():
        image.unlink()
    return root


# fmt: off
BAD_INPUTS = [
    # id, fixture, mutation, loader, error, message that must name the bad item
    ("missing path", "image_folder", lambda r: r / "nowhere", load_dataset, FileNotFoundError,
     "nowhere"),
    ("missing folder", "image_folder", lambda r: r / "nowhere", load_image_folder,
     FileNotFoundError, "nowhere"),
    ("empty class folder", "image_folder", _make_dir("horse"), load_image_folder, ValueError,
     "horse"),
    ("corrupt image", "image_folder", _garbage_image, lambda r: verify_images(load_dataset(r)),
     ValueError, "dog/0003.jpg"),
    ("missing attribute file", "celeba_root", _delete("list_attr_celeba.txt"), load_celeba,
     FileNotFoundError, "list_attr_celeba.txt"),
    ("missing image folder", "celeba_root", _delete("img_align_celeba"), load_celeba,
     FileNotFoundError, "img_align_celeba"),
    ("wrong attribute count", "celeba_root", _drop_last_value, load_celeba, ValueError,
     "line 3 \\(image 000001.jpg\\): 39 attribute values, expected 40"),
    ("image without row", "celeba_root", _drop_last_row, load_celeba, ValueError,
     "000012.jpg.*has no row"),
    ("row without image", "celeba_root", _delete("img_align_celeba/000005.jpg"), load_celeba,
     ValueError, "row for 000005.jpg"),
    ("count line mismatch", "celeba_root", _edit("list_attr_celeba.txt", "12", "13"),
     load_celeba, ValueError, "line 1 says 13"),
    ("attribute value not -1/1", "celeba_root", _edit("list_attr_celeba.txt", "-1", " 0"),
     load_celeba, ValueError, "000001.jpg.*'0'"),
    ("unknown label attribute", "celeba_root", lambda r: r,
     lambda r: load_celeba(r, label_attribute="Has_Wings"), ValueError, "Has_Wings"),
    ("missing predicate matrix", "awa2_root", _delete("predicate-matrix-binary.txt"), load_awa2,
     FileNotFoundError, "predicate-matrix-binary.txt"),
    ("wrong predicate count", "awa2_root", _edit("predicate-matrix-binary.txt", "1 1 0 0 1", "1"),
     load_awa2, ValueError, "class zebra: 1 values, expected 5"),
    ("class without folder", "awa2_root", _delete("JPEGImages/killer+whale"), load_awa2,
     FileNotFoundError, "killer\\+whale"),
    ("folder not in classes.txt", "awa2_root", _make_dir("JPEGImages/horse"), load_awa2,
     ValueError, "horse"),
    ("empty awa2 class folder", "awa2_root", _empty_awa2_class, load_awa2, ValueError,
     "antelope"),
    ("bad classes.txt line", "awa2_root", _edit("classes.txt", "2\tantelope", "7\tantelope"),
     load_awa2, ValueError, "classes.txt line 2"),
]
# fmt: on


@pytest.mark.parametrize(
    ("fixture", "mutate", "loader", "error", "message"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_raises_naming_the_item(
    request: pytest.FixtureRequest,
    fixture: str,
    mutate: Callable[[Path], Path],
    loader: Callable[[Path], object],
    error: type[Exception],
    message: str,
) -> None:
    source = mutate(request.getfixturevalue(fixture))
    with pytest.raises(error, match=message):
        loader(source)


def test_load_image_names_corrupt_file(image_folder: Path) -> None:
    path = _garbage_image(image_folder) / "dog" / "0003.jpg"
    with pytest.raises(ValueError, match="0003.jpg"):
        load_image(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "lmdb"}, "format must be one of"),
        ({"format": "awa2", "subfolder": "train"}, "subfolder=.train. applies to image folders"),
        ({"subfolder": "../x"}, "plain folder name"),
    ],
)
def test_load_dataset_rejects_bad_arguments(image_folder: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(image_folder, **kwargs)


def test_load_dataset_rejects_unknown_keyword(image_folder: Path) -> None:
    with pytest.raises(TypeError, match="label_attribute"):
        load_dataset(image_folder, label_attribute="Male")


def test_load_dataset_rejects_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")
    with pytest.raises(ValueError, match="images.zip"):
        load_dataset(path)


@pytest.mark.parametrize(("fixture", "found"), [("celeba_root", "celeba"), ("awa2_root", "awa2")])
def test_load_dataset_split_needs_image_folder(
    request: pytest.FixtureRequest, fixture: str, found: str
) -> None:
    message = f"subfolder='train' applies to image folders, not {found}"
    with pytest.raises(ValueError, match=message):
        load_dataset(request.getfixturevalue(fixture), subfolder="train")


@pytest.mark.skipif(not CIFAR10_ARCHIVE.is_file(), reason="CIFAR-10 archive not present")
def test_load_dataset_reads_the_cifar10_archive_split() -> None:
    dataset = load_dataset(CIFAR10_ARCHIVE, subfolder="test", sha256=CIFAR10_SHA256)
    assert len(dataset) == 10_000 and len(dataset.class_names) == 10


def test_a_missing_cifar10_archive_names_the_setting(tmp_path, monkeypatch):
    from latentfuse.data.datasets import load_cifar10

    monkeypatch.setattr("latentfuse.paths.CIFAR10_ARCHIVE", tmp_path / "nowhere.tar.gz")
    with pytest.raises(FileNotFoundError, match="LATENTFUSE_CIFAR10"):
        load_cifar10("train")


def test_the_cifar10_location_is_a_setting(tmp_path):
    import subprocess
    import sys

    code = "import latentfuse.paths as p; print(p.CIFAR10_ARCHIVE)"
    env = {**__import__("os").environ, "LATENTFUSE_CIFAR10": str(tmp_path / "c10.tar.gz")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / "c10.tar.gz")


def test_only_some_classes_are_kept_and_relabelled_in_the_data_sets_order(tmp_path):
    from latentfuse.config import load_config
    from latentfuse.testing.shapes import make_shapes
    from latentfuse.training.setup import load_run_dataset

    folder = make_shapes(tmp_path / "shapes", classes=3, per_class=4, size=16)
    full = load_dataset(folder)
    config = load_config(None, [f'data.source="{folder}"', 'data.subfolder=""'])
    names = [full.class_names[2], full.class_names[0]]  # asked out of order
    kept = load_run_dataset(dataclass_replace(config, names))
    assert kept.class_names == (full.class_names[0], full.class_names[2])  # the data set's order
    assert len(kept) == 8 and sorted(set(kept.labels.tolist())) == [0, 1]
    for record in kept.records:  # every image keeps its own class, under its new index
        original = next(r for r in full.records if r.path == record.path)
        assert full.class_names[original.label] == kept.class_names[record.label]
    with pytest.raises(ValueError, match="data.classes \\['zebra'\\] are not classes"):
        full.only_classes(["zebra"])


def dataclass_replace(config, classes):
    import dataclasses

    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, classes=tuple(classes))
    )
