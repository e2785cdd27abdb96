"""One validated description of a run, shared by the CLI, Flower's ``run_config`` and Python.

Every entry point builds a :class:`RunConfig`; :meth:`RunConfig.validate` runs before any
work starts and names the offending field, so a typo never costs a 20-minute training run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

MODES = ("centralized", "split")
# names of the registered security backends (flower_split.backends) and label protections
# (flower_split.protocol.labels); each registry checks at import that it matches these
SECURITY_LEVELS = ("plain", "secure")
LABEL_PROTECTIONS = ("he", "client")
OPTIMIZERS = ("sgd", "adamw")
ACTIVATIONS = ("quad", "gelu")
TAIL_INPUTS = ("tokens", "pooled")
DEVICES = ("auto", "cpu", "cuda")
BUILTIN_DATASETS = ("banking77", "sst2")

# ``--quick`` / ``quick = true``: the tiny random model on a few hundred samples; a smoke run in seconds.
# Learning rates: with adapters from the tenant's CSPRNG every run starts elsewhere, and the
# quadratic activation diverged from 5 of 12 random starts at lr_head 0.05 / lr_tail 0.5; at
# 0.02 / 0.3 none of 6 did (loss -0.55 in 3 epochs; docs/BENCHMARKS.md).
QUICK = dict(model="tiny", epochs=3, max_train_samples=1000, max_test_samples=300,
             head_rank=8, tail_bottleneck=16, lr_head=0.02, lr_tail=0.3)

# ``--private`` / ``private = true``: the recommended secure setting (docs/PRIVACY.md): nothing
# label-dependent reaches the cloud (no logits, no dL/dh: the head stays at its start, the
# identity). The cloud still sees f = e, every token; input_noise is the knob for the text.
# A tenant's node config ``private`` also accepts split-plain with the same frozen head and no
# reports (flower_split.flower.node_privacy): the same view for the cloud, at plain's cost,
# without secure mode's protection of h and the adapters from the tenant.
PRIVATE = dict(security="secure", label_protection="client", train_head=False)


class ConfigError(ValueError):
    """A run configuration value is invalid; the message names the field."""


@dataclass
class RunConfig:
    """Everything that defines one training run.

    Defaults are the tuned values for MiniLM on Banking77 (see docs/BENCHMARKS.md).
    """

    mode: str = "split"
    security: str = "plain"
    label_protection: str = "he"
    dataset: str = "banking77"
    data_dir: str | None = None
    model: str = "minilm"
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 64
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    seed: int = 0
    # adapters start from a seed-derived stream (exactly reproducible, also by the cloud) instead
    # of the tenant's CSPRNG; for tests and benchmarks only (docs/secure.md §2)
    insecure_reproducible_init: bool = False
    device: str = "auto"
    # split model
    head_rank: int = 64
    tail_bottleneck: int = 256
    tail_input: str = "pooled"   # the tail adapter on the mean-pooled body output, or on every token
    activation: str = "quad"
    train_head: bool = True
    optimizer: str = "sgd"
    momentum: float = 0.9
    lr_head: float = 0.05
    lr_tail: float = 0.1
    lr_classifier: float | None = None  # the tail's classifier; None: lr_tail
    weight_decay: float = 0.0
    warmup_fraction: float = 0.06
    # each tenant adds the log of its own label frequencies to its logits, in training and in
    # prediction (flower_split.model.prior; personal, never averaged); split-plain, FedAvg runs and
    # split-secure with label_protection = "client" (the logits it alone sees)
    prior_offset: bool = False
    # label-DP (docs/PRIVACY.md): Gaussian noise multiplier on g = dL/dz (0 = off), and its delta
    label_dp_noise: float = 0.0
    label_dp_delta: float = 1e-5
    # label-DP by randomized response: each training label replaced once, epsilon-label-DP (0 = off)
    label_rr_epsilon: float = 0.0
    # input privacy: Gaussian noise (sigma) on the tenant's embeddings, once per text (0 = off)
    input_noise: float = 0.0
    # centralized LoRA baseline
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lr: float = 1e-3

    def validate(self) -> "RunConfig":
        """Check every field; raise :class:`ConfigError` naming the first bad one.

        The rules of one security level (secure mode: sgd, a polynomial activation) are its
        backend's (:func:`flower_split.backends.backend_for`), checked by every entry point.
        """
        _choice("mode", self.mode, MODES)
        _choice("security", self.security, SECURITY_LEVELS)
        _choice("label_protection", self.label_protection, LABEL_PROTECTIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("tail_input", self.tail_input, TAIL_INPUTS)
        _choice("device", self.device, DEVICES)
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError("dataset: must be 'banking77', 'sst2' or a directory path")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model: must be 'minilm', 'tiny' or a local Hugging Face model path")
        for name in ("epochs", "batch_size", "max_length", "head_rank", "tail_bottleneck",
                     "lora_rank", "lora_alpha"):
            _positive_int(name, getattr(self, name))
        for name in ("max_train_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed: expected an integer, got {self.seed!r}")
        if not isinstance(self.insecure_reproducible_init, bool):
            raise ConfigError(f"insecure_reproducible_init: expected true or false, got "
                              f"{self.insecure_reproducible_init!r}")
        for name in ("lr_head", "lr_tail", "lr"):
            _positive_float(name, getattr(self, name))
        if self.lr_classifier is not None:
            _positive_float("lr_classifier", self.lr_classifier)
        for name, low, high in (("momentum", 0.0, 1.0), ("lora_dropout", 0.0, 1.0),
                                ("warmup_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not low <= value < high:
                raise ConfigError(f"{name}: expected a number in [{low}, {high}), got {value!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.prior_offset, bool):
            raise ConfigError(f"prior_offset: expected true or false, got {self.prior_offset!r}")
        self._validate_privacy()
        if self.prior_offset and (self.label_dp_noise or self.label_rr_epsilon):
            raise ConfigError("prior_offset: the offset is computed from the tenant's true labels, outside "
                              "the label-DP guarantee; turn it off or set label_dp_noise = label_rr_epsilon = 0")
        return self

    def _validate_privacy(self) -> None:
        noise, delta = self.label_dp_noise, self.label_dp_delta
        if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not 0 <= noise < math.inf:
            raise ConfigError(f"label_dp_noise: expected a finite number >= 0 (0 = off), got {noise!r}")
        if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 1:
            raise ConfigError(f"label_dp_delta: expected a number in (0, 1), got {delta!r}")
        if noise and self.mode != "split":
            raise ConfigError(f"label_dp_noise: label-DP noise is added to the split's gradient; "
                              f"mode {self.mode!r} has none (set it to 0)")
        rr = self.label_rr_epsilon
        if not isinstance(rr, (int, float)) or isinstance(rr, bool) or not 0 <= rr < math.inf:
            raise ConfigError(f"label_rr_epsilon: expected a finite number >= 0 (0 = off), got {rr!r}")
        if rr and self.mode != "split":
            raise ConfigError(f"label_rr_epsilon: randomized response protects the tenant's labels from the cloud; "
                              f"mode {self.mode!r} has no cloud (set it to 0)")
        sigma = self.input_noise
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 <= sigma < math.inf:
            raise ConfigError(f"input_noise: expected a finite number >= 0 (0 = off), got {sigma!r}")
        if sigma and self.mode != "split":
            raise ConfigError(f"input_noise: input noise protects the tenant's text from the cloud; "
                              f"mode {self.mode!r} has no cloud (set it to 0)")

    @property
    def classifier_lr(self) -> float:
        """The classifier's learning rate: ``lr_classifier``, or ``lr_tail`` when unset."""
        return self.lr_tail if self.lr_classifier is None else self.lr_classifier

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, stored in results.json next to the numbers it produced."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from a mapping whose keys may use Flower's dashes (``lr-head``) or underscores.

        Unknown keys are an error (a misspelt option must not be silently ignored).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{key}: unknown configuration field")
            kwargs[name] = value
        return cls(**kwargs).validate()


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: expected one of {allowed}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")


def parse_set(items: Sequence[str]) -> dict[str, object]:
    """``--set FIELD=VALUE`` items as a mapping (values parsed as JSON, else kept as strings)."""
    values: dict[str, object] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return values
