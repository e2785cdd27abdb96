"""Opt-in cross-tenant sharing, the cloud's side: Flower's SecAgg+ between training rounds.

Run config ``share`` (``tail`` / ``head-tail`` / ``all``; default ``none``): after every training
round, the shared adapter parameters (:mod:`~flower_split.flower.sharing_params`) of the
round's tenants are averaged under Flower's own SecAgg+ (``flwr.server.workflow.
SecAggPlusWorkflow`` here, ``flwr.client.mod.secaggplus_mod`` on the tenants; nothing of the
masking is ours), then every tenant that was in the aggregate loads the mean and keeps its
personal parts (its classifier) as FedPer / FedRep do::

    train (stage setup)    -> tenants: SecAgg+ config; reply: two public keys
    train (share keys)     -> tenants: neighbours' keys; reply: encrypted key shares
    train (collect)        -> tenants: forwarded shares + our FitIns {share}; the tenant's
                              handler returns its shared parameters, the mod masks them
    train (unmask)         -> tenants: survivors / drop-outs; reply: key shares; the workflow
                              removes the masks: only the aggregate is left
    train.share_load       -> tenants in the aggregate: the mean (plain) or the tenants'
                              halves' sum C, the count and the load's number (secure);
                              reply: ack (secure: the tenant's count of loads)

so 5 round trips per round, whatever the number of tenants. Secure mode: the tenants send
their halves; the cloud sums its own halves of the same parameters, lifts the tenants' sum
(:func:`~flower_split.flower.sharing_params.lift_tenant_sum`) and both sides average their
own halves: the sum of the averages is the average adapter. What the cloud learns: the
aggregate, i.e. the mean of the shared parameters over the tenants (in secure mode too, since
it holds the other halves); never one tenant's parameters (docs/secure.md §10), since each
tenant applies its own rules to every stage (:mod:`~flower_split.flower.sharing_policy`:
its floor of participants, a majority threshold, pinned keys, one phase per trained round).
This side relays the tenants' signed SecAgg+ keys with the key exchange, uses a majority
threshold (:func:`reconstruction_threshold`) and stops an attempt doomed at unmask before its
collect stage. SecAgg+ needs at least 2 tenants; with fewer there is no sharing that round.

The Message-API strategies of flwr 1.41 (``flwr.serverapp.strategy``) have no SecAgg+ path;
the workflow needs a ``LegacyContext`` (a legacy ``Strategy`` and a client manager): built
here for the sharing phase only (:class:`_Collect`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, log, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey
from flwr.serverapp import Grid

from flower_split.flower.contract import ConfigKey, MessageType, RecordKey
from flower_split.flower.metering import record_bytes
from flower_split.flower.records import config_value, read_record
from flower_split.flower.secagg_prg import PRG_NAME, install as install_full_entropy_masks
from flower_split.flower.sharing_views import CONSISTENCY_STAGE
from flower_split.mpc import decode
from flower_split.protocol import ProtocolError
from flower_split.flower.sharing_params import (
    FINE_TUNED_COPY, average_half, decode_sum, halves, lift_tenant_sum, quantization, ring_sum, shared_names,
)


install_full_entropy_masks()  # the tenants mask with the same generator (flower.secagg_prg)


@dataclass
class ShareReport:
    """What one sharing phase did and cost (bytes: Flower record payloads, both directions)."""

    server_round: int
    tenants: list[str] = field(default_factory=list)  # whose parameters are in the aggregate and loaded it
    dropped: dict[str, str] = field(default_factory=dict)
    # secure: in the aggregate, sent the load, no reply: the cloud completes the load at the
    # tenant's next begin if the tenant's counts say it loaded (CloudTenant.settle_load)
    pending: list[str] = field(default_factory=list)
    round_trips: int = 0
    bytes_to_tenants: int = 0
    bytes_from_tenants: int = 0
    threshold: int = 0
    seconds: float = 0.0


def _stage(messages: list[Message]) -> str | None:
    """The SecAgg+ stage ``messages`` carry (None: not a SecAgg+ stage)."""
    for message in messages:
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None:
            return configs.get(Key.STAGE)
    return None


class _CountingGrid(Grid):
    """A grid that counts round trips and record bytes, for the sharing phase's report."""

    def __init__(self, grid: Grid, report: ShareReport) -> None:
        self.grid, self.report = grid, report
        self.dropped: set[int] = set()  # nodes that failed a round trip others answered
        self.signatures: dict[str, list[bytes]] = {}  # node id -> its signed SecAgg+ keys (this attempt's set-up)
        self.key_dropouts: set[int] = set()  # nodes that did not answer this attempt's share-keys stage

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = _stage(messages)
        messages = [self._with_signatures(m, stage) for m in messages]
        if stage == Stage.UNMASK:
            messages = self._with_views(messages, timeout)
        if stage == Stage.COLLECT_MASKED_VECTORS and self.key_dropouts:
            # a tenant that dropped out in share keys dooms this attempt at unmask (no one holds its
            # key shares); the tenants share once per round, so stop before any vector is sent
            log(WARNING, "sharing: %s dropped out in SecAgg+'s share-keys stage; this attempt stops before its "
                "collect stage", ", ".join(str(n) for n in sorted(self.key_dropouts)))
            self.dropped |= self.key_dropouts
            return []
        self.report.round_trips += 1
        self.report.bytes_to_tenants += sum(record_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
        if answered:  # a round trip that failed for everyone says nothing about who dropped out
            self.dropped |= {m.metadata.dst_node_id for m in messages} - answered
        if stage == Stage.SETUP:
            self.key_dropouts = set()
            self.signatures = {}
        elif stage == Stage.SHARE_KEYS:
            self.key_dropouts = {m.metadata.dst_node_id for m in messages} - answered
        self.report.bytes_from_tenants += sum(record_bytes(r.content) for r in replies if not r.has_error())
        for reply in replies:  # a set-up reply's signed keys, relayed with the key exchange
            if not reply.has_error() and RecordKey.SHARE_SIGNATURE in reply.content.config_records:
                signed = reply.content.config_records[RecordKey.SHARE_SIGNATURE].get("signed")
                self.signatures[str(reply.metadata.src_node_id)] = signed
        return replies

    def _with_views(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """The consistency stage (:mod:`~flower_split.flower.sharing_views`): every unmask message's
        lists go to its tenant first; the unmask messages then carry the tenants' signed views."""
        probes = []
        for message in messages:
            lists = message.content.config_records[RECORD_KEY_CONFIGS]
            probes.append(Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
                Key.STAGE: CONSISTENCY_STAGE, Key.ACTIVE_NODE_ID_LIST: list(lists[Key.ACTIVE_NODE_ID_LIST]),
                Key.DEAD_NODE_ID_LIST: list(lists[Key.DEAD_NODE_ID_LIST])})}),
                dst_node_id=message.metadata.dst_node_id, message_type=message.metadata.message_type,
                group_id=message.metadata.group_id))
        self.report.round_trips += 1
        self.report.bytes_to_tenants += sum(record_bytes(m.content) for m in probes)
        replies = [r for r in self.grid.send_and_receive(probes, timeout=timeout) if not r.has_error()]
        self.report.bytes_from_tenants += sum(record_bytes(r.content) for r in replies)
        views = {str(r.metadata.src_node_id): r.content.config_records[RecordKey.SHARE_VIEW]["signed"]
                 for r in replies if "signed" in r.content.config_records.get(RecordKey.SHARE_VIEW, {})}
        for message in messages:
            message.content.config_records[RecordKey.SHARE_VIEWS] = ConfigRecord(views)
        return messages

    def _with_signatures(self, message: Message, stage: str | None) -> Message:
        """A set-up message with the mask generator's name, a share-keys message with the
        participants' signatures (the tenants check them against their pins)."""
        if stage == Stage.SETUP:
            message.content.config_records[RecordKey.SHARE_PRG] = ConfigRecord({"prg": PRG_NAME})
        if stage != Stage.SHARE_KEYS:
            return message
        configs = message.content.config_records[RECORD_KEY_CONFIGS]
        relayed = {nid: self.signatures[nid] for nid in configs if nid in self.signatures}
        message.content.config_records[RecordKey.SHARE_SIGNATURES] = ConfigRecord(relayed)
        return message

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def set_run(self, run: Any) -> None: ...

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


class _Collect(Strategy):
    """The legacy strategy SecAgg+'s workflow calls: ``configure_fit`` selects the round's
    tenants with our instruction, ``aggregate_fit`` keeps the unmasked aggregate."""

    def __init__(self, proxies: list[GridClientProxy], config: dict[str, Any]) -> None:
        self.proxies, self.config = proxies, config
        self.aggregate: list[np.ndarray] | None = None
        self.included: list[int] = []
        self.failures: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in self.proxies]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
        self.included = [proxy.node_id for proxy, _ in results]
        self.failures = list(failures)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


MEAN_LIMIT = 64.0
"""|value| of an averaged parameter beyond which the mean is not loaded. A failed truncation puts
~2^32 into one tenant's halves; the sum mod 2^31 that SecAgg+ returns wraps it to a value spread
over +-2^14 / n (:func:`~flower_split.flower.sharing_params.lift_tenant_sum`), so the check catches
it with probability ~1 - 64 n / 2^14 (96 % for 10 tenants). Measured tail and classifier weights
stay below 1 (MiniLM, Banking77, two secure rounds of tenant 3 at the headline learning rates)."""


class SecAggSharing:
    """The sharing phase of a split strategy (``share`` scope, SecAgg+ threshold fraction)."""

    def __init__(self, security: str, scope: str, threshold: float, timeout: float | None) -> None:
        self.security, self.scope = security, scope
        self.names = shared_names(security, scope)
        self.threshold, self.timeout = threshold, timeout
        self.quantization = quantization(security)

    def __call__(self, strategy: Any, grid: Grid, server_round: int, tenants: list[str],
                 final: bool = False) -> ShareReport:
        """Average the shared parameters of ``tenants`` (those that finished the round); after the
        ``final`` round, nothing for a :data:`FINE_TUNED_COPY` scope."""
        report = ShareReport(server_round)
        if final and self.scope in FINE_TUNED_COPY:
            log(INFO, "sharing, round %d (the last): none; each tenant keeps its fine-tuned copy", server_round)
            return report
        started = time.perf_counter()
        nodes = {t: n for n, t in strategy.tenant_of.items() if t in tenants}
        if halves(self.security):  # the cloud's halves of a tenant with a load pending are not its model's
            for tenant in [t for t in nodes if strategy.cloud.tenants[t].pending_load is not None]:
                report.dropped[tenant] = "its last sharing load is still pending (no begin since)"
                del nodes[tenant]
        if len(nodes) < 2:
            log(INFO, "sharing, round %d: %d tenant(s), SecAgg+ needs 2: no sharing", server_round, len(nodes))
            return report
        counting = _CountingGrid(grid, report)
        collect = self._secure_aggregate(counting, nodes, server_round, report)
        retry = {t: n for t, n in nodes.items() if n not in counting.dropped}
        if collect.aggregate is None and 2 <= len(retry) < len(nodes):
            # a drop-out before SecAgg+'s share-keys stage ended halts the workflow (no one holds
            # its key shares): once more without the tenants that stopped answering
            log(WARNING, "sharing, round %d: SecAgg+ halted; again without %s", server_round,
                ", ".join(sorted(set(nodes) - set(retry))))
            collect = self._secure_aggregate(counting, retry, server_round, report)
        if collect.aggregate is not None and len(collect.included) >= 2:
            content, largest = self._load_contents(strategy, collect)
            if largest <= MEAN_LIMIT:
                self._load(strategy, counting, content, server_round, report)
            else:
                log(WARNING, "sharing, round %d: the mean is out of range (|max| %.3g > %g): a tenant's parameters "
                    "hold garbage (a failed truncation, docs/secure.md); not loaded, every tenant keeps its own",
                    server_round, largest, MEAN_LIMIT)
        for tenant, node in nodes.items():
            if tenant not in report.tenants and tenant not in report.pending:
                report.dropped.setdefault(tenant, "not in the SecAgg+ aggregate (dropped out or halted)")
        report.seconds = time.perf_counter() - started
        log(INFO, "sharing, round %d: %s averaged over %d tenants (threshold %d), %d round trips, %.1f KiB to "
            "tenants, %.1f KiB back, %.1f s", server_round, self.scope, len(report.tenants), report.threshold,
            report.round_trips, report.bytes_to_tenants / 1024, report.bytes_from_tenants / 1024, report.seconds)
        return report

    def _secure_aggregate(self, grid: Grid, nodes: dict[str, int], server_round: int,
                          report: ShareReport) -> _Collect:
        """Flower's SecAgg+ workflow over ``nodes``; the aggregate stays in the returned strategy."""
        proxies = [GridClientProxy(node, grid, 0) for node in nodes.values()]
        collect = _Collect(proxies, {ConfigKey.SHARE: self.scope, ConfigKey.SERVER_ROUND: server_round})
        manager = SimpleClientManager()
        for proxy in proxies:
            manager.register(proxy)
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                            MAIN_PARAMS_RECORD: ArrayRecord()})
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                                ServerConfig(num_rounds=1), collect, manager)
        q = self.quantization
        report.threshold = reconstruction_threshold(self.threshold, len(nodes))
        workflow = SecAggPlusWorkflow(1.0, report.threshold, max_weight=1.0, clipping_range=q.clipping_range,
                                      quantization_range=q.quantization_range, modulus_range=q.modulus_range,
                                      timeout=self.timeout)
        try:
            workflow(grid, context)
        except (ValueError, KeyError, TypeError) as exc:  # e.g. shares that do not combine: a tenant's garbage
            log(WARNING, "sharing, round %d: SecAgg+ failed (%s: %s); no aggregate this attempt", server_round,
                type(exc).__name__, exc)
            collect.aggregate = None
        return collect

    def _load_contents(self, strategy: Any, collect: _Collect) -> tuple[dict[int, RecordDict], float]:
        """Every included tenant's ``share_load`` content (secure: the cloud's halves are averaged here),
        and the largest |value| of the mean (what the cloud learns anyway; inf if not finite)."""
        count = len(collect.included)
        config = ConfigRecord({ConfigKey.SHARE: self.scope, ConfigKey.SHARE_COUNT: count})
        arrays = [np.asarray(a) for a in collect.aggregate or []]
        if halves(self.security):
            tenants = [strategy.tenant_of[n] for n in collect.included]
            cloud = [strategy.cloud.tenants[t].halves for t in tenants]
            frac_bits = cloud[0].frac_bits
            tenant_sums, cloud_means = [], {}
            means = []
            for name, aggregate in zip(self.names, arrays):
                cloud_sum = ring_sum([h.weights[name] for h in cloud])
                tenant_sums.append(lift_tenant_sum(decode_sum(aggregate, count), cloud_sum))
                cloud_means[name] = average_half(cloud_sum, count, 0, frac_bits)
                means.append(decode(tenant_sums[-1] + cloud_sum, frac_bits) / count)  # what the cloud learns
            self._cloud_means = cloud_means
            arrays = [t.numpy() for t in tenant_sums]
        else:
            arrays = [a.astype(np.float32) for a in arrays]
            means = [torch.from_numpy(a) for a in arrays]
        largest = max((float(m.abs().max()) if bool(torch.isfinite(m).all()) else float("inf")) for m in means)
        record = ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in zip(self.names, arrays)})
        return {node: RecordDict({RecordKey.CONFIG: ConfigRecord(dict(config)), RecordKey.SHARED: record})
                for node in collect.included}, largest

    def _load(self, strategy: Any, grid: Grid, contents: dict[int, RecordDict], server_round: int,
              report: ShareReport) -> None:
        """``train.share_load`` to every included tenant. Secure: each load is numbered and the
        cloud keeps its mean halves as the tenant's pending load, saved before any is sent; an
        acknowledgement completes it on the cloud's side; a load whose reply did not come stays
        pending until the tenant's next begin says whether it loaded
        (:meth:`~flower_split.protocol.secure_cloud_tenant.CloudTenant.settle_load`), so the
        halves stay a consistent pair whatever is lost, and a tenant never returns to a model
        it has shared."""
        secure = halves(self.security)
        if secure:
            for node, content in contents.items():
                record = strategy.cloud.tenants[strategy.tenant_of[node]]
                content[RecordKey.CONFIG][ConfigKey.SHARE_LOADS] = record.offer_load(self._cloud_means)
            strategy.save_now()  # a restart from here on finds every load pending, none lost
        messages = [Message(content=c, dst_node_id=n, message_type=MessageType.SHARE_LOAD, group_id=str(server_round))
                    for n, c in contents.items()]
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=self.timeout)}
        for node in sorted(contents):
            tenant, reply = strategy.tenant_of[node], replies.get(node)
            if reply is None and secure:
                report.pending.append(tenant)
                log(WARNING, "sharing: no reply from %s to its load; completed at its next begin if it loaded", tenant)
                continue
            if reply is None:
                report.dropped[tenant] = f"{MessageType.SHARE_LOAD}: no reply"
            elif reply.has_error():
                report.dropped[tenant] = f"{MessageType.SHARE_LOAD}: {reply.error.reason}"
            elif secure:
                record = strategy.cloud.tenants[tenant]
                number = contents[node][RecordKey.CONFIG][ConfigKey.SHARE_LOADS]
                try:  # the ack carries the tenant's count after the load
                    record.settle_load(config_value(read_record(reply.content, RecordKey.CONFIG, ConfigRecord),
                                                    ConfigKey.SHARE_LOADS, int, MessageType.SHARE_LOAD))
                except ProtocolError as exc:
                    report.dropped[tenant] = f"{MessageType.SHARE_LOAD}: {exc}"
                if record.halves.loads == number:
                    report.tenants.append(tenant)
                else:
                    report.dropped.setdefault(tenant, f"{MessageType.SHARE_LOAD}: the reply says not loaded")
            else:
                report.tenants.append(tenant)
            if tenant in report.dropped:
                log(WARNING, "sharing: %s did not load the aggregate: %s", tenant, report.dropped[tenant])
        if secure:
            strategy.save_now()
        report.tenants.sort()


def reconstruction_threshold(fraction: float, tenants: int) -> int:
    """SecAgg+'s threshold for ``tenants``: ``round(fraction * tenants)``, but more than half of
    them (the tenants refuse less: :mod:`~flower_split.flower.sharing_policy`) and at least 2."""
    return max(2, tenants // 2 + 1, round(fraction * tenants))


def make_sharing(security: str, scope: str, threshold: float, timeout: float | None) -> SecAggSharing | None:
    """The sharing phase for run config ``share`` (None: ``share = "none"``)."""
    return None if scope == "none" else SecAggSharing(security, scope, threshold, timeout)
