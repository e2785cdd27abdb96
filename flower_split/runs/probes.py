"""The comparison's ``probes`` run: linear probes on the frozen body as reference rows.

Two ``results.json`` entries on the comparison's own tenants and test splits
(:mod:`flower_split.train.probes`): ``probe-own-data`` (each tenant's probe on its own rows: the
ceiling of a model that learns from one tenant's rows only, with these features) and
``probe-pooled`` (one probe on all tenants' rows, i.e. pooled data). Costs: process CPU
seconds of the frozen body's forward pass over the rows (each tenant's share is its own rows')
plus the probe fitting (L-BFGS with the L2 strength chosen on a held-out fifth).
"""

from __future__ import annotations

import time
from typing import Any

from flower_split.config import RunConfig


def _features(config: RunConfig, splits: Any, progress: bool) -> tuple[dict, float]:
    from flower_split.data import TokenizedDataset
    from flower_split.model import load_tokenizer
    from flower_split.train.probes import pooled_features

    tokenizer = load_tokenizer(config.model)
    started = time.process_time()
    features = {name: pooled_features(config.model, TokenizedDataset(data, tokenizer, config.max_length),
                                      progress=progress, seed=config.seed)
                for name, data in (("train", splits.train), ("test", splits.test))}
    return features, time.process_time() - started


def run_probes(config: RunConfig, partition: str, num_clients: int, threads: int = 1,
               progress: bool = True) -> list[dict]:
    """The ``probe-own-data`` and ``probe-pooled`` run entries."""
    import torch

    from flower_split.data.tenants import tenant_splits
    from flower_split.train.probes import tenant_probes

    if progress:
        print(f"[probes] linear probes on the frozen body, {num_clients} tenants, {threads} torch thread(s) ...",
              flush=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        splits = tenant_splits(config, partition, num_clients)
        features, feature_cpu = _features(config, splits, progress)
        probes = tenant_probes(splits, features, config.seed)
    finally:
        torch.set_num_threads(before)
    wall = time.perf_counter() - started
    rows = len(splits.train) + len(splits.test)
    share = {tenant: feature_cpu * (probes.train_rows[tenant] + probes.test_rows[tenant]) / rows
             for tenant in probes.test_rows}
    entries = []
    for kind, name in (("own", "probe-own-data"), ("pooled", "probe-pooled")):
        scores = probes.scores[kind]
        if kind == "own":
            per_tenant_cpu = {t: share[t] + scores.cpu_seconds[t] for t in probes.test_rows}
        else:  # one probe on pooled rows: all the features and the fit, shared out evenly
            per_tenant_cpu = {t: (feature_cpu + sum(scores.cpu_seconds.values())) / num_clients
                              for t in probes.test_rows}
        total_cpu = sum(per_tenant_cpu.values())
        entries.append({
            "name": name, "mode": "reference", "strategy": "probe", "security": "none",
            "dataset": config.dataset, "model": config.model,
            "test_accuracy": scores.weighted(probes.test_rows),
            "test_macro_f1": scores.weighted_f1(probes.test_rows),
            "global_test_accuracy": probes.pooled_whole_test if kind == "pooled" else None,
            "global_test_macro_f1": None,
            "per_tenant_accuracy": dict(scores.accuracy), "per_tenant_macro_f1": dict(scores.macro_f1),
            "per_tenant_test_examples": dict(probes.test_rows),
            "train_loss_history": [], "wall_seconds": wall, "client_cpu_seconds": total_cpu,
            "client_train_cpu_seconds": total_cpu, "client_cpu_seconds_per_tenant": total_cpu / num_clients,
            "per_tenant_client_cpu_seconds": per_tenant_cpu, "train_examples_processed": rows,
            "client_cpu_seconds_per_sample": total_cpu / rows if rows else None,
            "bytes_client_to_cloud": 0, "bytes_cloud_to_client": 0, "bytes_per_client_per_round": 0,
            "round_trips_per_step": 0.0, "rounds": [], "num_clients": num_clients, "partition": partition,
            "weight_decays": {t: wd for t, wd in probes.weight_decays.items() if (t == "pooled") == (kind == "pooled")},
            "torch_threads": threads, "config": config.to_dict(),
        })
        if progress:
            print(f"[{name}] per-tenant accuracy {entries[-1]['test_accuracy']:.4f}", flush=True)
    return entries
