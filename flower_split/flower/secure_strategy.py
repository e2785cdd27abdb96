"""Flower strategy of split learning in security level ``secure`` (2PC adapters, protected labels).

The ServerApp hosts the cloud (party 0 of every tenant's 2PC, with the frozen body). The
dealer is its own SuperNode, reached through a :class:`~flower_split.flower.dealer_link.DealerLink`
(only with ``insecure-colocated-dealer`` does it live in this process; docs/secure.md §9).

Set-up (once per tenant, on first sight of its node; :mod:`flower_split.flower.secure_admission`):
``query.role`` finds the dealer node and binds each tenant id to its node;
``train.secure_setup`` carries the dealer's hello signed for that tenant; the tenant's
:class:`ClientSetup` is registered with the cloud and the dealer.

A secure step is a fixed exchange of messages (``secure_steps.schedule``: 10-11 from the
client for a training step). Each tenant has one step in flight, and every round trip
carries the next message of every selected tenant at once::

    train.secure_begin  -> tenants: reconcile with the cloud's update and sharing-load counts,
                           refuse a step number below the cloud's next-step, next batch; reply:
                           the step's first message (+ the tenant's counts)
    query.dealer_material -> the dealer node: every tenant's request (one round trip);
                           reply: the sealed material, which the cloud opens
    (cloud)                reconcile, answer
    train.secure_next   -> tenants: the cloud's message; reply: the tenant's next message
    ...                    until every tenant's step is over (metrics {done})

so a training step costs as many round trips as the longest schedule, whatever the number
of tenants. Evaluation runs inference steps (``evaluate.secure_begin`` / ``secure_next``)
until every tenant's test set is done. A tenant that fails or times out is dropped for the
round: the cloud aborts its step (undoing any update of it) and, at the tenant's next step,
both sides reconcile (:meth:`SecureCloudParty.reconcile`), so the adapter halves stay a
consistent pair.

CKKS key rotation (``he`` tenants, ``he_key_rotation_every`` = N > 0): before training
rounds N+1, 2N+1, ... every ``he`` tenant is asked for a new key pair, one extra round trip
for all of them; the acknowledgement rides in the next ``secure_begin``, which always
carries the cloud's current key id::

    train.secure_rekey  -> tenants: the cloud's key id; reply: a KeyRotation (new public context)
    (cloud)                accept_key_rotation: from now on the tenant's labels need the new key
    train.secure_begin  -> tenants: the cloud's (new) key id; the tenant switches before
                           encrypting this step's labels

A tenant whose rotation fails (no reply, error reply, refused rotation) is dropped for the
round like any other failure; both sides stay on one key (the tenant never switches without
the acknowledgement) and it is asked again at the next round it takes part in.

The strategy never sees labels, inputs, the client's halves or anything a tenant decrypted:
no training loss (``train_loss`` is None; in ``he`` mode the loss is a decrypted CKKS value,
and each one given back to the cloud is an equation in the tenant's secret key). With
``secure-metrics`` the tenants report their evaluation counts (from logits opened to them
only); without it the evaluations have no accuracy.
"""

from __future__ import annotations

import time
from logging import DEBUG, ERROR, INFO
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flower_split.flower.contract import CLASS_COUNT_KEYS, ConfigKey, MessageType, MetricKey, RecordKey
from flower_split.flower.records import config_value, read_metrics
from flower_split.flower.dealer_link import DealerLink
from flower_split.flower.secure_admission import SecureAdmission
from flower_split.flower.settings import STEP_PACES
from flower_split.flower.stream import shares_machine
from flower_split.flower.secure_records import has_secure, pack_secure, unpack_key_rotation, unpack_secure
from flower_split.flower.strategy import SplitStrategyBase
from flower_split.flower.strategy_utils import EvalReport, EvalTally, Exchange, RoundReport
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_messages import RESUME_STEP_GAP, MaterialRequest, SecureMessage


class SecureSplitStrategy(SecureAdmission, SplitStrategyBase):
    """Split learning (security ``secure``) over the Flower Message API.

    Parameters as for :class:`~flower_split.flower.strategy.SplitStrategyBase` (``cloud``: the
    :class:`SecureCloudParty`; ``local_steps``: training steps, one batch each, per tenant and
    round), plus ``dealer`` (the :class:`DealerLink` to the dealer of correlated randomness) and
    ``he_key_rotation_every`` (default 0): rotate the CKKS keys of every tenant whose label
    protection holds such keys after every N training rounds (0: never).
    """

    def __init__(self, cloud: SecureCloudParty, dealer: DealerLink, local_steps: int,
                 min_nodes: int = 2, reply_timeout: float | None = 600.0, node_wait_timeout: float = 600.0,
                 global_eval: bool = True, he_key_rotation_every: int = 0, step_pace: str = "auto") -> None:
        super().__init__(cloud, local_steps, min_nodes, reply_timeout, node_wait_timeout, global_eval)
        if step_pace not in STEP_PACES:
            raise ValueError(f"step_pace must be one of {STEP_PACES}, got {step_pace!r}")
        self.step_pace = step_pace
        if not isinstance(he_key_rotation_every, int) or isinstance(he_key_rotation_every, bool) \
                or he_key_rotation_every < 0:
            raise ValueError(f"he_key_rotation_every must be an integer >= 0, got {he_key_rotation_every!r}")
        self.dealer = dealer
        self._init_admission()
        self._announced: dict[int, tuple[object, ...]] = {}  # node -> its next training batch's shape
        self._training = False  # whether the steps in flight are training steps (forget_step)
        self.he_key_rotation_every = he_key_rotation_every
        self._rekey_due: set[str] = set()  # tenants whose CKKS keys are to be rotated

    def summary(self) -> None:
        log(INFO, "SecureSplitStrategy: %d steps per tenant and round, one step in flight per tenant (step pace %s), "
                  "min %d tenants, reply timeout %s s, CKKS key rotation %s", self.local_steps, self.step_pace,
            self.min_nodes, self.reply_timeout,
            f"every {self.he_key_rotation_every} rounds" if self.he_key_rotation_every else "off")

    def forget_step(self, tenant: str, garbage: bool = False) -> None:
        """Abort ``tenant``'s step; after a training step that opened garbage, undo the one before
        it too (an evaluation's garbage leaves the model alone: the batch is lost, and a model that
        holds garbage shows it again at its next training step)."""
        if not self.cloud.abort_step(tenant, undo_previous=garbage and self._training):
            log(ERROR, "%s: a value opened in training was out of range and no rollback point is left to undo: "
                       "its model may hold garbage for good (docs/secure.md, 'An opened value out of range')", tenant)

    def cloud_state(self) -> dict[str, Any]:
        """The cloud's halves, keys and step counters of every tenant (saved between steps)."""
        return self.cloud.state_dict()

    def load_cloud_state(self, state: Any) -> None:
        """Restore the cloud after a restart: every tenant's step numbers move
        :data:`RESUME_STEP_GAP` on (the step in flight may have used some), and each restored
        tenant is bound again to a node that proves it holds the tenant's key (no new set-up:
        the node resumes from its own saved state, :mod:`flower_split.flower.node_state`)."""
        self.cloud.load_state_dict(state)
        self.cloud.skip_steps(RESUME_STEP_GAP)
        self.restored = set(self.cloud.tenants)

    # -- training and evaluation ---------------------------------------------------------------

    def train_round(self, grid: Grid, server_round: int) -> RoundReport:
        """One round: ``local_steps`` secure training steps for every selected tenant."""
        phase = Exchange()
        resumed = self.steps_done(server_round)  # a round interrupted by a restart runs only the rest
        active = self.training_nodes(self.select(grid))
        self.dealer.round_started(server_round)
        every = self.he_key_rotation_every
        if every and server_round > 1 and (server_round - 1) % every == 0:
            self._rekey_due |= {t for t in self.cloud.tenants if self.cloud.he_key_id(t) is not None}
        self._rotate_keys(grid, server_round, phase, active)
        examples, steps = 0, resumed
        every_log = max(1, self.local_steps // 8)  # a secure MiniLM round takes tens of minutes: say how far it is
        while steps < self.local_steps and active:
            ahead = steps + 1 < self.local_steps  # another training step follows: ask its material now
            _, finished = self._run_steps(grid, True, {n: {} for n in active}, server_round, phase, active, ahead)
            for node, content in finished.items():  # no loss: secure tenants report none (module docstring)
                metrics = read_metrics(content, lists=CLASS_COUNT_KEYS)
                examples += int(metrics.get(MetricKey.NUM_EXAMPLES, 0))
                if MetricKey.LABEL_DP_EPSILON in metrics:
                    self.label_dp[self.tenant_of[node]] = float(metrics[MetricKey.LABEL_DP_EPSILON])
            steps += 1
            self.safe_point(server_round - 1, steps)  # no step in flight: halves consistent within one step
            if steps % every_log == 0 and steps < self.local_steps:
                log(INFO, "secure round %d: step %d/%d, %d tenants, %.0f s", server_round, steps,
                    self.local_steps, len(active), time.perf_counter() - phase.started)
        # a round resumed after its last step ran none here: no tenant is known to have finished it
        # (some may have been dropped mid-step before the restart), so it has no sharing phase either
        trained = sorted(self.tenant_of[n] for n in active) if steps > resumed else []
        return RoundReport(
            server_round=server_round, tenants=trained,
            dropped=dict(phase.dropped), train_loss=None,
            num_examples=examples, steps=steps, round_trips=phase.round_trips,
            flower_wait_seconds=phase.wait, cloud_seconds=phase.cloud, dealer_seconds=phase.dealer,
            wall_seconds=time.perf_counter() - phase.started, label_dp_epsilon=dict(self.label_dp),
            stopped=dict(self.stopped))

    def evaluate(self, grid: Grid, server_round: int, scope: str = "tenant") -> EvalReport:
        """Secure inference on each tenant's own test split (or, ``scope="global"``, the whole test set)."""
        phase, tally = Exchange(), EvalTally()
        active = self.select(grid)
        pending, restart = set(active), {n: True for n in active}
        while pending:
            configs = {n: {ConfigKey.RESTART: restart[n], ConfigKey.SCOPE: scope} for n in pending}
            begun, finished = self._run_steps(grid, False, configs, server_round, phase, active)
            for node, remaining in begun.items():
                restart[node] = False
                if remaining == 0:
                    pending.discard(node)
            for node, content in finished.items():
                try:
                    tally.add(node, content)  # no counts: the tenant keeps them (secure-metrics = false)
                except ProtocolError as exc:
                    self.drop(node, str(exc), phase, active)
            pending &= active
        return tally.report(server_round, scope, self.tenant_of, active, phase)

    # -- one step for every tenant -------------------------------------------------------------

    def _run_steps(self, grid: Grid, train: bool, configs: dict[int, dict[str, Any]], server_round: int,
                   phase: Exchange, active: set[int], ahead: bool = False) -> tuple[dict[int, float], dict[int, RecordDict]]:
        """Begin a step on every node of ``configs`` and exchange messages until all are over.

        Returns ``remaining`` (evaluation: test batches left after this one) of every node that
        answered the begin, and the final reply content (with its metrics) of every finished step.
        """
        begin = MessageType.SECURE_TRAIN_BEGIN if train else MessageType.SECURE_EVAL_BEGIN
        self._training = train
        instructions = {node: self._begin_instruction(node, extra, server_round) for node, extra in configs.items()}
        replies = self.exchange(grid, begin, instructions, server_round, phase, active)
        remaining: dict[int, float] = {}
        firsts: dict[int, SecureMessage] = {}
        for node, content in replies.items():
            tick = time.perf_counter()
            try:
                self.cloud.reconcile(self.tenant_of[node], _sync(content))  # every begin reply carries the counts
                metrics = read_metrics(content, lists=CLASS_COUNT_KEYS)
                if train and MetricKey.STOPPED in metrics:  # the tenant's own stop rule (flower.stop_rule)
                    self.tenant_stopped(node, metrics[MetricKey.STOPPED], server_round, active)
                    continue
                remaining[node] = metrics.get(MetricKey.REMAINING, 0.0)
                first = self._first_message(node, content, train, remaining[node])
                if first is not None:
                    firsts[node] = first
            except ProtocolError as exc:
                remaining.pop(node, None)
                self.drop(node, f"{begin}: {exc}", phase, active, cause=exc)
            finally:
                phase.cloud += time.perf_counter() - tick
        outgoing = self._answer_first(grid, firsts, phase, active)
        return remaining, self._step_loop(grid, train, outgoing, server_round, phase, active, ahead)

    def _begin_instruction(self, node: int, extra: dict[str, Any], server_round: int) -> RecordDict:
        """The ``*.secure_begin`` config: the cloud's update counts, its next step, the step whose
        material it holds ahead (if any) and (``he``) its CKKS key id."""
        tenant = self.tenant_of[node]
        counts = self.cloud.counts(tenant)
        key_id = self.cloud.he_key_id(tenant)  # acknowledges the tenant's last key rotation
        ahead = self.cloud.tenants[tenant].ahead()  # a begin that cannot use it moves past its number
        return RecordDict({RecordKey.CONFIG: ConfigRecord({
            **extra, ConfigKey.HEAD_UPDATES: counts["head"], ConfigKey.TAIL_UPDATES: counts["tail"],
            ConfigKey.SHARE_LOADS: counts["loads"],
            ConfigKey.NEXT_STEP: self.cloud.next_step(tenant),  # the tenant refuses to start a lower (used) step
            ConfigKey.SERVER_ROUND: server_round, **({ConfigKey.HE_KEY_ID: key_id} if key_id is not None else {}),
            **({ConfigKey.AHEAD_STEP: ahead[0], ConfigKey.AHEAD_SHAPE: list(ahead[1:])} if ahead else {})})})

    def _first_message(self, node: int, content: RecordDict, train: bool, remaining: float) -> SecureMessage | None:
        """A tenant's first step message (None: an evaluation with no batch left)."""
        if not has_secure(content):
            if train or remaining > 0:
                raise ProtocolError(f"the reply carries no step message ({remaining:.0f} test batches remaining)")
            return None
        tenant = self.tenant_of[node]
        first = unpack_secure(content, tenant, "client")
        if first.train != train:
            raise ProtocolError(f"step {first.step} has train={first.train}, expected {train}")
        announced = content[RecordKey.SYNC]
        shape = (ConfigKey.NEXT_BATCH, ConfigKey.NEXT_TOKENS, ConfigKey.NEXT_ROWS)
        if train and all(key in announced for key in shape):
            self._announced[node] = tuple(announced[key] for key in shape)
        return first

    def _answer_first(self, grid: Grid, firsts: dict[int, SecureMessage], phase: Exchange,
                      active: set[int]) -> dict[int, RecordDict]:
        """The cloud's answers to the first messages, with every tenant's material asked of the
        dealer in one request (validated in full before the dealer works for it)."""
        requests: dict[int, MaterialRequest] = {}
        tick = time.perf_counter()
        for node, first in list(firsts.items()):
            try:
                request = self.cloud.material_request(first)  # None: asked ahead, ready
                if request is not None:
                    requests[node] = request
            except ProtocolError as exc:
                del firsts[node]
                self.drop(node, f"first message: {exc}", phase, active, cause=exc)
        phase.cloud += time.perf_counter() - tick
        dealt = time.perf_counter()
        bundles = self.dealer.material(grid, list(requests.values())) if requests else {}
        phase.dealer += time.perf_counter() - dealt
        phase.round_trips += 0 if self.dealer.colocated or not requests else 1
        outgoing: dict[int, RecordDict] = {}
        tick = time.perf_counter()
        for node, first in firsts.items():
            try:
                if node in requests:
                    bundle = bundles.get(requests[node].tenant, "no answer from the dealer")
                    if isinstance(bundle, str):
                        raise ProtocolError(f"dealer: {bundle}")
                    self.cloud.accept_material(bundle)
                reply = self.cloud.handle(first)
                if reply is None:
                    raise ProtocolError("a step cannot end with its first message")
                outgoing[node] = pack_secure(reply)
            except ProtocolError as exc:
                self.drop(node, f"first message: {exc}", phase, active, cause=exc)
        phase.cloud += time.perf_counter() - tick
        return outgoing

    def _ask_ahead(self, active: set[int]) -> list[MaterialRequest]:
        """Material requests for the announced next training steps of the ``active`` tenants."""
        requests = []
        for node, (batch, tokens, rows) in self._announced.items():
            if node in active:
                try:
                    requests.append(self.cloud.prefetch_request(self.tenant_of[node], batch, tokens, rows))
                except ProtocolError as exc:  # asked for at the step's first message instead
                    log(DEBUG, "tenant %s: no material ahead: %s", self.tenant_of[node], exc)
        return requests

    def _take_ahead(self, reply: Message | None, requests: list[MaterialRequest], phase: Exchange) -> None:
        tick = time.perf_counter()
        for tenant, bundle in self.dealer.material_reply(reply, requests).items():
            try:
                if isinstance(bundle, str):
                    raise ProtocolError(bundle)
                self.cloud.accept_material(bundle)
            except ProtocolError as exc:  # kept: the number may be spent (CloudTenant.ahead)
                log(DEBUG, "tenant %s: material ahead refused: %s", tenant, exc)
        phase.dealer += time.perf_counter() - tick

    def _step_loop(self, grid: Grid, train: bool, outgoing: dict[int, RecordDict], server_round: int,
                   phase: Exchange, active: set[int], ahead: bool = False) -> dict[int, RecordDict]:
        """Exchange the steps' messages until every tenant's step is over; the final replies.

        ``step_pace`` (:class:`~flower_split.flower.settings.FlowerSettings`): each tenant at its
        own pace (:meth:`stream`: the cloud answers a tenant's message as soon as it arrives while
        the others compute) or all together (:meth:`lockstep`). ``ahead``: the dealer's material for
        every tenant's next training step rides along with the first messages (no round trip of
        its own at the next step's begin)."""
        step = MessageType.SECURE_TRAIN_NEXT if train else MessageType.SECURE_EVAL_NEXT
        finished: dict[int, RecordDict] = {}
        requests = self._ask_ahead(active) if ahead else []
        self._announced.clear()
        rider = self.dealer.material_message(requests) if requests else None
        riders = {rider.metadata.dst_node_id: rider} if rider is not None else {}

        def answer(node: int, content: RecordDict) -> RecordDict | None:
            tick = time.perf_counter()
            try:
                done = bool(read_metrics(content, lists=CLASS_COUNT_KEYS).get(MetricKey.DONE, 0))
                if has_secure(content):
                    reply = self.cloud.handle(unpack_secure(content, self.tenant_of[node], "client"))
                    if reply is not None:
                        if done:
                            raise ProtocolError(f"{step}: the tenant reports done but the step goes on")
                        return pack_secure(reply)
                elif not done:
                    raise ProtocolError(f"{step}: the reply carries neither a step message nor done")
                if done:
                    finished[node] = content
            except ProtocolError as exc:
                self.drop(node, str(exc), phase, active, cause=exc)
            finally:
                phase.cloud += time.perf_counter() - tick
            return None

        streamed = self.step_pace == "stream" or (self.step_pace == "auto" and not shares_machine(grid))
        pace = self.stream if streamed else self.lockstep
        replies = pace(grid, step, outgoing, server_round, phase, active, answer, riders)
        if requests:
            self._take_ahead(next(iter(replies.values()), None), requests, phase)
        return finished

    # -- CKKS key rotation ---------------------------------------------------------------------

    def _rotate_keys(self, grid: Grid, server_round: int, phase: Exchange, active: set[int]) -> None:
        """Rotate the keys of the due tenants in ``active``: one ``train.secure_rekey`` round trip.

        The cloud takes each tenant's new public context; the tenant switches to the new key
        when its next ``secure_begin`` carries the cloud's new key id. A tenant whose rotation
        fails is dropped for the round and stays due; both sides keep the old key.
        """
        nodes = {n for n in active if self.tenant_of[n] in self._rekey_due}
        contents = {n: RecordDict({RecordKey.CONFIG: ConfigRecord({
                        ConfigKey.HE_KEY_ID: self.cloud.he_key_id(self.tenant_of[n]),
                                                           ConfigKey.SERVER_ROUND: server_round})})
                    for n in nodes}
        replies = self.exchange(grid, MessageType.SECURE_REKEY, contents, server_round, phase, active)
        rotated = False
        for node, content in replies.items():
            tenant = self.tenant_of[node]
            tick = time.perf_counter()
            try:
                key_id = self.cloud.accept_key_rotation(unpack_key_rotation(content, tenant))
                self._rekey_due.discard(tenant)
                rotated = True
                log(INFO, "tenant %s: CKKS key rotated to %s", tenant, key_id.hex())
            except ProtocolError as exc:
                self.drop(node, f"{MessageType.SECURE_REKEY}: {exc}", phase, active)
            finally:
                phase.cloud += time.perf_counter() - tick
        if rotated:  # a new key the tenants switch to at their next begin: saved before they do
            self.safe_point(server_round - 1, self.steps_done(server_round))


def _sync(content: RecordDict) -> dict[str, int]:
    """The tenant's update and sharing-load counts in its reply to a begin."""
    record = content.get(RecordKey.SYNC)
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(f"missing ConfigRecord {RecordKey.SYNC!r} with the tenant's update counts")
    return {"head": config_value(record, ConfigKey.HEAD_UPDATES, int, RecordKey.SYNC),
            "tail": config_value(record, ConfigKey.TAIL_UPDATES, int, RecordKey.SYNC),
            "loads": config_value(record, ConfigKey.SHARE_LOADS, int, RecordKey.SYNC)}
