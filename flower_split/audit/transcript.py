"""The cloud's view of a run, recorded for the leakage audit, and its files on disk.

:class:`CloudViewRecorder` collects, per (tenant, step), everything the cloud party receives
or decodes in the clear (DESIGN.md section 3: the head output ``f`` with its attention mask,
``dL/dh`` when the head trains, the logits ``z`` in ``he`` label protection) and, kept apart,
the ground truth the attacks are scored against (token ids and labels: the cloud never holds
them). The recorder knows nothing of transports: a tap on a cloud party
(:mod:`flower_split.audit.taps`) or a Flower ServerApp calls :meth:`CloudViewRecorder.record_f`
and friends, or :meth:`CloudViewRecorder.record_pack` with the split-plain messages of a call.

Files (``save``/``load``), all in one run directory:

* ``transcript.json``: ``{"format": "flower-split-transcript/1", "meta": {...}, "steps":
  [{"tenant", "step", "train"}, ...]}``; ``meta`` holds what the attacker knows anyway (model
  name and seed, ``num_classes``, ``max_length``, security, label protection);
* ``cloud_view.safetensors``: per step index ``i`` of ``steps``: ``i.f`` float32 [B, T, d],
  ``i.attention_mask`` int64 [B, T], ``i.grad_h`` float32 [B, T, d] (or [B, d] when opened
  per sequence) in units of ``dL/dh`` (a secure run's public gradient scale is divided out),
  ``i.z`` float32 [B, C];
* ``ground_truth.safetensors``: ``i.input_ids`` int64 [B, T] and ``i.labels`` int64 [B], for
  scoring only.

Every tensor is optional per step (an inference step has no ``grad_h``). Size: about
``8 B T d`` bytes per training step (``f`` and ``dL/dh``), 50 MB per epoch of 640 MiniLM rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

TRANSCRIPT_FORMAT = "flower-split-transcript/1"
TRANSCRIPT_FILE = "transcript.json"
CLOUD_VIEW_FILE = "cloud_view.safetensors"
GROUND_TRUTH_FILE = "ground_truth.safetensors"
VIEW_FIELDS = ("f", "attention_mask", "grad_h", "z")
TRUTH_FIELDS = ("input_ids", "labels")


class TranscriptError(ValueError):
    """A recorded transcript is missing, incomplete or not in the documented format."""


@dataclass
class StepView:
    """What the cloud received or decoded in one step (``None``: not seen in this step)."""

    tenant: str
    step: int
    train: bool
    f: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    grad_h: torch.Tensor | None = None
    z: torch.Tensor | None = None


@dataclass
class GroundTruth:
    """The tenant's private inputs of one step: what an attack tries to recover."""

    input_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class Transcript:
    """A loaded (or just recorded) transcript: metadata, the cloud's view, the ground truth."""

    meta: dict[str, Any]
    views: list[StepView]
    truth: list[GroundTruth]


@dataclass
class CloudViewRecorder:
    """Collects the cloud's view and the ground truth of a run, step by step (off unless created)."""

    meta: dict[str, Any] = field(default_factory=dict)
    _views: dict[tuple[str, int], StepView] = field(default_factory=dict)
    _truth: dict[tuple[str, int], GroundTruth] = field(default_factory=dict)

    def describe(self, config: Any, num_classes: int) -> None:
        """Note in ``meta`` what the attacker knows anyway: the public model and the run's public shape."""
        self.meta.update(model=config.model, seed=config.seed, max_length=config.max_length,
                         num_classes=num_classes, dataset=config.dataset, security=config.security,
                         label_protection=config.label_protection,  # as configured; only secure mode uses it
                         train_head=config.train_head, tail_input=config.tail_input,
                         input_noise=config.input_noise)  # the defense is public

    def _view(self, tenant: str, step: int) -> StepView:
        key = (tenant, int(step))
        if key not in self._views:
            self._views[key] = StepView(tenant, int(step), False)
        return self._views[key]

    def record_f(self, tenant: str, step: int, f: torch.Tensor, attention_mask: torch.Tensor,
                 train: bool) -> None:
        """The head output the cloud runs the body on, with its public attention mask."""
        view = self._view(tenant, step)
        view.f = _copy(f, torch.float32)
        view.attention_mask = _copy(attention_mask, torch.long)
        view.train = bool(train)

    def record_grad_h(self, tenant: str, step: int, grad_h: torch.Tensor) -> None:
        """``dL/dh`` as opened to the cloud ([B, T, d], or [B, d] per sequence)."""
        self._view(tenant, step).grad_h = _copy(grad_h, torch.float32)

    def record_z(self, tenant: str, step: int, z: torch.Tensor) -> None:
        """The logits opened to the cloud (``he`` label protection)."""
        self._view(tenant, step).z = _copy(z, torch.float32)

    def record_truth(self, tenant: str, step: int, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        """The step's token ids and labels (from the driver, never from the cloud): for scoring only."""
        self._truth[(tenant, int(step))] = GroundTruth(_copy(input_ids, torch.long), _copy(labels, torch.long))

    def record_pack(self, messages: Iterable[object]) -> None:
        """Record the split-plain messages the cloud answered in one call (``HeadOutput``,
        ``BodyGrad``; others are ignored): what a Flower ServerApp would call per stage."""
        from flower_split.model.adapters import unpack_tokens
        from flower_split.protocol.messages import BodyGrad, HeadOutput

        for message in messages:
            if isinstance(message, HeadOutput):  # f travels at the real tokens; the view keeps [B, T, d]
                f = unpack_tokens(message.f, message.attention_mask)
                self.record_f(message.tenant, message.step, f, message.attention_mask, message.train)
            elif isinstance(message, BodyGrad):
                self.record_grad_h(message.tenant, message.step, message.grad_h)

    def transcript(self) -> Transcript:
        """The recorded steps in (tenant, step) order, the ground truth aligned with them."""
        keys = sorted(self._views)
        return Transcript(dict(self.meta), [self._views[k] for k in keys],
                          [self._truth.get(k, GroundTruth()) for k in keys])

    def save(self, directory: str | Path) -> Path:
        """Write the three transcript files into ``directory``; returns ``transcript.json``'s path."""
        return save_transcript(self.transcript(), directory)


def save_transcript(transcript: Transcript, directory: str | Path) -> Path:
    """Write ``transcript`` in the documented format (module docstring)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    view: dict[str, torch.Tensor] = {}
    truth: dict[str, torch.Tensor] = {}
    for i, (step, known) in enumerate(zip(transcript.views, transcript.truth)):
        view.update({f"{i}.{name}": getattr(step, name) for name in VIEW_FIELDS if getattr(step, name) is not None})
        truth.update({f"{i}.{name}": getattr(known, name) for name in TRUTH_FIELDS
                      if getattr(known, name) is not None})
    save_file(view, str(out / CLOUD_VIEW_FILE))
    save_file(truth, str(out / GROUND_TRUTH_FILE))
    steps = [{"tenant": s.tenant, "step": s.step, "train": s.train} for s in transcript.views]
    path = out / TRANSCRIPT_FILE
    path.write_text(json.dumps({"format": TRANSCRIPT_FORMAT, "meta": transcript.meta, "steps": steps}, indent=1))
    return path


def load_transcript(directory: str | Path) -> Transcript:
    """Read a transcript written by :func:`save_transcript`; :class:`TranscriptError` names what is wrong."""
    root = Path(directory)
    paths = [root / name for name in (TRANSCRIPT_FILE, CLOUD_VIEW_FILE, GROUND_TRUTH_FILE)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TranscriptError(f"no recorded transcript in {root}: missing {', '.join(missing)} "
                              "(record one with `flower-split train --audit --out DIR`)")
    try:
        index = json.loads(paths[0].read_text())
    except json.JSONDecodeError as exc:
        raise TranscriptError(f"{paths[0]}: not JSON ({exc})") from exc
    if not isinstance(index, dict) or index.get("format") != TRANSCRIPT_FORMAT:
        raise TranscriptError(f"{paths[0]}: expected format {TRANSCRIPT_FORMAT!r}, "
                              f"got {index.get('format') if isinstance(index, dict) else index!r}")
    view, truth = load_file(str(paths[1])), load_file(str(paths[2]))
    views, known = [], []
    for i, step in enumerate(index["steps"]):
        views.append(StepView(step["tenant"], int(step["step"]), bool(step["train"]),
                              **{name: view.get(f"{i}.{name}") for name in VIEW_FIELDS}))
        known.append(GroundTruth(**{name: truth.get(f"{i}.{name}") for name in TRUTH_FIELDS}))
    return Transcript(index.get("meta", {}), views, known)


def _copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached, contiguous CPU copy (the party may reuse or free the original)."""
    return tensor.detach().to("cpu", dtype, copy=True).contiguous()
