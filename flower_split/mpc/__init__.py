"""Two-party computation over Z_2^64 for the secret-shared adapters.

Modules, one job each:

* ``ring``       - the ring as int64 tensors; fixed-point encode/decode.
* ``randomness`` - uniform ring tensors from OS entropy; AES-CTR seed expansion.
* ``limbs``      - exact ring matmul through float64 limb matmuls.
* ``share``      - ``AdditiveShare`` and its local operations; share / reconstruct.
* ``triples``    - Beaver requests, triples and square pairs.
* ``dealer``     - the trusted dealer, its seed-compressed delivery, material queues.
* ``masks``      - Beaver masks bound to one tensor, opened once, reused through views.
* ``correlated`` - one mask per tensor, one c per product: dealing and sources.
* ``beaver``     - products of shares split into local begin / finish phases.
* ``stages``     - staged programs: one exchange per stage, for the protocol layer.
* ``adapter``    - secure forward/backward of the residual adapter and classifier.
* ``local``      - in-process two-party driver (tests, benchmarks).

See docs/mpc.md for encoding range, error bounds, costs and the trust model.
"""

from .layers import (
    Quadratic,
    adapter_backward,
    adapter_forward,
    classifier_backward,
    classifier_forward,
    mean_pool,
    mean_pool_backward,
)
from .correlated import MaskSource, OnlineMaskDealer, SeededProduct, deal_product, product_c
from .masks import MaskRecord, MaskReuseError, Use, View, mask_share
from .beaver import Opening, PendingProduct, begin, begin_matmul, begin_mul, begin_square
from .dealer import Dealer, MaterialQueue, SeededMaterial, TrustedDealer, deal_seeded
from .limbs import DEFAULT_LIMB_BITS, max_inner_dim, ring_matmul
from .local import LocalTwoParty, SharePair
from .randomness import SEED_BYTES, RingStream, new_seed, random_ring
from .ring import DEFAULT_FRAC_BITS, RING_BITS, decode, encode, max_abs_value
from .share import AdditiveShare, reconstruct, reconstruct_ring, share, share_ring
from .stages import PartyState, Product, Program, Stage
from .triples import BeaverMaterial, Op, SquarePair, Triple, TripleRequest

__all__ = [
    "MaskRecord",
    "MaskReuseError",
    "MaskSource",
    "OnlineMaskDealer",
    "SeededProduct",
    "Use",
    "View",
    "deal_product",
    "mask_share",
    "product_c",
    "DEFAULT_FRAC_BITS",
    "DEFAULT_LIMB_BITS",
    "RING_BITS",
    "SEED_BYTES",
    "AdditiveShare",
    "BeaverMaterial",
    "Dealer",
    "LocalTwoParty",
    "MaterialQueue",
    "Op",
    "Opening",
    "PartyState",
    "PendingProduct",
    "Product",
    "Program",
    "Quadratic",
    "RingStream",
    "SeededMaterial",
    "SharePair",
    "SquarePair",
    "Stage",
    "Triple",
    "TripleRequest",
    "TrustedDealer",
    "adapter_backward",
    "adapter_forward",
    "begin",
    "begin_matmul",
    "begin_mul",
    "begin_square",
    "classifier_backward",
    "classifier_forward",
    "deal_seeded",
    "decode",
    "encode",
    "max_abs_value",
    "max_inner_dim",
    "mean_pool",
    "mean_pool_backward",
    "new_seed",
    "random_ring",
    "reconstruct",
    "reconstruct_ring",
    "ring_matmul",
    "share",
    "share_ring",
]
