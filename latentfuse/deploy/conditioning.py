"""What a deployment's messages carry besides latents: each image's conditioning, typed.

A release carries one conditioning row per image when the server may learn it
(`server_labels = "class"`), of the run's `conditioning.kind`:

- "class": an int64 label in [0, num_classes) (`deploy.class_names`);
- "attributes": a float vector of +-1 in the order of `deploy.attribute_names`;
- "text": the float token states (max_length, width) of the image's prompt under the public text
  encoder `conditioning.text_encoder` (the prompt can be read back from them: it is disclosed).

A sampling request names the same conditioning by value: class labels, 0/1 attribute rows, or
prompts, which the server encodes with the same public encoder. Server and clients build their
denoisers from `spec`, so the HTTP and Flower paths train the denoisers the in-process run does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentfuse.conditioning import TextConditioner, null_condition, text_width
from latentfuse.config import RunConfig
from latentfuse.deploy.config import DeployConfig
from latentfuse.training.jobs import DenoiserSpec


@dataclass(frozen=True)
class WireConditioning:
    """The conditioning a deployment's releases and requests carry, and its shapes."""

    kind: str  # conditioning.kind: "class", "attributes" or "text"
    num_classes: int
    num_attributes: int = 0  # "attributes": the length of a vector
    token_shape: tuple[int, int] = (0, 0)  # "text": (max_length, the encoder's width)
    class_names: tuple[str, ...] = ()  # deploy.class_names (a pretrained base's rows match them)

    @classmethod
    def of(cls, config: RunConfig, deploy: DeployConfig) -> WireConditioning:
        """From a deployment's config; the text encoder's width is read from its config only."""
        from latentfuse.paths import resolve_path

        kind = config.conditioning.kind
        if kind == "attributes" and not deploy.attribute_names:
            raise ValueError(
                "config: conditioning.kind = 'attributes' needs deploy.attribute_names (the "
                "attribute order every client's vectors follow), got none"
            )
        token_shape = (0, 0)
        if kind == "text":
            width = text_width(resolve_path(config.conditioning.text_encoder))
            token_shape = (config.conditioning.max_length, width)
        attributes = len(deploy.attribute_names) if kind == "attributes" else 0
        return cls(kind, deploy.num_classes, attributes, token_shape, deploy.class_names)

    @property
    def spec(self) -> DenoiserSpec:
        """What the denoisers are built for (`training.jobs`)."""
        return DenoiserSpec(
            self.kind,
            self.num_classes,
            self.num_attributes,
            self.token_shape[1],
            class_names=self.class_names,
        )

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one image's conditioning."""
        return {"class": (), "attributes": (self.num_attributes,), "text": self.token_shape}[
            self.kind
        ]

    def check_rows(self, rows: torch.Tensor, count: int) -> None:
        """ValueError unless `rows` are `count` conditionings of this kind: class labels in
        range, +-1 attribute vectors of the vocabulary's length, finite token states."""
        expected = (count, *self.row_shape)
        if self.kind == "class":
            if rows.dtype != torch.long or tuple(rows.shape) != expected:
                raise ValueError(
                    f"conditioning.kind = 'class': expected {count} int64 class labels, got "
                    f"{rows.dtype} of shape {tuple(rows.shape)}"
                )
            if len(rows) and (rows.min() < 0 or rows.max() >= self.num_classes):
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}), got {sorted(set(rows.tolist()))}"
                )
            return
        if not rows.is_floating_point() or tuple(rows.shape) != expected:
            raise ValueError(
                f"conditioning.kind = {self.kind!r}: expected float rows of shape {expected}, "
                f"got {rows.dtype} of shape {tuple(rows.shape)}"
            )
        if not torch.isfinite(rows).all():
            raise ValueError("conditioning rows contain NaN or Inf")
        if self.kind == "attributes" and not torch.isin(rows, torch.tensor([-1.0, 1.0])).all():
            raise ValueError("attribute vectors must hold +-1 (absent/present) only")

    def null(self, text: TextConditioner | None = None) -> torch.Tensor:
        """The null conditioning of one image (label dropout, classifier-free guidance)."""
        return null_condition(
            self.kind, num_classes=self.num_classes, num_attributes=self.num_attributes, text=text
        )


def attribute_order(dataset_names: tuple[str, ...] | list[str], deploy: DeployConfig) -> list[int]:
    """The column of each of `deploy.attribute_names` in a data set's attribute table."""
    names = list(dataset_names)
    missing = [a for a in deploy.attribute_names if a not in names]
    if missing:
        raise ValueError(
            f"deploy.attribute_names {missing} are not attributes of this data set ({names})"
        )
    return [names.index(a) for a in deploy.attribute_names]
