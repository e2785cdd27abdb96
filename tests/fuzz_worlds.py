"""Tiny protocol worlds to fuzz, and the oracle that classifies what a mutated message did.

A world is every party of one protocol (plain: two tenants and the cloud; secure: two
tenants, the cloud and the dealer) and a script of :class:`Event` s: each delivers one
message (taken from the world's mailbox ``box``) to one party's method and puts the reply
back in the box. :func:`control_run` runs the script once, keeping a snapshot of the world
before every event and the result at the end. :func:`check_case` restores the snapshot of
event ``k``, delivers the mutated messages to its receiver and classifies each:

``rejected``   a :class:`ProtocolError`, and the receiver's state digest is unchanged;
``accepted``   no error; the rest of the script then runs (a later delivery may be refused
               with a ProtocolError), every step in flight is aborted, and each tenant runs
               a correct step: the other tenant must complete it and keep a sane model; the
               fuzzed tenant completes it with a sane model, or is refused with a
               ProtocolError (``refused_after``: the accepted message was a well-formed lie
               the tenant's peer cannot detect, such as another valid set-up);
``corrupted``  a rejected message changed the receiver's state, or after it the genuine
               message and the rest of the script no longer reach the control result; or an
               accepted one left a party that cannot serve a correct step or holds no sane model;
``crashed``    any other exception, at the delivery or after an accepted message.

After the mutated messages the genuine message is delivered (optionally twice: the
duplicate must be rejected or change nothing) and the script runs to its end: its result
must match the control run's (exactly in plain mode; within fixed-point and CKKS noise in
secure mode, whose shares are fresh randomness in every run).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from fuzz_strategies import Mutation, digest, mutate

from flower_split.protocol import ProtocolError

REJECTED, ACCEPTED, CORRUPTED, CRASHED = "rejected cleanly", "accepted harmlessly", "corrupted state", "crashed"
OUTCOMES = (REJECTED, ACCEPTED, CORRUPTED, CRASHED)


@dataclass(frozen=True)
class Event:
    """Deliver ``box[src]`` to party ``receiver`` with ``call``; the reply goes to ``box[dst]``.

    ``src`` None: an internal action (no message in, nothing to fuzz). ``free``: slot names
    whose values are arbitrary by design (seeds, ring shares): mutated in type and shape only.
    """

    name: str
    receiver: str
    src: str | None
    dst: str | None
    call: Callable[[Any, Any], Any]
    free: tuple[str, ...] = ()
    fuzz: bool = True
    tenant: str = "t0"  # whose conversation the event belongs to
    declaration: bool = False  # the tenant declares its own set-up: a well-formed lie is its own loss


@dataclass
class Outcome:
    verdict: str
    event: str
    label: str
    detail: str = ""
    refused_after: bool = False


@dataclass(frozen=True)
class Duplicate:
    """Deliver the genuine message, then the same message again."""


@dataclass(frozen=True)
class Swap:
    """Deliver another message of the control trace instead (stage order, replays, another tenant)."""

    index: int


@dataclass(frozen=True)
class Given:
    """Deliver ``make(genuine)`` instead (the regression tests name their bad message this way)."""

    make: Callable[[Any], Any]
    label: str = "given"


Input = Mutation | Duplicate | Swap | Given


class World:
    """Base of the plain and secure worlds (see the module docstring)."""

    tenants: tuple[str, ...] = ("t0", "t1")

    def __init__(self) -> None:
        self.box: dict[str, Any] = {}
        self.events: list[Event] = []

    # subclasses: parties, state, snapshots, recovery
    def party_state(self, name: str) -> Any:
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, snap: dict[str, Any]) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError

    def matches(self, control: Any, result: Any) -> str | None:
        """None if ``result`` matches ``control``, else what differs."""
        raise NotImplementedError

    def recover(self) -> None:
        """Abort every step in flight (as a transport does for a dropped tenant)."""
        raise NotImplementedError

    def correct_step(self, tenant: str) -> None:
        """One correct training step of ``tenant`` after :meth:`recover`; raises if it cannot."""
        raise NotImplementedError

    def sane(self, tenant: str) -> str | None:
        """None if ``tenant``'s model is finite and in range, else what is wrong."""
        raise NotImplementedError

    def digest(self, name: str) -> str:
        return digest(self.party_state(name))

    def deliver(self, event: Event, message: Any) -> Any:
        reply = event.call(self, message)
        if event.dst is not None:
            self.box[event.dst] = reply
        return reply

    def run(self, start: int, tolerate: bool = False) -> None:
        """Run the script from event ``start``; with ``tolerate`` a refused delivery is skipped."""
        for event in self.events[start:]:
            if event.src is not None and event.src not in self.box:
                continue  # its message was never sent: an earlier delivery was refused
            try:
                self.deliver(event, self.box.get(event.src) if event.src else None)
            except ProtocolError:
                if not tolerate:
                    raise


@dataclass
class Control:
    snapshots: list[dict[str, Any]]
    result: Any
    trace: list[tuple[str, Any]] = field(default_factory=list)  # (event name, message) of every delivery


def control_run(world: World) -> Control:
    snapshots, trace = [], []
    for event in world.events:
        snapshots.append(world.snapshot())
        message = world.box.get(event.src) if event.src else None
        if event.src:
            trace.append((event.name, message))
        world.deliver(event, message)
    return Control(snapshots, world.result(), trace)


def fuzzable(world: World) -> list[int]:
    return [k for k, e in enumerate(world.events) if e.src is not None and e.fuzz]


# ---------------------------------------------------------------------------------------------
# the oracle


def _short(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}: {str(exc)[:160]}{where}"


def _materialize(world: World, control: Control, event: Event, genuine: Any, item: Input) -> tuple[Any, str] | None:
    if isinstance(item, Mutation):
        return mutate(genuine, item, event.free)
    if isinstance(item, Given):
        return item.make(genuine), item.label
    if isinstance(item, Swap):
        name, message = control.trace[item.index % len(control.trace)]
        if message is genuine:
            return None
        return message, f"swap<-{name}"
    return None


def _after_acceptance(world: World, k: int, event: Event, reply: Any, label: str) -> Outcome:
    """The rest of the script, recovery and a correct step per tenant, after an accepted message."""
    try:
        if event.dst is not None:
            world.box[event.dst] = reply
        world.run(k + 1, tolerate=True)
        world.recover()
        for tenant in world.tenants:
            if tenant == event.tenant:
                continue
            world.correct_step(tenant)
            problem = world.sane(tenant)
            if problem:
                return Outcome(CORRUPTED, event.name, label, f"tenant {tenant}: {problem}")
        try:
            world.correct_step(event.tenant)
        except ProtocolError as exc:
            return Outcome(ACCEPTED, event.name, label, f"tenant then refused: {str(exc)[:120]}", refused_after=True)
        problem = world.sane(event.tenant)
        if problem and event.declaration:  # e.g. another learning rate than the tenant really uses
            return Outcome(ACCEPTED, event.name, label, f"declared set-up is not the tenant's: {problem}",
                           refused_after=True)
        if problem:
            return Outcome(CORRUPTED, event.name, label, problem)
        return Outcome(ACCEPTED, event.name, label)
    except ProtocolError as exc:
        return Outcome(CORRUPTED, event.name, label, f"a correct step fails afterwards: {_short(exc)}")
    except Exception as exc:  # noqa: BLE001 - classified, not hidden
        return Outcome(CRASHED, event.name, label, f"after acceptance: {_short(exc)}")


def _try(world: World, k: int, event: Event, message: Any, label: str) -> Outcome:
    before = world.digest(event.receiver)
    snap = world.snapshot()
    try:
        try:
            reply = event.call(world, message)
        except ProtocolError as exc:
            if world.digest(event.receiver) != before:
                return Outcome(CORRUPTED, event.name, label, f"rejected ({str(exc)[:100]}) but the state changed")
            return Outcome(REJECTED, event.name, label, str(exc)[:160])
        except Exception as exc:  # noqa: BLE001 - classified, not hidden
            return Outcome(CRASHED, event.name, label, _short(exc))
        return _after_acceptance(world, k, event, reply, label)
    finally:
        world.restore(snap)


def _duplicate(world: World, k: int, event: Event, message: Any) -> Outcome:
    """The genuine message was just delivered; deliver it again."""
    before = world.digest(event.receiver)
    snap = world.snapshot()
    try:
        event.call(world, message)
    except ProtocolError as exc:
        verdict = REJECTED if world.digest(event.receiver) == before else CORRUPTED
        world.restore(snap)
        return Outcome(verdict, event.name, "duplicate", str(exc)[:160])
    except Exception as exc:  # noqa: BLE001
        world.restore(snap)
        return Outcome(CRASHED, event.name, "duplicate", _short(exc))
    unchanged = world.digest(event.receiver) == before
    world.restore(snap)
    if unchanged:
        return Outcome(ACCEPTED, event.name, "duplicate", "idempotent")
    return Outcome(CORRUPTED, event.name, "duplicate", "a second copy was accepted and changed the state")


def check_case(world: World, control: Control, k: int, inputs: list[Input]) -> list[Outcome]:
    """Deliver ``inputs`` at event ``k`` (see the module docstring); one outcome per input tried."""
    world.restore(control.snapshots[k])
    event = world.events[k]
    genuine = world.box[event.src]
    outcomes: list[Outcome] = []
    for item in inputs:
        if isinstance(item, Duplicate):
            continue
        made = _materialize(world, control, event, genuine, item)
        if made is not None:
            outcomes.append(_try(world, k, event, *made))
    try:
        world.deliver(event, genuine)
        if any(isinstance(item, Duplicate) for item in inputs):
            outcomes.append(_duplicate(world, k, event, genuine))
        world.run(k + 1)
        problem = world.matches(control.result, world.result())
    except Exception as exc:  # noqa: BLE001
        problem = f"the genuine continuation fails: {_short(exc)}"
    if problem:
        for outcome in outcomes:
            if outcome.verdict in (REJECTED, ACCEPTED):
                outcome.verdict, outcome.detail = CORRUPTED, f"{problem} (after {outcome.label})"
    return outcomes


def event_index(world: World, name: str, tenant: str = "t0", nth: int = 0) -> int:
    """Index of the ``nth`` fuzzable event called ``name`` (prefix) of ``tenant``."""
    found = [k for k in fuzzable(world) if world.events[k].name.startswith(name) and world.events[k].tenant == tenant]
    return found[nth]
