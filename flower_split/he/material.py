"""The cloud's data-independent randomness for one encrypted-loss batch, made ahead of the batch.

About half of :func:`~flower_split.he.loss.compute_loss_and_grad`'s time went to values that do
not depend on the batch's logits or labels, only on its shape and the tenant's public key: the
public-key encryption of zero that re-randomises the loss ciphertext, the mask that floods every
coefficient of the loss but the constant one, and the gradient mask mu (integers of ~120 bits,
reduced modulo every prime and NTT-transformed). :class:`LossMaterial` holds one batch's worth;
:func:`fresh_material` makes one; :class:`MaterialPool` keeps a few ready per batch shape and
refills them on one background thread while the cloud waits for its next message (the offline
phase, as the dealer's Beaver material is for the ring products). Every item is handed out once
and never saved: a restarted cloud makes new ones. The split mirrors :mod:`flower_split.mpc`'s:
the loss is the primitive, this module the provider of its randomness.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from flower_split.he import _random, _rns
from flower_split.he.fixed_point import wrap_ints
from flower_split.he.keys import CloudKeys
from flower_split.he.params import batch_bounds, ring_unit

Shape = tuple[int, int]  # (batch size, classes)


@dataclass(eq=False)
class LossMaterial:
    """One batch's randomness (secret to the cloud; :meth:`claim` lets it be used once: a second
    use of mu would hand the tenant the difference of two gradients, and ``loss_start`` is
    consumed in place).

    Attributes:
        shape: (batch size, classes) it was made for.
        key_id: the tenant key whose public key encrypted ``loss_start``.
        loss_start: Enc(0) plus the flooding mask (uniform modulo Q in every coefficient but the
            constant one, which holds the flood), at the top level, scale 2^(s + f_a).
        grad_offsets: per label ciphertext j, the NTT of -mu_j at the top level ([L, N] uint64).
        grad_mask: [B * C] int64, round(mu / unit) mod 2^64: the cloud's share of the gradient.
    """

    shape: Shape
    key_id: bytes
    loss_start: seal.Ciphertext
    grad_offsets: tuple[np.ndarray, ...]
    grad_mask: np.ndarray
    spent: bool = False

    def claim(self) -> None:
        """Mark it used; a ValueError if it was before."""
        if self.spent:
            raise ValueError("loss material already used: each batch needs fresh randomness")
        self.spent = True


def fresh_material(keys: CloudKeys, batch_size: int, num_classes: int) -> LossMaterial:
    """Make one batch's material for ``keys`` (CSPRNG draws, a public-key encryption of zero)."""
    params = keys.params
    bounds = batch_bounds(params, batch_size, num_classes)
    top = keys.levels[0]
    scale = 2.0 ** (params.label_scale_bits + params.logprob_frac_bits)
    start = keys.encrypt_zero(top, scale)  # re-randomizes c1, which would otherwise reveal a
    width = 1 << bounds.flood_bits
    flood = int(_random.uniform_below(2 * width + 1, 1)[0]) - width
    flood_mask = _rns.random_with_constant(top, flood)
    keys.evaluator.add_plain_inplace(start, keys.ntt_plaintext(top, flood_mask, scale))

    unit = ring_unit(params, batch_size)
    half = bounds.grad_mask_range * unit
    mu = _random.uniform_below(2 * half, batch_size * num_classes) - half  # uniform in [-half, half)
    share = (2 * mu + unit) // (2 * unit)  # round(mu / unit): the cloud's share in ring units
    degree = params.poly_modulus_degree
    offsets = tuple(_rns.to_ntt(top, _rns.residues(top, -mu[j * degree:(j + 1) * degree]))
                    for j in range(bounds.num_ciphertexts))
    return LossMaterial((batch_size, num_classes), keys.key_id, start, offsets, wrap_ints(share))


_EXECUTOR: Executor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> Executor:
    """One background thread per process makes every pool's material (started on first use)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flower-split-he-material")
        return _EXECUTOR


class MaterialPool:
    """Up to ``depth`` items of material per batch shape, for the ``shapes`` batch shapes used
    last, for one tenant key, made in the background.

    :meth:`take` hands out a ready item, or makes one on the spot when none is (the first batch
    of a shape, or a refill that has not finished), and asks the background thread to refill the
    shape. Nothing in a pool is ever handed out twice. A tenant picks its batch shapes, so the pool
    keeps only the most recent ``shapes`` (a training batch and the last, shorter one, by default):
    a tenant cycling through shapes costs itself on-the-spot material, never the cloud unbounded
    memory (each item is ~0.8 MiB at the default parameters). ``background=False`` refills on the
    caller's thread instead (tests; a caller without idle time gains nothing from a thread).
    """

    def __init__(self, keys: CloudKeys, depth: int = 2, shapes: int = 2, background: bool = True) -> None:
        if depth < 1 or shapes < 1:
            raise ValueError(f"depth={depth}, shapes={shapes}: a pool keeps at least one item of one shape")
        self.keys = keys
        self.depth = depth
        self.shapes = shapes
        self.background = background
        self._ready: OrderedDict[Shape, deque[LossMaterial]] = OrderedDict()  # least recently asked first
        self._filling: set[Shape] = set()
        self._lock = threading.Lock()

    def take(self, batch_size: int, num_classes: int) -> LossMaterial:
        """One batch's material, never handed out before; schedules a refill of the shape."""
        shape = (batch_size, num_classes)
        with self._lock:
            queue = self._ready.get(shape)
            item = queue.popleft() if queue else None
        self.refill(shape)
        return item if item is not None else fresh_material(self.keys, batch_size, num_classes)

    def ready(self, batch_size: int, num_classes: int) -> int:
        """How many items of this shape are ready now."""
        with self._lock:
            return len(self._ready.get((batch_size, num_classes), ()))

    def refill(self, shape: Shape) -> None:
        """Bring ``shape`` up to ``depth`` items (in the background unless ``background`` is off;
        a shape the parameters cannot hold then fails in :meth:`take`, not here), and make it the
        most recent shape, dropping the least recent beyond ``shapes``."""
        with self._lock:
            self._ready.setdefault(shape, deque())
            self._ready.move_to_end(shape)
            while len(self._ready) > self.shapes:
                self._ready.popitem(last=False)  # unused material is dropped, never handed out later
            if shape in self._filling:
                return
            self._filling.add(shape)
        if not self.background:
            self._fill(shape)
            return
        try:
            _executor().submit(self._fill, shape)
        except RuntimeError:  # the interpreter is shutting down: take() makes material on the spot
            with self._lock:
                self._filling.discard(shape)

    def _fill(self, shape: Shape) -> None:
        try:
            while True:
                with self._lock:
                    queue = self._ready.get(shape)
                    if queue is None or len(queue) >= self.depth:  # full, or evicted meanwhile
                        return
                item = fresh_material(self.keys, *shape)
                with self._lock:
                    queue = self._ready.get(shape)
                    if queue is None:
                        return
                    queue.append(item)
        finally:
            with self._lock:
                self._filling.discard(shape)
