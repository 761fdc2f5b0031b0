"""A client: its own latents, its low-noise denoiser's batches, and its releases."""

from __future__ import annotations

import torch

from latentfuse.method.privacy import clip_latent_norm
from latentfuse.method.release_key import check_release_key, release_noise
from latentfuse.method.split import DiffusionSplit, sample_client_timesteps
from latentfuse.method.transport import ReleaseBatch


class EpochSampler:
    """Endless shuffled passes over n items; its state is (epoch, position), so it resumes."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("a client needs at least one training image")
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def take(self, count: int) -> torch.Tensor:
        """The next `count` indices, crossing epoch boundaries as needed."""
        out = []
        while count > 0:
            chunk = self._order[self.position : self.position + count]
            out.append(chunk)
            count -= len(chunk)
            self.position += len(chunk)
            if self.position == self.n:
                self.set_state(self.epoch + 1, 0)
        return torch.cat(out)

    def set_state(self, epoch: int, position: int) -> None:
        """Jump to (epoch, position)."""
        if epoch != self.epoch or not hasattr(self, "_order"):
            self._order = self._permutation(epoch)
        self.epoch, self.position = epoch, position


class Client:
    """One client's side of training. `z0`, `eps_c` and the release key never leave it.

    `seed` (public: it is in the run config) orders the client's own batches and draws its
    local training noise; the release noise comes only from `release_key` (release_key.py).
    """

    def __init__(
        self,
        client_id: int,
        latents: torch.Tensor,
        labels: torch.Tensor,
        split: DiffusionSplit,
        release_policy: str = "once",
        share_labels: bool = True,
        seed: int = 0,
        *,
        release_key: bytes,
        clip_norm: float = 0.0,
        max_releases: int = 0,
        train_cut: int | None = None,
    ):
        if release_policy not in ("once", "fresh"):
            raise ValueError(f"release_policy must be 'once' or 'fresh', got {release_policy!r}")
        if clip_norm < 0 or max_releases < 0:
            raise ValueError(
                f"clip_norm and max_releases must be >= 0, got {clip_norm}, {max_releases}"
            )
        self.client_id, self.split, self.release_policy = client_id, split, release_policy
        # the client's own timesteps are t < train_cut: the hand-off, or above it when sampling
        # starts the client higher (split.client_train_cut)
        self.train_cut = split.handoff_t if train_cut is None else train_cut
        handoff, T = split.handoff_t, split.num_train_timesteps
        if handoff and not handoff <= self.train_cut <= T:
            raise ValueError(f"train_cut must lie in [handoff_t={handoff}, {T}], got {train_cut}")
        # (n, c, h, w); the conditioning of each image: class labels (n,), or an attribute
        # vector / prompt token states per image (latentfuse/conditioning.py)
        self._z0, self.labels = latents, labels
        self.share_labels, self.seed = share_labels, seed
        self._release_key = check_release_key(release_key)
        self.clip_norm, self.max_releases = clip_norm, max_releases  # 0: no clip, no cap
        self.sampler = EpochSampler(len(latents), seed * 7919 + client_id)
        self.generator = torch.Generator().manual_seed(seed * 104_729 + client_id)
        self._released_epoch = -1

    @property
    def num_images(self) -> int:
        """Number of training images."""
        return len(self._z0)

    @property
    def z0(self) -> torch.Tensor:
        """The clean latents (n, c, h, w): for simulation and evaluation; never sent."""
        return self._z0

    @property
    def trains_locally(self) -> bool:
        """Whether the client owns any timestep (t_cut > 0)."""
        return self.split.handoff_t > 0

    def release_noise(self, epoch: int) -> torch.Tensor:
        """eps_c of every image under the key: per image (once) or per image and epoch (fresh)."""
        epoch = 0 if self.release_policy == "once" else epoch
        shape = tuple(self._z0.shape[1:])
        ids, key = range(self.num_images), self._release_key
        noise = release_noise(
            key, self.client_id, ids, epoch, shape, self.split.handoff_t, self.clip_norm
        )
        return noise.float()

    def make_release(self, epoch: int) -> ReleaseBatch:
        """The release z_r of every image for `epoch` (identical across epochs under `once`);
        each latent clipped to norm `clip_norm` first when the formal-privacy mode is on."""
        z0 = clip_latent_norm(self._z0, self.clip_norm) if self.clip_norm else self._z0
        z_r = self.split.release(z0, self.release_noise(epoch).to(z0.dtype))
        return ReleaseBatch(
            client_id=self.client_id,
            image_ids=tuple(range(self.num_images)),
            latents=z_r.float(),
            labels=self.labels.clone() if self.share_labels else None,
            handoff_t=self.split.handoff_t,
            epoch=epoch,
        )

    def due_releases(self) -> list[ReleaseBatch]:
        """Releases not yet sent: all images once (`once`), or anew each epoch (`fresh`, at
        most `max_releases` times when that is set)."""
        if self.split.is_independent:
            return []
        epoch = self.sampler.epoch
        if self._released_epoch >= 0 and (
            self.release_policy == "once" or self._released_epoch == epoch
        ):
            return []
        if self.max_releases and self._released_epoch + 1 >= self.max_releases:
            return []  # fresh releases happen at epochs 0, 1, ...: that many already went
        self._released_epoch = epoch
        return [self.make_release(epoch)]

    def draw_batch(
        self, batch_size: int, label_dropout: float, null_label: int | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """A batch for the ordinary eps-prediction loss on t ~ U{0..train_cut-1}."""
        index = self.sampler.take(batch_size)
        z0, labels = self._z0[index], self.labels[index].clone()
        t = sample_client_timesteps(batch_size, self.train_cut, self.generator)
        eps = torch.randn(z0.shape, generator=self.generator)
        drop = torch.rand(batch_size, generator=self.generator) < label_dropout
        labels[drop] = null_label
        abar = self.split.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = (abar.sqrt() * z0.double() + (1 - abar).sqrt() * eps.double()).float()
        return {
            "sample": z_t,
            "timestep": t,
            "class_labels": labels,
            "target": eps,
            "weight": torch.ones(batch_size),
        }

    def state(self) -> dict:
        """What resuming needs: sampler position, generator, release bookkeeping."""
        return {
            "epoch": self.sampler.epoch,
            "position": self.sampler.position,
            "released_epoch": self._released_epoch,
        }

    def generator_state(self) -> torch.Tensor:
        """The client's torch generator state."""
        return self.generator.get_state()

    def load_state(self, state: dict, generator_state: torch.Tensor) -> None:
        """Inverse of `state` and `generator_state`."""
        self.sampler.set_state(state["epoch"], state["position"])
        self._released_epoch = state["released_epoch"]
        self.generator.set_state(generator_state)
