"""The wire contract between the cloud's strategies and the tenants' handlers.

Every Flower message type and every record, config and metric key that both sides use is a
constant here, imported by the strategies (server side) and the handlers (client side), in
the manner of Flower's own ``MessageType`` and ``arrayrecord_key``: a key misspelt on one side
is an ``AttributeError`` at import, not a silent ``KeyError`` in round 3.

Message types follow Flower's ``<category>.<action>`` rule (``train.*``, ``evaluate.*``,
``query.*``); :func:`split_type` gives the two halves the ClientApp registers under.
"""

from __future__ import annotations


class MessageType:
    """Message types of the split protocols (plain and secure) and of the simulation harness."""

    # split-plain: three stages per training step, two per inference step
    HEAD_FWD = "train.head_fwd"
    TAIL = "train.tail"
    HEAD_BWD = "train.head_bwd"
    INFER_FWD = "evaluate.infer_fwd"
    INFER_TAIL = "evaluate.infer_tail"
    # split-secure: set-up, then one message of every tenant's step per round trip
    SECURE_SETUP = "train.secure_setup"
    SECURE_TRAIN_BEGIN = "train.secure_begin"
    SECURE_TRAIN_NEXT = "train.secure_next"
    SECURE_REKEY = "train.secure_rekey"
    SECURE_RESUME = "train.secure_resume"
    SECURE_EVAL_BEGIN = "evaluate.secure_begin"
    SECURE_EVAL_NEXT = "evaluate.secure_next"
    # secure mode's dealer node (docs/secure.md §9): its role, signed hellos, tenant
    # registrations and each step's sealed material, always for many tenants at once
    ROLE = "query.role"
    DEALER_HELLO = "query.dealer_hello"
    DEALER_REGISTER = "query.dealer_register"
    DEALER_MATERIAL = "query.dealer_material"
    # deployment: the cloud invites a node's tenant worker to its direct channel (docs/deployment.md §10)
    CHANNEL_OPEN = "query.channel_open"
    # simulations: load model and data before the first timed round
    WARM_UP = "query.warmup"
    # opt-in cross-tenant sharing (flower.sharing_*): Flower's SecAgg+ workflow sends its four
    # stages as plain "train" messages (flwr's MessageType.TRAIN); the aggregate comes back in
    # one more round trip
    SECAGG = "train"
    SHARE_LOAD = "train.share_load"


def split_type(message_type: str) -> tuple[str, str]:
    """``"train.head_fwd"`` -> ``("train", "head_fwd")``; anything else is a ValueError."""
    category, sep, action = message_type.partition(".")
    if not sep or category not in ("train", "evaluate", "query") or not action:
        raise ValueError(f"message type {message_type!r}: expected '<train|evaluate|query>.<action>'")
    return category, action


class RecordKey:
    """Names of the records inside a message's ``RecordDict``."""

    CONFIG = "config"        # ConfigRecord: the server's instruction
    METRICS = "metrics"      # MetricRecord: what a tenant reports
    SYNC = "sync"            # ConfigRecord: a secure tenant's update counts
    PROTOCOL = "protocol"    # ConfigRecord: header of a plain pack
    PAYLOAD = "payload"      # ArrayRecord: tensors of a pack or a secure message
    SECURE = "secure"        # ConfigRecord: header of a secure step message
    BLOBS = "blobs"          # ConfigRecord: byte items of a secure step message
    HELLO = "hello"          # ConfigRecord: the dealer's hello
    SETUP = "setup"          # ConfigRecord: a tenant's secure set-up
    REKEY = "rekey"          # ConfigRecord: a tenant's CKKS key rotation
    RESUME = "resume"        # ConfigRecord: a resumed cloud's challenge {ephemeral, nonce} / the proof {proof}
    ROLE = "role"            # ConfigRecord: a node's role (tenant / dealer) and tenant id
    DEALER = "dealer"        # ConfigRecord: a request to the dealer node (per-tenant lists)
    OUTCOME = "outcome"      # ConfigRecord: the dealer's per-tenant results (errors by tenant)
    MATERIAL = "material"    # ArrayRecord: sealed material by tenant (uint8)
    SHARED = "shared"        # ArrayRecord: the aggregate of the shared parameters (flower.sharing_*)
    FIT_CONFIG = "fitins.config"  # ConfigRecord: the config Flower's SecAgg+ workflow forwards (its FitIns)
    SHARE_SIGNATURE = "share.signature"    # ConfigRecord {signed: [key, signature]}: a tenant's SecAgg+ keys, signed
    SHARE_SIGNATURES = "share.signatures"  # ConfigRecord {node id: [key, signature]}: relayed with the key exchange
    SHARE_PRG = "share.prg"                # ConfigRecord {prg}: the mask generator a set-up uses (flower.secagg_prg)
    SHARE_VIEW = "share.view"              # ConfigRecord {signed: [key, signature]}: a tenant's signed view of a phase
    SHARE_VIEWS = "share.views"            # ConfigRecord {node id: [key, signature]}: relayed with the unmask stage


class ConfigKey:
    """Keys of the server's ``config`` record."""

    NUM_BATCHES = "num-batches"
    SERVER_ROUND = "server-round"
    RESTART = "restart"
    SCOPE = "scope"
    KNOWN = "known"  # plain: the tenant has trained before, so it must hold state (no silent fresh start)
    NEXT_STEP = "next-step"  # secure: the lowest step number the cloud accepts (a tenant refuses lower)
    HEAD_UPDATES = "head-updates"
    TAIL_UPDATES = "tail-updates"
    SHARE_LOADS = "share-loads"  # secure: sharing loads a party counts on its halves (begin and sync), and
    # in a share load its number (a tenant loads only the next one; the cloud completes a lost ack)
    HE_KEY_ID = "he-key-id"
    NEXT_BATCH = "next-batch"    # secure: the shape of a tenant's next training batch (in its sync),
    NEXT_TOKENS = "next-tokens"  # so that the cloud asks the dealer for that step's material ahead
    NEXT_ROWS = "next-rows"      # (and its real tokens: the rows of its head's 2PC)
    AHEAD_STEP = "ahead-step"    # secure: the step number whose material the cloud holds ahead, and the
    AHEAD_SHAPE = "ahead-shape"  # [batch, tokens, rows] it was dealt for (a begin that cannot use it skips it)
    SHARE = "share"              # sharing: which parameters (flower.sharing_params.SHARE_SCOPES)
    SHARE_COUNT = "share-count"  # sharing: how many tenants' parameters the aggregate sums


class MetricKey:
    """Keys of a tenant's ``metrics`` record."""

    TRAIN_LOSS = "train-loss"
    LABEL_DP_EPSILON = "label-dp-epsilon"  # the tenant's label-DP epsilon so far (label_dp_noise > 0)
    NUM_EXAMPLES = "num-examples"
    STEPS = "steps"
    REMAINING = "remaining"
    DONE = "done"
    STOPPED = "stopped"  # the round in which the tenant's own loss reached its own target-loss (flower.stop_rule)
    CORRECT = "correct"
    TP = "tp"
    FP = "fp"
    FN = "fn"


CLASS_COUNT_KEYS = (MetricKey.TP, MetricKey.FP, MetricKey.FN)
EVAL_SCOPES = ("tenant", "global", "predict")  # predict: the node's own texts (flower.node_predict)
# The error code of a tenant message's reply from secure mode's dealer node: it serves no
# tenant. Outside Flower's own ErrorCode values (0-8), so that a plain run, which does not ask
# roles, can leave the dealer node out instead of dropping it as a failed tenant every round.
NOT_A_TENANT_CODE = 101
# The error code of a tenant's reply refusing a value it opened as out of range
# (protocol.opened_range.OutOfRange): the cloud then undoes the tenant's previous step as well.
OUT_OF_RANGE_CODE = 102
