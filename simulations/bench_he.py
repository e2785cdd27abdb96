"""Benchmark the HE label-protection layer (flower_split.he).

For each parameter set and batch size it times the client's encryption, the cloud's
encrypted loss/gradient and the client's decryption (median over --reps runs, reported
per sample), and counts the bytes each way per sample. The cloud is timed all-in (its
randomness made on the spot), online (the randomness made ahead, as the secure cloud's
pool does while the body runs: flower_split/he/material.py) and the making alone. Sizes are SEAL's serialization
(zstd-compressed by SEAL); "raw" is the same ciphertexts at 8 bytes per coefficient.

    python simulations/bench_he.py                      # batch 32 and 256, C = 77
    python simulations/bench_he.py --reps 9 --configs default n16384
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from flower_split.he import (
    ClientKeys,
    CloudKeys,
    HEParams,
    batch_bounds,
    compute_loss_and_grad,
    decrypt_loss_and_grad,
    encrypt_labels,
    envelope_digest,
)
from flower_split.he.material import fresh_material

CONFIGS = {
    "default": HEParams(),
    "n16384": replace(HEParams(), poly_modulus_degree=16384),
    # The largest chain N = 4096 allows at 128-bit security (105 of 109 bits).
    "n4096": replace(
        HEParams(), poly_modulus_degree=4096, data_prime_bits=(40, 25, 20), special_prime_bits=20
    ),
}


def _raw_bytes(params: HEParams, batch_size: int, num_classes: int) -> tuple[int, int]:
    """Uncompressed size of the ciphertexts each way (8 bytes per coefficient residue)."""
    n = params.poly_modulus_degree
    count = batch_bounds(params, batch_size, num_classes).num_ciphertexts
    primes = len(params.data_prime_bits)
    up = count * n * primes * 8  # seeded: c0 only (c1 is a seed)
    down = 2 * n * 8 * (count * (primes - 1) + 1)  # gradient at primes-1, loss at q0
    return up, down


def _median_ms(fn, reps: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), out


def bench(name: str, params: HEParams, batch_size: int, num_classes: int, reps: int) -> dict:
    keys = ClientKeys.generate(params)
    cloud = CloudKeys.from_bytes(keys.public_bytes())
    y = torch.randint(0, num_classes, (batch_size,))
    z = 3 * torch.randn(batch_size, num_classes, dtype=torch.float64)
    t_enc, request = _median_ms(lambda: encrypt_labels(keys, y, num_classes), reps)
    t_cloud, result = _median_ms(lambda: compute_loss_and_grad(cloud, request, z), reps)
    t_material, _ = _median_ms(lambda: fresh_material(cloud, batch_size, num_classes), reps)
    ahead = iter([fresh_material(cloud, batch_size, num_classes) for _ in range(reps + 1)])
    t_online, _ = _median_ms(lambda: compute_loss_and_grad(cloud, request, z, next(ahead)), reps)
    digest = envelope_digest(request)
    t_dec, out = _median_ms(lambda: decrypt_loss_and_grad(keys, result.payload, digest), reps)

    zz = z.clone().requires_grad_(True)
    loss = F.cross_entropy(zz, y)
    loss.backward()
    total = (out.grad_share + result.grad_mask).double()
    grad_err = (total - zz.grad * 2**params.frac_bits).abs().max().item()
    raw_up, raw_down = _raw_bytes(params, batch_size, num_classes)
    bounds = batch_bounds(params, batch_size, num_classes)
    return {
        "config": name,
        "N": params.poly_modulus_degree,
        "B": batch_size,
        "cts": bounds.num_ciphertexts,
        "enc": t_enc / batch_size,
        "cloud": t_cloud / batch_size,
        "online": t_online / batch_size,
        "material": t_material / batch_size,
        "dec": t_dec / batch_size,
        "up": len(request) / batch_size / 1024,
        "down": len(result.payload) / batch_size / 1024,
        "raw_up": raw_up / batch_size / 1024,
        "raw_down": raw_down / batch_size / 1024,
        "loss_err": abs(out.loss - loss.item()),
        "grad_err": grad_err,
        "pk": len(keys.public_bytes()) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--num-classes", type=int, default=77)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.manual_seed(0)

    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"# C = {args.num_classes}, median of {args.reps} runs; KB = 1024 bytes; per-sample figures\n")
    print("| config | N | B | cts | client enc ms | cloud ms all-in | cloud ms online | cloud ms ahead "
          "| client dec ms | client->cloud KB | cloud->client KB | raw up/down KB | loss err | grad err (LSB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes: list[str] = []
    contexts: dict[str, str] = {}
    for name in args.configs:
        params = CONFIGS[name]
        for batch_size in args.batch_sizes:
            try:
                r = bench(name, params, batch_size, args.num_classes, args.reps)
            except ValueError as exc:
                row = f"| {name} | {params.poly_modulus_degree} | {batch_size} | - | infeasible"
                print(row + " |" * 10)
                notes.append(f"{name}, B={batch_size}: {exc}")
                continue
            print(
                f"| {r['config']} | {r['N']} | {r['B']} | {r['cts']} | {r['enc']:.3f} "
                f"| {r['cloud']:.3f} | {r['online']:.3f} | {r['material']:.3f} | {r['dec']:.3f} | {r['up']:.2f} | {r['down']:.2f} "
                f"| {r['raw_up']:.1f}/{r['raw_down']:.1f} | {r['loss_err']:.1e} | {r['grad_err']:.2f} |"
            )
            contexts[name] = f"{name}: public context {r['pk']:.0f} KB (sent once per tenant and key)"
    print()
    for note in [*contexts.values(), *notes]:
        print(f"- {note}")


if __name__ == "__main__":
    main()
