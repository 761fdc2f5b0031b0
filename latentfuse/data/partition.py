"""Deal a data set's images to clients: iid, disjoint classes, Dirichlet, or attribute groups.

The "classes" scheme is CollaFuse's non-IID setting: each client holds every image of a few
classes and no client shares a class. Everything is deterministic given `seed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from latentfuse.data.datasets import ImageDataset

SCHEMES = ("iid", "classes", "dirichlet", "attributes")
MAX_DIRICHLET_DRAWS = 100
JSON_FORMAT = 1


@dataclass(frozen=True)
class ClientShare:
    """One client's share: train and eval indices into the data set and the labels it holds."""

    client_id: int
    train_indices: tuple[int, ...]
    eval_indices: tuple[int, ...]
    classes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.client_id < 0:
            raise ValueError(f"client_id must be >= 0, got {self.client_id}")
        shared = set(self.train_indices) & set(self.eval_indices)
        if shared:
            raise ValueError(
                f"client {self.client_id}: index {min(shared)} is in both train and eval indices"
            )

    @property
    def indices(self) -> tuple[int, ...]:
        """Train indices followed by eval indices."""
        return self.train_indices + self.eval_indices


def _check_arguments(
    dataset: ImageDataset,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float,
    eval_fraction: float,
    overlap: bool,
) -> None:
    """Raise ValueError naming the first argument that is out of range."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    if overlap and scheme != "attributes":
        raise ValueError(f"overlap=True needs attribute groups, got scheme {scheme!r}")
    if len(dataset) == 0:
        raise ValueError("dataset has no images to partition")


def _iid(num_images: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle all indices and deal them into num_clients near-equal parts."""
    if num_clients > num_images:
        raise ValueError(f"num_clients={num_clients} is more than the {num_images} images")
    return np.array_split(rng.permutation(num_images), num_clients)


def _by_classes(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the distinct labels, deal them into disjoint sets; a client gets all their images."""
    classes = np.unique(labels)
    if num_clients > len(classes):
        raise ValueError(
            f"num_clients={num_clients} is more than the {len(classes)} classes in the data set: "
            "the 'classes' scheme gives every client at least one class of its own"
        )
    class_sets = np.array_split(rng.permutation(classes), num_clients)
    return [np.flatnonzero(np.isin(labels, class_set)) for class_set in class_sets]


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, deal its images by proportions ~ Dir(alpha); redraw until no client is empty."""
    if num_clients > len(labels):
        raise ValueError(f"num_clients={num_clients} is more than the {len(labels)} images")
    by_class = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for indices in by_class:
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
            for client, chunk in enumerate(np.split(rng.permutation(indices), cuts)):
                parts[client].append(chunk)
        members = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if all(len(member) for member in members):
            return members
    raise ValueError(
        f"dirichlet: some client got no image in {MAX_DIRICHLET_DRAWS} draws (alpha={alpha}, "
        f"num_clients={num_clients}, {len(labels)} images); raise alpha or use fewer clients"
    )


def _group_membership(dataset: ImageDataset, groups: Sequence[Sequence[str]]) -> np.ndarray:
    """Boolean (n, num_clients): image i has some attribute of groups[k]."""
    names = dataset.attribute_names
    if not names:
        raise ValueError("groups need a data set with attributes (CelebA, AwA2); this one has none")
    attributes = dataset.attributes
    member = np.zeros((len(dataset), len(groups)), dtype=bool)
    for client, group in enumerate(groups):
        if isinstance(group, str) or not group:
            raise ValueError(f"groups[{client}] must be a non-empty list of names, got {group!r}")
        unknown = [name for name in group if name not in names]
        if unknown:
            raise ValueError(
                f"groups[{client}] names unknown attribute {unknown[0]!r}; "
                f"expected one of: {' '.join(names)}"
            )
        member[:, client] = attributes[:, [names.index(name) for name in group]].any(axis=1)
    return member


def _by_groups(member: np.ndarray, overlap: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """Clients by attribute group; without overlap a multi-group image goes to one random match."""
    num_clients = member.shape[1]
    if overlap:
        return [np.flatnonzero(member[:, client]) for client in range(num_clients)]
    choice = np.where(member, rng.random(member.shape), -1.0).argmax(axis=1)
    matched = member.any(axis=1)  # images matching no group are dropped
    return [np.flatnonzero(matched & (choice == client)) for client in range(num_clients)]


def _train_eval_indices(
    indices: np.ndarray, eval_fraction: float, seed: int, client_id: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Seeded per-client train/eval division; at least one eval image when eval_fraction > 0
    and n >= 2."""
    shuffled = np.random.default_rng([seed, client_id]).permutation(indices)
    num_eval = 0
    if eval_fraction > 0 and len(indices) >= 2:
        num_eval = min(max(1, round(eval_fraction * len(indices))), len(indices) - 1)
    return tuple(sorted(shuffled[num_eval:].tolist())), tuple(sorted(shuffled[:num_eval].tolist()))


def limit_train_images(share: ClientShare, limit: int, seed: int) -> ClientShare:
    """`share` keeping `limit` of its training images, a seeded random subset (0: all). A
    prefix of the sorted indices would keep the data set's order (one class first in an
    ImageFolder); the held-out images are unchanged."""
    if not limit or limit >= len(share.train_indices):
        return share
    rng = np.random.default_rng([seed, share.client_id, 1])
    keep = np.sort(rng.choice(len(share.train_indices), limit, replace=False))
    return replace(share, train_indices=tuple(share.train_indices[i] for i in keep))


def partition(
    dataset: ImageDataset,
    num_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    eval_fraction: float = 0.1,
    groups: Sequence[Sequence[str]] | None = None,
    overlap: bool = False,
) -> list[ClientShare]:
    """Split `dataset` among clients; `groups` (attribute names per client) selects "attributes"."""
    if groups is not None and scheme in ("iid", "attributes"):
        scheme = "attributes"  # groups define membership; "iid" is only the default
    elif groups is not None:
        raise ValueError(f"groups replace the scheme; got scheme {scheme!r} together with groups")
    elif scheme == "attributes":
        raise ValueError("scheme 'attributes' needs groups (a list of attribute names per client)")
    _check_arguments(dataset, num_clients, scheme, seed, alpha, eval_fraction, overlap)
    rng = np.random.default_rng(seed)
    labels = dataset.labels
    if scheme == "iid":
        members = _iid(len(dataset), num_clients, rng)
    elif scheme == "classes":
        members = _by_classes(labels, num_clients, rng)
    elif scheme == "dirichlet":
        members = _dirichlet(labels, num_clients, alpha, rng)
    else:
        if len(groups) != num_clients:
            raise ValueError(
                f"groups has {len(groups)} entries, expected num_clients={num_clients}"
            )
        members = _by_groups(_group_membership(dataset, groups), overlap, rng)
    shares = []
    for client, indices in enumerate(members):
        if len(indices) == 0:
            raise ValueError(f"client {client} gets no images under scheme {scheme!r}")
        train, evaluation = _train_eval_indices(indices, eval_fraction, seed, client)
        classes = tuple(int(label) for label in np.unique(labels[indices]))
        shares.append(ClientShare(client, train, evaluation, classes))
    return shares


def partition_fingerprint(shares: Sequence[ClientShare]) -> str:
    """Hex sha256 of every client's id, train and eval indices: same partition, same hash."""
    payload = [[s.client_id, list(s.train_indices), list(s.eval_indices)] for s in shares]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def shares_to_json(shares: Sequence[ClientShare]) -> str:
    """Serialise shares (with their fingerprint, checked on load) as a JSON string."""
    clients = [
        {
            "client_id": s.client_id,
            "classes": list(s.classes),
            "train_indices": list(s.train_indices),
            "eval_indices": list(s.eval_indices),
        }
        for s in shares
    ]
    document = {"format": JSON_FORMAT, "fingerprint": partition_fingerprint(shares)}
    return json.dumps({**document, "clients": clients})


def shares_from_json(text: str) -> list[ClientShare]:
    """Parse `shares_to_json` output; raise ValueError if a field is missing or it was altered."""
    document = json.loads(text)
    if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
        raise ValueError(f"not a latentfuse partition (expected format {JSON_FORMAT})")
    try:
        shares = [
            ClientShare(
                int(c["client_id"]),
                tuple(int(i) for i in c["train_indices"]),
                tuple(int(i) for i in c["eval_indices"]),
                tuple(int(label) for label in c["classes"]),
            )
            for c in document["clients"]
        ]
    except KeyError as error:
        raise ValueError(f"partition JSON lacks the field {error.args[0]!r}") from None
    if partition_fingerprint(shares) != document.get("fingerprint"):
        raise ValueError("partition JSON indices do not match its fingerprint: edited or corrupt")
    return shares


def save_shares(shares: Sequence[ClientShare], path: str | os.PathLike) -> Path:
    """Write shares as JSON atomically (temporary file, then rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(shares_to_json(shares))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_shares(path: str | os.PathLike) -> list[ClientShare]:
    """Read shares written by `save_shares`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"partition file not found: {path}")
    return shares_from_json(path.read_text())
