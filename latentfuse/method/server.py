"""The server: holds releases and draws batches for the shared high-noise denoiser."""

from __future__ import annotations

import logging

import torch

from latentfuse.method.split import DiffusionSplit, loss_weights, sample_server_timesteps
from latentfuse.method.transport import ReleaseBatch

logger = logging.getLogger(__name__)


class ReleaseStore:
    """The latest release of every (client, image), packed into rows: memory grows with the
    releases held, never with the largest image id. A repeated key replaces, never duplicates.

    `flat()` gives the held releases in one canonical order, (client, image id), so two stores
    holding the same releases draw the same batches whatever order they arrived in.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[int, int], int] = {}
        self._keys: list[tuple[int, int]] = []  # row -> (client, image)
        self._latents = torch.zeros(0)
        self._labels = torch.zeros(0, dtype=torch.long)
        self._handoff: dict[int, int] = {}
        self._flat: dict[str, torch.Tensor] | None = None
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}

    def _grow(self, needed: int, shape: tuple[int, ...]) -> None:
        """Room for `needed` rows (capacity doubles, so appends cost O(1) amortised)."""
        if self._latents.ndim == 1:
            self._latents = torch.zeros((0, *shape))
        elif tuple(self._latents.shape[1:]) != shape:
            raise ValueError(
                f"release latents must be (n, {', '.join(map(str, self._latents.shape[1:]))}), "
                f"got (n, {', '.join(map(str, shape))})"
            )
        capacity = len(self._latents)
        if needed <= capacity:
            return
        size = max(needed, 2 * capacity, 64)
        latents = torch.zeros((size, *shape))
        labels = _unlabelled((size, *self._labels.shape[1:]), self._labels.dtype)
        latents[:capacity], labels[:capacity] = self._latents, self._labels
        self._latents, self._labels = latents, labels

    def add(self, batch: ReleaseBatch) -> None:
        """Store a batch's releases (replacing earlier copies of the same images)."""
        rows = []
        for image_id in batch.image_ids:
            key = (batch.client_id, int(image_id))
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = len(self._keys)
                self._keys.append(key)
            rows.append(row)
        if batch.labels is not None:
            self._label_layout(batch.labels)
        self._grow(len(self._keys), tuple(batch.latents.shape[1:]))
        index = torch.tensor(rows, dtype=torch.long)
        self._latents[index] = batch.latents.float()
        if batch.labels is not None:
            self._labels[index] = batch.labels.to(self._labels.dtype)
        else:
            self._labels[index] = _unlabelled((), self._labels.dtype)
        self._handoff[batch.client_id] = batch.handoff_t
        self._flat, self._on_device = None, {}

    def _label_layout(self, labels: torch.Tensor) -> None:
        """Class labels are kept as long (-1: none); other conditioning (attribute vectors,
        token states) as float rows (NaN: none). The first labelled batch sets the layout."""
        dtype = torch.long if labels.ndim == 1 and not labels.is_floating_point() else torch.float
        shape = tuple(labels.shape[1:])
        if (self._labels.dtype, tuple(self._labels.shape[1:])) == (dtype, shape):
            return
        if bool((self._labels != _unlabelled((), self._labels.dtype)).any()):
            raise ValueError(
                f"release labels of shape (n, {shape}) and {dtype} do not match the labels "
                f"already held ({tuple(self._labels.shape[1:])}, {self._labels.dtype})"
            )
        self._labels = _unlabelled((len(self._labels), *shape), dtype)

    def counts(self) -> dict[int, int]:
        """Releases held per client."""
        out: dict[int, int] = {}
        for client_id, _ in self._keys:
            out[client_id] = out.get(client_id, 0) + 1
        return dict(sorted(out.items()))

    def __len__(self) -> int:
        return len(self._keys)

    def flat(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """All held releases as one set of tensors (latents, labels, client ids, image ids,
        cuts) in (client, image) order; on `device` (kept there until the store changes)."""
        if self._flat is None:
            order = sorted(range(len(self._keys)), key=self._keys.__getitem__)
            index = torch.tensor(order, dtype=torch.long)
            keys = torch.tensor(self._keys, dtype=torch.long).reshape(-1, 2)[index]
            cuts = torch.tensor([self._handoff[c] for c in keys[:, 0].tolist()], dtype=torch.long)
            self._flat = {
                "latents": self._latents[index],
                "labels": self._labels[index],
                "client_ids": keys[:, 0].contiguous(),
                "image_ids": keys[:, 1].contiguous(),
                "handoff_t": cuts,
            }
        if device is None or torch.device(device).type == "cpu":
            return self._flat
        name = str(device)
        if name not in self._on_device:
            self._on_device[name] = {k: v.to(device) for k, v in self._flat.items()}
        return self._on_device[name]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The store as named tensors (for a checkpoint)."""
        flat = self.flat()
        cuts = torch.tensor(sorted(self._handoff.items()), dtype=torch.long).reshape(-1, 2)
        return {**{k: v.contiguous() for k, v in flat.items() if k != "handoff_t"}, "cuts": cuts}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors`."""
        self.__init__()
        self._handoff = {int(c): int(t) for c, t in tensors["cuts"].tolist()}
        self._keys = list(
            zip(tensors["client_ids"].tolist(), tensors["image_ids"].tolist(), strict=True)
        )
        self._rows = {key: row for row, key in enumerate(self._keys)}
        self._latents = tensors["latents"].float().clone()
        labels = tensors["labels"]
        self._labels = (labels.long() if labels.ndim == 1 else labels.float()).clone()


def _unlabelled(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rows that carry no conditioning: -1 for class labels, NaN for float rows."""
    return torch.full(shape, -1 if dtype == torch.long else float("nan"), dtype=dtype)


BALANCES = ("releases", "clients")


class Server:
    """The server's side of training: releases in, batches for the exact objective out."""

    def __init__(
        self,
        splits: dict[int, DiffusionSplit],
        objective: str = "exact",
        weighting: str = "none",
        label_mode: str = "class",
        seed: int = 0,
        balance: str = "releases",
        timestep_density: str = "uniform",
    ):
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        self.splits, self.objective, self.weighting = splits, objective, weighting
        self.label_mode, self.balance = label_mode, balance
        self.timestep_density = timestep_density
        self.store = ReleaseStore()
        self.generator = torch.Generator().manual_seed(seed * 15_485_863 + 17)

    def receive(self, batch: ReleaseBatch) -> None:
        """Accept one release batch from a client."""
        split = self.splits.get(batch.client_id)
        if split is None:
            raise ValueError(f"unknown client id {batch.client_id}")
        if batch.handoff_t != split.handoff_t:
            raise ValueError(
                f"client {batch.client_id} released for hand-off t_cut={batch.handoff_t}, "
                f"expected {split.handoff_t}"
            )
        self.store.add(batch)

    def draw_batch(
        self,
        batch_size: int,
        label_dropout: float,
        null_label: int | torch.Tensor,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """A batch of (z_s, s, labels, target, weight, client ids) drawn over held releases, s by
        `timestep_density`, in float32 on `device` (the random numbers come from the server's
        CPU generator, so every process and device draws the same batch)."""
        if len(self.store) == 0:
            raise RuntimeError("the server holds no releases yet")
        flat = self.store.flat()
        g = self.generator
        index = self._draw_rows(flat["client_ids"], batch_size)
        client_ids, handoff = flat["client_ids"][index], flat["handoff_t"][index]
        any_split = next(iter(self.splits.values()))
        T = any_split.num_train_timesteps
        s = sample_server_timesteps(handoff, T, g, self.timestep_density)
        eps_s = torch.randn((batch_size, *flat["latents"].shape[1:]), generator=g)
        device = torch.device(device or "cpu")
        z_r = self.store.flat(device)["latents"][index.to(device)]
        eps_s, s_cpu, s = eps_s.to(device), s, s.to(device)
        z_s = torch.empty_like(z_r)
        target = torch.empty_like(z_r)
        lam = torch.empty(batch_size, device=device)
        for cid in client_ids.unique().tolist():  # each client's own cut sets its a and lam
            rows = (client_ids == cid).to(device)
            z_s[rows], target[rows], lam[rows] = self.splits[cid].server_inputs(
                z_r[rows], s[rows], eps_s[rows], self.objective
            )
        labels = self._labels(flat["labels"][index], client_ids)
        drop = torch.rand(batch_size, generator=g) < label_dropout
        if labels is not None:
            labels[drop] = null_label
            labels = labels.to(device)
        weight = loss_weights(self.common_lam(s_cpu, lam.cpu(), client_ids), self.weighting)
        return {
            "sample": z_s,
            "timestep": s,
            "class_labels": labels,
            "target": target,
            "weight": weight.to(device),
            "groups": client_ids.to(device),  # whose release each row is (per-client clipping)
        }

    def _draw_rows(self, client_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Row indices into the flat store: uniform over releases (`releases`: a client weighs
        by its share of the data, as in central training), or a client uniformly first, then
        one of its releases (`clients`: one client, however much it uploads, draws 1/k of a
        batch in expectation among k clients)."""
        g = self.generator
        if self.balance == "releases":
            return torch.randint(len(client_ids), (batch_size,), generator=g)
        present, counts = torch.unique_consecutive(client_ids, return_counts=True)  # sorted
        starts = torch.cumsum(counts, 0) - counts
        pick = torch.randint(len(present), (batch_size,), generator=g)
        within = (torch.rand(batch_size, generator=g, dtype=torch.float64) * counts[pick]).long()
        return starts[pick] + torch.minimum(within, counts[pick] - 1)

    def common_lam(
        self, s: torch.Tensor, lam: torch.Tensor, client_ids: torch.Tensor
    ) -> torch.Tensor:
        """The lam that sets each row's weight: at timestep s, the largest lam_s of the clients
        whose server range holds s. A weight w(lam_c(s)) that differed between clients at one
        s would reweight the clients' data in the server's minimiser (at s it fits the mixture
        of the clients' posteriors weighted by w_c(s) times their share of releases); one
        weight per timestep leaves the mixture as the releases give it. With one cut for every
        client this is each row's own lam (the weighting unchanged). Under `original` lam is 1."""
        cuts = {cid: split for cid, split in self.splits.items() if not split.is_independent}
        if self.objective != "exact" or len({sp.release_cut for sp in cuts.values()}) <= 1:
            return lam
        common = lam.clone()
        abar = next(iter(cuts.values())).alphas_cumprod.to(s.device)[s]
        for split in cuts.values():
            present = s >= split.handoff_t
            lam_c = ((1 - abar) / (1 - abar / split.abar_release)).sqrt().to(lam.dtype)
            common = torch.where(present, torch.maximum(common, lam_c), common)
        return common

    def _labels(self, class_labels: torch.Tensor, client_ids: torch.Tensor) -> torch.Tensor | None:
        if self.label_mode == "class":
            missing = class_labels < 0 if class_labels.dtype == torch.long else class_labels.isnan()
            if torch.any(missing):
                raise RuntimeError("label_mode 'class' but a client released no labels")
            return class_labels.clone()
        if self.label_mode == "client":
            return client_ids.clone()
        return None
