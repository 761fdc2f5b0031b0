"""The server: holds releases and draws batches for the shared high-noise denoiser."""

from __future__ import annotations

import logging

import torch

from .split import DiffusionSplit, loss_weights, sample_server_timesteps
from .transport import ReleaseBatch

logger = logging.getLogger(__name__)


class ReleaseStore:
    """The latest release of every (client, image); a repeated key replaces, never duplicates."""

    def __init__(self) -> None:
        self._by_client: dict[int, dict[str, torch.Tensor | int]] = {}
        self._flat: dict[str, torch.Tensor] | None = None

    def add(self, batch: ReleaseBatch) -> None:
        """Store a batch's releases (replacing earlier copies of the same images)."""
        entry = self._by_client.get(batch.client_id)
        ids = torch.tensor(batch.image_ids, dtype=torch.long)
        labels = batch.labels if batch.labels is not None else torch.full_like(ids, -1)
        if entry is None:
            size = int(ids.max()) + 1
            entry = {
                "latents": torch.zeros((size, *batch.latents.shape[1:])),
                "labels": torch.full((size,), -1, dtype=torch.long),
                "held": torch.zeros(size, dtype=torch.bool),
                "t_cut": batch.t_cut,
            }
            self._by_client[batch.client_id] = entry
        if int(ids.max()) >= len(entry["held"]):
            grow = int(ids.max()) + 1 - len(entry["held"])
            entry["latents"] = torch.cat(
                [entry["latents"], torch.zeros((grow, *batch.latents.shape[1:]))]
            )
            entry["labels"] = torch.cat([entry["labels"], torch.full((grow,), -1)])
            entry["held"] = torch.cat([entry["held"], torch.zeros(grow, dtype=torch.bool)])
        entry["latents"][ids] = batch.latents.float()
        entry["labels"][ids] = labels.long()
        entry["held"][ids] = True
        entry["t_cut"] = batch.t_cut
        self._flat = None

    def counts(self) -> dict[int, int]:
        """Releases held per client."""
        return {cid: int(e["held"].sum()) for cid, e in sorted(self._by_client.items())}

    def __len__(self) -> int:
        return sum(self.counts().values())

    def flat(self) -> dict[str, torch.Tensor]:
        """All held releases as one set of tensors: latents, labels, client ids, cuts."""
        if self._flat is None:
            parts = {"latents": [], "labels": [], "client_ids": [], "t_cut": []}
            for cid, e in sorted(self._by_client.items()):
                held = e["held"]
                parts["latents"].append(e["latents"][held])
                parts["labels"].append(e["labels"][held])
                parts["client_ids"].append(torch.full((int(held.sum()),), cid))
                parts["t_cut"].append(torch.full((int(held.sum()),), e["t_cut"]))
            self._flat = {k: torch.cat(v) for k, v in parts.items()}
        return self._flat

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The store as named tensors (for a checkpoint)."""
        out = {}
        for cid, e in self._by_client.items():
            for key in ("latents", "labels", "held"):
                out[f"{cid}.{key}"] = e[key]
            out[f"{cid}.t_cut"] = torch.tensor(e["t_cut"])
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors`."""
        self._by_client = {}
        for name, value in tensors.items():
            cid, key = name.split(".", 1)
            entry = self._by_client.setdefault(int(cid), {})
            entry[key] = int(value) if key == "t_cut" else value
        self._flat = None


class Server:
    """The server's side of training: releases in, batches for the exact objective out."""

    def __init__(
        self,
        splits: dict[int, DiffusionSplit],
        objective: str = "exact",
        weighting: str = "none",
        label_mode: str = "class",
        seed: int = 0,
    ):
        self.splits, self.objective, self.weighting = splits, objective, weighting
        self.label_mode = label_mode
        self.store = ReleaseStore()
        self.generator = torch.Generator().manual_seed(seed * 15_485_863 + 17)

    def receive(self, batch: ReleaseBatch) -> None:
        """Accept one release batch from a client."""
        split = self.splits.get(batch.client_id)
        if split is None:
            raise ValueError(f"unknown client id {batch.client_id}")
        if batch.t_cut != split.t_cut:
            raise ValueError(
                f"client {batch.client_id} released at t_cut={batch.t_cut}, expected {split.t_cut}"
            )
        self.store.add(batch)

    def draw_batch(
        self, batch_size: int, label_dropout: float, null_label: int
    ) -> dict[str, torch.Tensor]:
        """A batch of (z_s, s, labels, target, weight) drawn uniformly over held releases."""
        if len(self.store) == 0:  # checked first: flat() of an empty store cannot concatenate
            raise RuntimeError("the server holds no releases yet")
        flat = self.store.flat()
        g = self.generator
        index = torch.randint(len(flat["latents"]), (batch_size,), generator=g)
        z_r, client_ids, t_cut = (
            flat["latents"][index],
            flat["client_ids"][index],
            flat["t_cut"][index],
        )
        any_split = next(iter(self.splits.values()))
        s = sample_server_timesteps(t_cut, any_split.num_train_timesteps, g)
        eps_s = torch.randn(z_r.shape, generator=g)
        z_s = torch.empty_like(z_r)
        target = torch.empty_like(z_r)
        lam = torch.empty(batch_size)
        for cid in client_ids.unique().tolist():  # each client's own cut sets its a and lam
            rows = client_ids == cid
            z_s[rows], target[rows], lam[rows] = self.splits[cid].server_inputs(
                z_r[rows], s[rows], eps_s[rows], self.objective
            )
        labels = self._labels(flat["labels"][index], client_ids)
        drop = torch.rand(batch_size, generator=g) < label_dropout
        if labels is not None:
            labels[drop] = null_label
        return {
            "sample": z_s,
            "timestep": s,
            "class_labels": labels,
            "target": target,
            "weight": loss_weights(self.common_lam(s, lam, client_ids), self.weighting),
        }

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
            present = s >= split.t_cut
            lam_c = ((1 - abar) / (1 - abar / split.abar_release)).sqrt().to(lam.dtype)
            common = torch.where(present, torch.maximum(common, lam_c), common)
        return common

    def _labels(self, class_labels: torch.Tensor, client_ids: torch.Tensor) -> torch.Tensor | None:
        if self.label_mode == "class":
            if torch.any(class_labels < 0):
                raise RuntimeError("label_mode 'class' but a client released no labels")
            return class_labels.clone()
        if self.label_mode == "client":
            return client_ids.clone()
        return None
