"""Secure vs plain split training step: wall time, bytes and rounds per step, on the same batch.

For each model (``tiny``, ``minilm``) it builds the split once, takes one Banking77 batch,
and runs the same training step repeatedly with the split-plain parties and with the
secure parties (``client`` and ``he`` label protection), all in process (no network:
times are compute only; add your transport's latency times the rounds). Reported per step
(median over repetitions, after one warm-up step):

* wall ms, and how it splits between client, cloud and dealer (secure);
* CPU ms: the process CPU time of the whole step (all parties) and, secure, of the client's
  calls alone; with 1 thread these measure the work whatever else loads the machine;
* bytes client -> cloud and cloud -> client, and dealer -> cloud (secure);
* rounds: client -> cloud messages per step (each answered by the cloud, except the last);
  messages cloud -> client.

With ``--matmuls`` it also times every exact ring matmul (the Beaver products on both
parties and the dealer's triples) by operand shape, to show where the 2PC time goes. With
``--items`` it lists the bytes of every item a secure step moves between client and cloud
(the last step, both directions), largest first, to show where the bytes go.
``--set KEY=VALUE`` overrides a RunConfig field for every protocol (e.g. ``tail_bottleneck=64``,
``tail_input=pooled``; the split is built with the config's ``tail_input``).

Usage: ``python simulations/bench_secure_step.py [--models tiny minilm] [--batch 32] [--reps 5]
[--matmuls] [--items] [--set tail_bottleneck=64]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections import defaultdict
from typing import Iterator

import torch

from flower_split.config import parse_set
from flower_split.config import RunConfig
from flower_split.mpc import beaver, triples
from flower_split.data import TokenizedDataset, load_dataset
from flower_split.model import build_split, load_tokenizer
from flower_split.protocol import ClientParty, CloudParty
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.transport.secure_inprocess import SecureLocalTransport
from flower_split.transport import InProcessTransport

SHAPES = {"tiny": dict(head_rank=8, tail_bottleneck=16), "minilm": dict(head_rank=64, tail_bottleneck=256)}


@contextlib.contextmanager
def ring_matmul_times() -> Iterator[dict[tuple, list[float]]]:
    """Seconds of every ring matmul by (x shape, y shape) while the block runs.

    Wraps the ``ring_matmul`` that ``beaver`` (both parties' products) and ``triples`` (the
    dealer) call; the arithmetic is the real one, only timed.
    """
    times: dict[tuple, list[float]] = defaultdict(list)
    original = beaver.ring_matmul

    def timed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        result = original(x, y)
        times[(tuple(x.shape), tuple(y.shape))].append(time.perf_counter() - start)
        return result

    beaver.ring_matmul = triples.ring_matmul = timed
    try:
        yield times
    finally:
        beaver.ring_matmul = triples.ring_matmul = original


@contextlib.contextmanager
def step_items() -> Iterator[list[tuple[str, str, tuple, int]]]:
    """(direction, item, shape, bytes) of every item of the client's messages, both ways, for the
    latest step only (a step's first message starts a new list) while the block runs."""
    items: list[tuple[str, str, tuple, int]] = []
    handle, begin = SecureClientParty.handle, SecureClientParty.begin

    def record(direction: str, message) -> None:
        for name, value in ({} if message is None else message.items).items():
            size = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else len(value)
            items.append((direction, name, tuple(getattr(value, "shape", ())), size))

    def recorded_handle(self, message):
        record("cloud->client", message)
        reply = handle(self, message)
        record("client->cloud", reply)
        return reply

    def recorded_begin(self, *args, **kwargs):
        items.clear()
        first = begin(self, *args, **kwargs)
        record("client->cloud", first)
        return first

    SecureClientParty.handle, SecureClientParty.begin = recorded_handle, recorded_begin
    try:
        yield items
    finally:
        SecureClientParty.handle, SecureClientParty.begin = handle, begin


def _batch(model: str, batch_size: int, max_length: int):
    train, _ = load_dataset("banking77")
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:batch_size].tolist()
    return TokenizedDataset(train.subset(sorted(rows)), load_tokenizer(model), max_length).collate(
        list(range(batch_size)))


def bench_plain(model: str, batch, reps: int, overrides: dict) -> dict:
    config = RunConfig(model=model, device="cpu", **{**SHAPES[model], **overrides})
    parts = build_split(model, 77, config.head_rank, config.tail_bottleneck, tail_input=config.tail_input)
    client = ClientParty("t0", parts.embedder, parts.head, parts.tail, config, total_steps=10 * (reps + 1))
    transport = InProcessTransport(CloudParty(parts.body))
    times, cpus, sizes = [], [], []
    for rep in range(reps + 1):
        before = (transport.traffic.bytes_client_to_cloud, transport.traffic.bytes_cloud_to_client,
                  transport.traffic.messages_client_to_cloud, transport.traffic.messages_cloud_to_client)
        start, cpu_start = time.perf_counter(), time.process_time()
        message = client.begin(batch)
        while message is not None:
            message = client.handle(transport.send(message))
        elapsed, cpu_step = time.perf_counter() - start, time.process_time() - cpu_start
        after = (transport.traffic.bytes_client_to_cloud, transport.traffic.bytes_cloud_to_client,
                 transport.traffic.messages_client_to_cloud, transport.traffic.messages_cloud_to_client)
        if rep:
            times.append(elapsed)
            cpus.append(cpu_step)
            sizes.append([a - b for a, b in zip(after, before)])
    up, down, rounds, replies = sizes[-1]
    return dict(wall=statistics.median(times), cpu=statistics.median(cpus), client=None, client_cpu=None,
                cloud=None, dealer=None, up=up, down=down, dealer_bytes=0, rounds=rounds, replies=replies)


def bench_secure(model: str, batch, reps: int, mode: str, overrides: dict) -> dict:
    config = RunConfig(model=model, device="cpu", security="secure", label_protection=mode,
                       **{**SHAPES[model], **overrides})
    parts = build_split(model, 77, config.head_rank, config.tail_bottleneck, tail_input=config.tail_input)
    dealer = SecureDealerParty()
    cloud = SecureCloudParty(parts.body, dealer.public)
    client = SecureClientParty("t0", parts.embedder, copy.deepcopy(parts.head), copy.deepcopy(parts.tail), config,
                               total_steps=10 * (reps + 1))
    transport = SecureLocalTransport(cloud, dealer)
    transport.connect(client)
    costs, cpu, step_cpu = [], [], []
    spent = [0.0]

    @contextlib.contextmanager
    def client_cpu() -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            spent[0] += time.process_time() - start

    for rep in range(reps + 1):
        spent[0], cpu_start = 0.0, time.process_time()
        transport.run_step(client, batch, client_clock=client_cpu)
        if rep:
            costs.append(transport.last_step)
            cpu.append(spent[0])
            step_cpu.append(time.process_time() - cpu_start)
    last = costs[-1]
    return dict(wall=statistics.median(c.seconds for c in costs), cpu=statistics.median(step_cpu),
                client=statistics.median(c.seconds_client for c in costs), client_cpu=statistics.median(cpu),
                cloud=statistics.median(c.seconds_cloud for c in costs),
                dealer=statistics.median(c.seconds_dealer for c in costs),
                up=last.bytes_client_to_cloud, down=last.bytes_cloud_to_client,
                dealer_bytes=last.bytes_dealer_to_cloud, rounds=last.messages_client_to_cloud,
                replies=last.messages_cloud_to_client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "minilm"], choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--matmuls", action="store_true", help="also time the ring matmuls by shape")
    parser.add_argument("--items", action="store_true", help="also list a secure step's bytes by item")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="RunConfig field for every protocol (repeatable), e.g. --set tail_bottleneck=64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    rows = []
    matmuls: dict[str, dict[tuple, list[float]]] = {}
    items: dict[str, list[tuple[str, str, tuple, int]]] = {}
    for model in args.models:
        batch = _batch(model, args.batch, args.max_length)
        shape = f"B={batch.input_ids.shape[0]} T={batch.input_ids.shape[1]}"
        plain = bench_plain(model, batch, args.reps, overrides)
        rows.append((model, shape, "plain", plain, 1.0))
        for mode in ("client", "he"):
            with ring_matmul_times() if args.matmuls else contextlib.nullcontext({}) as times, \
                    step_items() if args.items else contextlib.nullcontext([]) as moved:
                result = bench_secure(model, batch, args.reps, mode, overrides)
            matmuls[f"{model} secure/{mode}"] = times
            items[f"{model} secure/{mode}"] = list(moved)
            rows.append((model, shape, f"secure/{mode}", result, result["wall"] / plain["wall"]))

    def ms(value):
        return "-" if value is None else f"{1000 * value:,.1f}"

    def kib(value):
        return f"{value / 1024:,.1f}"

    header = ("| model | batch | protocol | wall ms/step | x plain | CPU ms/step | client ms | client CPU ms | "
              "cloud ms | dealer ms | client->cloud KiB | cloud->client KiB | dealer->cloud KiB | "
              "rounds (client msgs) | cloud msgs |")
    print(header)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, shape, name, r, ratio in rows:
        print(f"| {model} | {shape} | {name} | {ms(r['wall'])} | {ratio:.1f} | {ms(r['cpu'])} | {ms(r['client'])} | "
              f"{ms(r['client_cpu'])} | {ms(r['cloud'])} | "
              f"{ms(r['dealer'])} | {kib(r['up'])} | {kib(r['down'])} | {kib(r['dealer_bytes'])} | {r['rounds']} | "
              f"{r['replies']} |")
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), median of {args.reps} steps after one warm-up; "
          "in process (no network latency); cloud ms includes the body forward/backward."
          + (f" Overrides: {overrides}." if overrides else ""))
    if args.matmuls:
        _print_matmuls(matmuls, args.reps + 1)
    if args.items:
        _print_items(items)


def _print_items(items: dict[str, list[tuple[str, str, tuple, int]]]) -> None:
    """A secure step's bytes by item, largest first, with the share of the step's total."""
    print("\n| protocol | direction | item | shape | KiB | share of the step |")
    print("|---|---|---|---|---:|---:|")
    for name, moved in items.items():
        total = sum(size for *_, size in moved) or 1
        for direction, item, shape, size in sorted(moved, key=lambda row: -row[3]):
            print(f"| {name} | {direction} | {item} | {list(shape)} | {size / 1024:,.1f} | {size / total:.1%} |")
        print(f"| {name} | both | all | | {total / 1024:,.1f} | 100% |")


def _print_matmuls(matmuls: dict[str, dict[tuple, list[float]]], steps: int) -> None:
    """Ring matmul time per step by operand shape (all parties and the dealer, warm-up included)."""
    print("\n| protocol | x shape | y shape | calls/step | ms/step | share of ring matmul time |")
    print("|---|---|---|---:|---:|---:|")
    for name, times in matmuls.items():
        total = sum(sum(t) for t in times.values()) or 1.0
        for (x, y), t in sorted(times.items(), key=lambda item: -sum(item[1])):
            print(f"| {name} | {list(x)} | {list(y)} | {len(t) / steps:.0f} | {1000 * sum(t) / steps:,.1f} | "
                  f"{sum(t) / total:.0%} |")
        print(f"| {name} | all | | | {1000 * total / steps:,.1f} | 100% |")


if __name__ == "__main__":
    main()
