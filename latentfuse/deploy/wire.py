"""The HTTP wire format: the transport's messages as safetensors bytes with a versioned header.

A release (`ReleaseBatch`) and a hand-off (`HandOff`) travel as one safetensors file each; their
scalar fields ride as JSON under the `latentfuse` key of the safetensors header metadata. A
sampling request is a small JSON envelope. Every body is checked (size, header, names, dtypes,
shapes, finiteness) before a tensor is built; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from latentfuse.deploy.config import SCHEDULER_NAMES
from latentfuse.method.transport import SCHEMA_VERSION, ReleaseBatch
from latentfuse.pipelines.handoff import HandOff

WIRE_VERSION = 1
META_KEY = "latentfuse"
SAFETENSORS_TYPE = "application/vnd.latentfuse.safetensors"
JSON_TYPE = "application/json"
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 1 << 20
MAX_SEED = 2**63 - 1
MAX_INFERENCE_STEPS = 1000
GENERATOR_STATE_BYTES = torch.Generator().get_state().numel()


class WireError(ValueError):
    """A request or response that cannot be accepted: an HTTP status, a code and a message."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request", **extra: Any):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra

    def payload(self) -> dict[str, Any]:
        """The JSON error body: {"error": code, "detail": message, ...}."""
        return {"error": self.code, "detail": str(self), **self.extra}


@dataclass(frozen=True)
class TensorSpec:
    """What one named tensor of a message may be: dtypes and number of dimensions."""

    dtypes: tuple[str, ...]
    ndim: int | tuple[int, ...]  # the number of dimensions, or the numbers allowed
    required: bool = True

    def allows_rank(self, rank: int) -> bool:
        """Whether a tensor of `rank` dimensions may stand under this name."""
        return rank in (self.ndim if isinstance(self.ndim, tuple) else (self.ndim,))


def _is_int(value: Any) -> bool:
    return type(value) is int


def _show(value: Any, limit: int = 80) -> str:
    """A bounded repr for an error message (a 5,000-digit int has no repr in Python 3.11)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


JSON_ERRORS = (UnicodeDecodeError, ValueError, RecursionError)  # JSONDecodeError is a ValueError
MAX_GUIDANCE = 100.0
MAX_PROMPT_CHARS = 1000


def read_header(body: bytes, kind: str, max_bytes: int) -> tuple[dict[str, dict], dict[str, Any]]:
    """The tensor table and the latentfuse metadata of a safetensors body, before loading it."""
    if len(body) > max_bytes:
        raise WireError(
            f"body of {len(body)} bytes exceeds the limit of {max_bytes}", 413, "too_large"
        )
    if len(body) < 8:
        raise WireError(f"{kind} body is not safetensors: {len(body)} bytes, no header length")
    size = int.from_bytes(body[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(body) - 8):
        raise WireError(f"{kind} body is not safetensors: header length {size} is out of range")
    try:
        header = json.loads(body[8 : 8 + size])
        if not isinstance(header, dict):
            raise TypeError(f"the header is a {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not isinstance(metadata.get(META_KEY, ""), str):
            raise TypeError("__metadata__ must map names to strings")
        meta = json.loads(metadata.get(META_KEY, "null"))
    except (*JSON_ERRORS, TypeError) as error:
        raise WireError(
            f"{kind} body has an unreadable safetensors header: {_show(str(error), 200)}"
        ) from None
    if not isinstance(meta, dict):
        raise WireError(f"{kind} body lacks the '{META_KEY}' JSON metadata in its header")
    if not (_is_int(meta.get("wire_version")) and meta["wire_version"] == WIRE_VERSION):
        raise WireError(
            f"wire_version must be {WIRE_VERSION}, got {_show(meta.get('wire_version'))}",
            code="unsupported_version",
        )
    if meta.get("kind") != kind:
        raise WireError(f"expected a {kind!r} message, got kind {_show(meta.get('kind'))}")
    return header, meta


def load_tensors(
    body: bytes, header: dict[str, dict], specs: dict[str, TensorSpec], kind: str
) -> dict[str, torch.Tensor]:
    """The tensors of a body whose header matches `specs` by name, dtype and rank."""
    names = set(header)
    missing = sorted(n for n, s in specs.items() if s.required and n not in names)
    unknown = sorted(names - set(specs))
    if missing or unknown:
        raise WireError(f"{kind} tensors: missing {missing}, unexpected {unknown}")
    for name, entry in header.items():
        spec = specs[name]
        if not isinstance(entry, dict) or entry.get("dtype") not in spec.dtypes:
            got = entry.get("dtype") if isinstance(entry, dict) else entry
            raise WireError(
                f"{kind} tensor {name!r} must have dtype in {spec.dtypes}, got {_show(got)}"
            )
        shape = entry.get("shape")
        if not (
            isinstance(shape, list)
            and spec.allows_rank(len(shape))
            and all(_is_int(n) and 0 <= n < 2**31 for n in shape)
        ):
            raise WireError(
                f"{kind} tensor {name!r} must have {spec.ndim} dimensions (sizes >= 0), "
                f"got shape {_show(shape)}"
            )
    try:
        return load(body)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as error:
        raise WireError(f"{kind} body is not valid safetensors: {_show(str(error), 200)}") from None


def _encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"wire_version": WIRE_VERSION, **meta}
    return save(tensors, metadata={META_KEY: json.dumps(header)})


def _floats(latents: torch.Tensor, fp16: bool, what: str) -> torch.Tensor:
    out = latents.detach().cpu().half() if fp16 else latents.detach().cpu().float()
    if not torch.isfinite(out).all():
        raise ValueError(f"{what} overflow float16 (|x| > 65504): send them as float32")
    return out


# ---- releases ---------------------------------------------------------------------------------
# `labels` holds each image's conditioning, typed by the metadata's "conditioning": class labels
# (int64, (n,)), attribute vectors (float, (n, A)) or prompt token states (float, (n, L, D))
CONDITIONING_RANKS = {"class": 1, "attributes": 2, "text": 3}
RELEASE_SPECS = {
    "latents": TensorSpec(FLOAT_DTYPES, 4),
    "image_ids": TensorSpec(("I64",), 1),
    "labels": TensorSpec(("I64", *FLOAT_DTYPES), (1, 2, 3), required=False),
}


def encode_release(batch: ReleaseBatch, fp16: bool = False) -> bytes:
    """A ReleaseBatch as safetensors bytes (latents as float16 when `fp16`)."""
    tensors = {
        "latents": _floats(batch.latents, fp16, "release latents"),
        "image_ids": torch.tensor(batch.image_ids, dtype=torch.long),
    }
    meta = {
        "kind": "release",
        "schema_version": batch.schema_version,
        "client_id": batch.client_id,
        "t_cut": batch.handoff_t,
        "epoch": batch.epoch,
    }
    if batch.labels is not None:
        rank = batch.labels.ndim
        floats = batch.labels.detach().cpu().float()
        tensors["labels"] = batch.labels.long() if rank == 1 else floats
        meta["conditioning"] = next(k for k, r in CONDITIONING_RANKS.items() if r == rank)
    return _encode(tensors, meta)


def decode_release(body: bytes, max_bytes: int, max_images: int) -> ReleaseBatch:
    """Inverse of `encode_release`; WireError (4xx) for anything malformed."""
    header, meta = read_header(body, "release", max_bytes)
    if not (_is_int(meta.get("schema_version")) and meta["schema_version"] == SCHEMA_VERSION):
        raise WireError(
            f"release schema_version must be {SCHEMA_VERSION}, "
            f"got {_show(meta.get('schema_version'))}",
            code="unsupported_version",
        )
    for field in ("client_id", "t_cut", "epoch"):  # stored as SQLite integers: < 2^63
        if not _is_int(meta.get(field)) or not 0 <= meta[field] < 2**31:
            raise WireError(
                f"release field {field!r} must be an int in [0, 2^31), got {_show(meta.get(field))}"
            )
    entry = header.get("image_ids")
    count = entry.get("shape", [0]) if isinstance(entry, dict) else [0]
    if isinstance(count, list) and count and _is_int(count[0]) and count[0] > max_images:
        raise WireError(
            f"a release may carry at most {max_images} images, got {count[0]}", 413, "too_large"
        )
    tensors = load_tensors(body, header, RELEASE_SPECS, "release")
    labels = tensors.get("labels")
    if labels is not None:
        kind = meta.get("conditioning", "class")  # releases from before the field: class labels
        rank = CONDITIONING_RANKS.get(kind) if isinstance(kind, str) else None
        if rank is None or labels.ndim != rank or labels.is_floating_point() != (rank > 1):
            raise WireError(
                f"release conditioning {_show(kind)} does not fit tensor 'labels' "
                f"({labels.dtype}, {labels.ndim} dimensions): expected int64 (n,) for 'class', "
                "float (n, A) for 'attributes', float (n, L, D) for 'text'"
            )
        labels = labels if rank == 1 else labels.float()
    try:
        return ReleaseBatch(
            client_id=meta["client_id"],
            image_ids=tuple(tensors["image_ids"].tolist()),
            latents=tensors["latents"].float(),
            labels=labels,
            handoff_t=meta["t_cut"],
            epoch=meta["epoch"],
        )
    except ValueError as error:
        raise WireError(f"bad release: {error}") from None


# ---- sampling requests and hand-offs ---------------------------------------------------------
@dataclass(frozen=True)
class SampleRequest:
    """A client asks the server for the high-noise half of one chain per seed."""

    client_id: int
    seeds: tuple[int, ...]  # one torch.Generator seed per image, as in the in-process pipeline
    class_labels: tuple[int, ...]  # one label per image (the client draws them from its classes)
    num_inference_steps: int
    guidance_scale: float = 1.0
    scheduler: str = "ddim"
    # the conditioning of a model not conditioned on class labels, one per image, sent only
    # when the server sees the conditioning (server_labels = "class"): 0/1 attribute rows in
    # the order of deploy.attribute_names, or prompts (the server encodes them)
    attributes: tuple[tuple[int, ...], ...] | None = None
    prompts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.client_id) or self.client_id < 0:
            raise ValueError(f"client_id must be an int >= 0, got {_show(self.client_id)}")
        if not self.seeds or not all(_is_int(s) and 0 <= s <= MAX_SEED for s in self.seeds):
            raise ValueError(
                f"seeds must be a non-empty list of ints in [0, 2^63), got {_show(self.seeds)}"
            )
        labels = self.class_labels
        if len(labels) != len(self.seeds) or not all(_is_int(y) and y >= 0 for y in labels):
            raise ValueError(
                f"class_labels must be {len(self.seeds)} ints >= 0 (one per seed), "
                f"got {_show(labels)}"
            )
        steps = self.num_inference_steps
        if not _is_int(steps) or not 1 <= steps <= MAX_INFERENCE_STEPS:
            raise ValueError(
                f"num_inference_steps must be in [1, {MAX_INFERENCE_STEPS}], got {_show(steps)}"
            )
        scale = self.guidance_scale
        if type(scale) not in (int, float) or not -MAX_GUIDANCE <= scale <= MAX_GUIDANCE:
            raise ValueError(
                f"guidance_scale must be a number in [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}], "
                f"got {_show(scale)}"
            )
        if not isinstance(self.scheduler, str) or self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(
                f"scheduler must be one of {SCHEDULER_NAMES}, got {_show(self.scheduler)}"
            )
        self._check_conditioning()

    def _check_conditioning(self) -> None:
        count = len(self.seeds)
        if self.attributes is not None and self.prompts is not None:
            raise ValueError("send attributes or prompts, not both")
        if self.attributes is not None:
            rows = self.attributes
            width = len(rows[0]) if rows and isinstance(rows[0], tuple | list) else -1
            good = len(rows) == count and width >= 1
            good = good and all(
                isinstance(r, tuple | list) and len(r) == width and all(v in (0, 1) for v in r)
                for r in rows
            )
            if not good or not all(_is_int(v) for r in rows for v in r):
                raise ValueError(
                    f"attributes must be {count} rows (one per seed) of equally many 0/1 ints, "
                    f"got {_show(rows)}"
                )
        if self.prompts is not None:
            prompts = self.prompts
            if len(prompts) != count or not all(
                isinstance(p, str) and len(p) <= MAX_PROMPT_CHARS for p in prompts
            ):
                raise ValueError(
                    f"prompts must be {count} strings (one per seed) of at most "
                    f"{MAX_PROMPT_CHARS} characters, got {_show(prompts)}"
                )


def encode_sample_request(request: SampleRequest) -> bytes:
    """A SampleRequest as a JSON envelope."""
    fields = {
        "client_id": request.client_id,
        "seeds": list(request.seeds),
        "class_labels": list(request.class_labels),
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": float(request.guidance_scale),
        "scheduler": request.scheduler,
    }
    if request.attributes is not None:
        fields["attributes"] = [list(row) for row in request.attributes]
    if request.prompts is not None:
        fields["prompts"] = list(request.prompts)
    return json.dumps({"wire_version": WIRE_VERSION, "kind": "sample", **fields}).encode()


def decode_sample_request(body: bytes, max_bytes: int) -> SampleRequest:
    """Inverse of `encode_sample_request`; WireError (4xx) for anything malformed."""
    if len(body) > max_bytes:
        raise WireError(
            f"body of {len(body)} bytes exceeds the limit of {max_bytes}", 413, "too_large"
        )
    try:
        values = json.loads(body)
    except JSON_ERRORS as error:
        raise WireError(f"sample request is not JSON: {_show(str(error), 200)}") from None
    version = values.pop("wire_version", None) if isinstance(values, dict) else None
    if not (_is_int(version) and version == WIRE_VERSION):
        raise WireError(f"sample request must be a JSON object with wire_version {WIRE_VERSION}")
    if values.pop("kind", None) != "sample":
        raise WireError("sample request must have kind 'sample'")
    expected = {"client_id", "seeds", "class_labels", "num_inference_steps"}
    allowed = expected | {"guidance_scale", "scheduler", "attributes", "prompts"}
    if not expected <= set(values) <= allowed:
        raise WireError(
            f"sample request fields: missing {sorted(expected - set(values))}, "
            f"unexpected {sorted(set(values) - allowed)}"
        )
    for name in ("seeds", "class_labels", "attributes", "prompts"):
        if name not in values:
            continue
        if not isinstance(values[name], list):
            raise WireError(f"sample request {name} must be a list, got {_show(values[name])}")
        values[name] = tuple(values[name])
    if "attributes" in values:
        values["attributes"] = tuple(
            tuple(row) if isinstance(row, list) else row for row in values["attributes"]
        )
    try:
        return SampleRequest(**values)
    except (ValueError, TypeError) as error:
        raise WireError(f"bad sample request: {_show(str(error), 300)}") from None


HANDOFF_SPECS = {
    "latents": TensorSpec(FLOAT_DTYPES, 4),
    "labels": TensorSpec(("I64",), 1),
    "timesteps": TensorSpec(("I64", "I32", "F32", "F64"), 1),
    "generator_states": TensorSpec(("U8",), 2, required=False),
}


def encode_handoff(
    handoff: HandOff, generator_states: list[torch.Tensor] | None = None, fp16: bool = False
) -> bytes:
    """A HandOff (plus the generators' states, so the client continues their streams) as bytes."""
    tensors, meta = handoff.to_tensors()
    tensors["latents"] = _floats(tensors["latents"], fp16, "hand-off latents")
    if generator_states is not None:
        tensors["generator_states"] = torch.stack([s.to(torch.uint8) for s in generator_states])
    return _encode(tensors, {"kind": "handoff", "handoff": meta})


def decode_handoff(body: bytes, max_bytes: int) -> tuple[HandOff, torch.Tensor | None]:
    """Inverse of `encode_handoff`: the HandOff and the (b, state) generator states or None."""
    header, meta = read_header(body, "handoff", max_bytes)
    specs = dict(HANDOFF_SPECS)
    for name in header:
        if name.startswith("solver.model_outputs."):
            specs[name] = TensorSpec(FLOAT_DTYPES, 4)
    tensors = load_tensors(body, header, specs, "handoff")
    states = tensors.pop("generator_states", None)
    try:
        handoff = HandOff.from_tensors(tensors, meta.get("handoff") or {})
    except (ValueError, KeyError, TypeError) as error:
        raise WireError(f"bad hand-off: {error}") from None
    if not torch.isfinite(handoff.latents).all():
        raise WireError("hand-off latents contain NaN or Inf")
    if states is not None and tuple(states.shape) != (len(handoff.labels), GENERATOR_STATE_BYTES):
        raise WireError(
            f"generator_states must have shape ({len(handoff.labels)}, {GENERATOR_STATE_BYTES}), "
            f"got {tuple(states.shape)}"
        )
    return handoff, states
