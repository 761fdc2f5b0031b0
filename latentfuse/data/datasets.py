"""Image sources: ImageFolder directories, archives of them, CelebA and AwA2 on-disk formats."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from latentfuse.checkpointing import atomic_write_dir
from latentfuse.paths import cache_dir

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
FORMATS = ("auto", "imagefolder", "celeba", "awa2")
CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_ATTRIBUTE_FILE = "list_attr_celeba.txt"
AWA2_IMAGE_DIR = "JPEGImages"
AWA2_MATRIX_FILE = "predicate-matrix-binary.txt"


@dataclass(frozen=True)
class ImageRecord:
    """One image on disk with its conditioning label and optional binary attributes."""

    path: Path
    label: int
    attributes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ImageDataset:
    """An ordered list of image records plus the names of the labels and attributes."""

    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    attribute_names: tuple[str, ...] = field(default_factory=tuple)
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        """Class label of every record, shape (n,)."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def attributes(self) -> np.ndarray:
        """Binary attribute matrix, shape (n, num_attributes); empty when there are none."""
        if not self.attribute_names:
            return np.zeros((len(self.records), 0), dtype=np.int64)
        return np.array([r.attributes for r in self.records], dtype=np.int64)

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """The records at `indices`, same label names."""
        return ImageDataset(
            tuple(self.records[i] for i in indices),
            self.class_names,
            self.attribute_names,
            self.root,
        )

    def only_classes(self, names: Sequence[str]) -> ImageDataset:
        """The images of the classes `names` only, labelled 0..len(names)-1 in the data set's
        own class order (a model trained on them knows just these classes)."""
        unknown = sorted(set(names) - set(self.class_names))
        if unknown:
            raise ValueError(
                f"data.classes {unknown} are not classes of this data set {list(self.class_names)}"
            )
        kept = [c for c in self.class_names if c in names]
        index = {self.class_names.index(c): i for i, c in enumerate(kept)}
        records = tuple(
            dataclasses.replace(r, label=index[r.label]) for r in self.records if r.label in index
        )
        return ImageDataset(records, tuple(kept), self.attribute_names, self.root)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_archive(path: Path) -> bool:
    """Whether `path` names a tar archive by its suffix."""
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: str | os.PathLike, sha256: str | None = None) -> Path:
    """Unpack a tar(.gz) once into the cache, checking its sha256 first; return the folder."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    actual = sha256_file(archive)
    if sha256 is not None and actual != sha256.lower():
        raise ValueError(
            f"archive {archive} has sha256 {actual}, expected {sha256}: the file is corrupt "
            "or not the expected data set"
        )
    target = cache_dir() / "archives" / actual[:16]
    if (target / ".complete").exists():
        return target

    def unpack(tmp: Path) -> None:  # into a temporary sibling, renamed when complete
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / ".complete").write_text(str(archive.name))

    atomic_write_dir(target, unpack)
    logger.info("unpacked %s into %s", archive, target)
    return target


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_images(class_dir: Path) -> list[Path]:
    images = _list_images(class_dir)
    if not images:
        raise ValueError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def load_image_folder(root: str | os.PathLike) -> ImageDataset:
    """ImageFolder layout: `root/<class>/<image>`; classes sorted by name, label = index."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"image folder {root} has no class sub-folders (expected root/<class>/)")
    records = []
    for label, class_dir in enumerate(class_dirs):
        records.extend(ImageRecord(path, label) for path in _class_images(class_dir))
    return ImageDataset(tuple(records), tuple(p.name for p in class_dirs), root=root)


def load_image(path: Path, resolution: int | None = None) -> torch.Tensor:
    """Read one RGB image as a float tensor in [-1, 1], shape (3, h, w)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if resolution is not None and image.size != (resolution, resolution):
                image = image.resize((resolution, resolution), Image.BICUBIC)
            array = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def resolve_image_root(source: str | os.PathLike, sha256: str | None = None) -> Path:
    """A folder for `source`: the folder itself, or an archive unpacked into the cache."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    return extract_archive(path, sha256) if is_archive(path) else path


def load_cifar10(subset: str = "train", source: str | os.PathLike | None = None) -> ImageDataset:
    """CIFAR-10 as JPEGs (the shared archive by default); `subset` is "train" or "test"."""
    from latentfuse.paths import CIFAR10_ARCHIVE, CIFAR10_SHA256

    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
    source = Path(source) if source is not None else CIFAR10_ARCHIVE
    if not source.exists():
        raise FileNotFoundError(
            f"the CIFAR-10 archive is not at {source}: set LATENTFUSE_CIFAR10 to the path of "
            "cifar10-jpg.tar.gz (or a folder holding train/ and test/), or pass data.source"
        )
    expected = CIFAR10_SHA256 if source == CIFAR10_ARCHIVE else None
    root = resolve_image_root(source, expected)
    for candidate in (root / "cifar10" / subset, root / subset):
        if candidate.is_dir():
            return load_image_folder(candidate)
    raise FileNotFoundError(
        f"no '{subset}' subset under {root} (expected cifar10/{subset}/<class>/)"
    )


def _require(path: Path, what: str, is_dir: bool = False) -> Path:
    if not (path.is_dir() if is_dir else path.is_file()):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _binary_row(tokens: Sequence[str], mapping: dict[str, int], where: str) -> tuple[int, ...]:
    try:
        return tuple(mapping[token] for token in tokens)
    except KeyError as error:
        expected = " or ".join(mapping)
        raise ValueError(f"{where}: value {error.args[0]!r}, expected {expected}") from None


def _read_celeba_attributes(path: Path) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    """Parse list_attr_celeba.txt into (attribute names, {image file name: 0/1 values})."""
    lines = [line.split() for line in path.read_text().splitlines()]
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise ValueError(f"{path}: expected the image count on line 1, attribute names on 2")
    names = tuple(lines[1])
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{path}: line 2 must list distinct attribute names, got {lines[1]}")
    rows: dict[str, tuple[int, ...]] = {}
    for number, tokens in enumerate(lines[2:], start=3):
        if not tokens:
            continue
        image, values = tokens[0], tokens[1:]
        where = f"{path} line {number} (image {image})"
        if len(values) != len(names):
            raise ValueError(f"{where}: {len(values)} attribute values, expected {len(names)}")
        if image in rows:
            raise ValueError(f"{where}: a second row for the same image")
        rows[image] = _binary_row(values, {"-1": 0, "1": 1}, where)
    if int(lines[0][0]) != len(rows):
        raise ValueError(f"{path}: line 1 says {lines[0][0]} images but {len(rows)} rows follow")
    return names, rows


def _match_rows_to_files(rows: dict, files: dict[str, Path], table: Path, folder: Path) -> None:
    """Raise naming the first image that has a row but no file, or a file but no row."""
    no_file = [name for name in rows if name not in files]
    if no_file:
        raise ValueError(
            f"{table} has a row for {no_file[0]} ({len(no_file)} such rows) "
            f"but there is no such image in {folder}"
        )
    no_row = [name for name in files if name not in rows]
    if no_row:
        raise ValueError(f"image {folder / no_row[0]} ({len(no_row)} such) has no row in {table}")
    if not rows:
        raise ValueError(f"{table} lists no images")


def load_celeba(root: str | os.PathLike, label_attribute: str | None = None) -> ImageDataset:
    """CelebA layout `img_align_celeba/*.jpg` + `list_attr_celeba.txt`; label = one attribute."""
    root = _require(Path(root), "CelebA folder", is_dir=True)
    image_dir = _require(root / CELEBA_IMAGE_DIR, "CelebA image folder", is_dir=True)
    table = _require(root / CELEBA_ATTRIBUTE_FILE, "CelebA attribute file")
    names, rows = _read_celeba_attributes(table)
    if label_attribute is not None and label_attribute not in names:
        raise ValueError(
            f"label_attribute {label_attribute!r} is not an attribute in {table}; "
            f"expected one of: {' '.join(names)}"
        )
    files = {path.name: path for path in _list_images(image_dir)}
    _match_rows_to_files(rows, files, table, image_dir)
    column = None if label_attribute is None else names.index(label_attribute)
    records = tuple(
        ImageRecord(files[name], 0 if column is None else values[column], values)
        for name, values in rows.items()
    )
    class_names = ("face",) if column is None else (f"not_{label_attribute}", label_attribute)
    return ImageDataset(records, class_names, names, root)


def _read_numbered_names(path: Path) -> tuple[str, ...]:
    """Parse AwA2's `classes.txt` / `predicates.txt` lines `1<tab>name` into names in order."""
    names: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path} line {number}"
        if len(tokens) != 2 or tokens[0] != str(len(names) + 1):
            raise ValueError(f"{where}: expected '{len(names) + 1}<tab><name>', got {line!r}")
        names.append(tokens[1])
    if not names:
        raise ValueError(f"{path} lists no names")
    return tuple(names)


def _read_predicate_matrix(path: Path, classes: Sequence[str], width: int) -> list[tuple[int, ...]]:
    """Parse AwA2's predicate-matrix-binary.txt: one row of `width` 0/1 values per class."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if len(rows) != len(classes):
        raise ValueError(f"{path} has {len(rows)} rows, expected {len(classes)} (one per class)")
    matrix = []
    for name, tokens in zip(classes, rows, strict=True):
        where = f"{path} row for class {name}"
        if len(tokens) != width:
            raise ValueError(f"{where}: {len(tokens)} values, expected {width} (one per predicate)")
        matrix.append(_binary_row(tokens, {"0": 0, "1": 1}, where))
    return matrix


def load_awa2(root: str | os.PathLike) -> ImageDataset:
    """AwA2 layout `JPEGImages/<class>/*.jpg` + classes/predicates/predicate-matrix-binary.txt."""
    root = _require(Path(root), "AwA2 folder", is_dir=True)
    image_dir = _require(root / AWA2_IMAGE_DIR, "AwA2 image folder", is_dir=True)
    classes = _read_numbered_names(_require(root / "classes.txt", "AwA2 class list"))
    predicates = _read_numbered_names(_require(root / "predicates.txt", "AwA2 predicate list"))
    matrix_file = _require(root / AWA2_MATRIX_FILE, "AwA2 predicate matrix")
    matrix = _read_predicate_matrix(matrix_file, classes, len(predicates))
    folders = {p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    unlisted = sorted(folders - set(classes))
    if unlisted:
        raise ValueError(f"class folder {image_dir / unlisted[0]} is not listed in classes.txt")
    records: list[ImageRecord] = []
    for label, (name, row) in enumerate(zip(classes, matrix, strict=True)):
        if name not in folders:
            raise FileNotFoundError(f"classes.txt lists {name!r} but {image_dir / name} is missing")
        records.extend(ImageRecord(p, label, row) for p in _class_images(image_dir / name))
    return ImageDataset(tuple(records), classes, predicates, root)


def detect_format(root: Path) -> str:
    """'celeba', 'awa2' or 'imagefolder', from the marker files in `root`."""
    if (root / CELEBA_ATTRIBUTE_FILE).is_file():
        return "celeba"
    if (root / AWA2_MATRIX_FILE).is_file():
        return "awa2"
    return "imagefolder"


def _unwrap(root: Path) -> Path:
    """Descend through lone wrapper folders (as archives often have) to the data set's root."""
    if not root.is_dir():
        raise ValueError(f"data source {root} is neither a folder nor a tar archive")
    while True:
        children = [p for p in root.iterdir() if not p.name.startswith(".")]
        if len(children) != 1 or not children[0].is_dir() or _list_images(children[0]):
            return root
        root = children[0]


def _find_subfolder(root: Path, name: str) -> Path:
    """The folder `root/<name>` or the single `root/*/<name>`."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"subfolder must be a plain folder name such as 'train', got {name!r}")
    if (root / name).is_dir():
        return root / name
    found = sorted(p for p in root.glob(f"*/{name}") if p.is_dir())
    if len(found) > 1:
        raise ValueError(f"subfolder {name!r} is ambiguous under {root}: {[str(p) for p in found]}")
    if not found:
        raise FileNotFoundError(
            f"no sub-folder {root / name} or {root}/*/{name} (data.subfolder = {name!r}; "
            'set data.subfolder="" for a folder whose class folders are at its top)'
        )
    return found[0]


def load_dataset(
    source: str | os.PathLike,
    format: str = "auto",
    subfolder: str | None = None,
    sha256: str | None = None,
    **kw: object,
) -> ImageDataset:
    """Load a folder or archive as ImageFolder, CelebA or AwA2 (`format="auto"` detects which)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    root = _unwrap(resolve_image_root(source, sha256))
    found = detect_format(root) if format == "auto" else format
    if subfolder is not None and found != "imagefolder":
        raise ValueError(
            f"subfolder={subfolder!r} applies to image folders, not {found} data ({root})"
        )
    if subfolder is not None:
        root = _unwrap(_find_subfolder(root, subfolder))
        found = detect_format(root) if format == "auto" else format
    format = found
    unexpected = sorted(set(kw) - ({"label_attribute"} if format == "celeba" else set()))
    if unexpected:
        raise TypeError(f"format {format!r} takes no keyword arguments {unexpected}")
    if format == "celeba":
        return load_celeba(root, **kw)  # type: ignore[arg-type]
    return load_awa2(root) if format == "awa2" else load_image_folder(root)


def verify_images(dataset: ImageDataset) -> None:
    """Open every image with PIL's verify(); raise ValueError naming the first corrupt one."""
    records = tqdm(dataset.records, desc="verifying images", disable=None, leave=False)
    for index, record in enumerate(records):
        try:
            with Image.open(record.path) as image:
                image.verify()
        # PIL signals a bad file with many types (OSError, SyntaxError, struct.error, ...).
        except Exception as error:
            raise ValueError(f"corrupt image {record.path} (record {index}): {error}") from error
