"""Audit a run directory: load its transcript and the public model, run the attacks, write ``audit.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flower_split.audit.inversion import SpecialTokens
from flower_split.audit.report import AuditOptions, run_audit
from flower_split.audit.transcript import TranscriptError, load_transcript
from flower_split.data import load_dataset
from flower_split.model import load_encoder, load_tokenizer, split_encoder

AUDIT_FILE = "audit.json"


def public_corpus(tokenizer: object, dataset: str, sentences: int, max_length: int, seed: int,
                  data_dir: str | None = None) -> list[list[int]]:
    """Token ids of ``sentences`` public training texts (``sst2`` by default), a seeded sample."""
    texts = load_dataset(dataset, data_dir)[0].texts
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:sentences].tolist()
    return tokenizer([texts[i] for i in order], truncation=True, max_length=max_length)["input_ids"]


def audit_directory(directory: str | Path, public: str | None = "sst2", public_sentences: int = 3000,
                    public_dir: str | None = None, options: AuditOptions = AuditOptions(),
                    progress: bool = True) -> Path:
    """Run the audit on the transcript recorded in ``directory``; write and return ``audit.json``.

    ``public`` names the public text the inverters train on (a data set name or directory;
    ``None`` skips the inverters). Raises :class:`TranscriptError` when no transcript is there,
    ``DatasetError`` when the public text is missing.
    """
    transcript = load_transcript(directory)
    meta = transcript.meta
    if "model" not in meta:
        raise TranscriptError(f"{directory}: transcript.json has no meta.model; cannot rebuild the public embedder")
    tokenizer = load_tokenizer(meta["model"])
    embedder, _ = split_encoder(load_encoder(meta["model"], seed=int(meta.get("seed", 0))))
    special = SpecialTokens(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    corpus = None
    if public is not None and options.inverters:
        corpus = public_corpus(tokenizer, public, public_sentences, int(meta.get("max_length", 64)), options.seed,
                               public_dir)
    report = run_audit(transcript, embedder, special, set(tokenizer.all_special_ids), corpus, options, progress)
    report["public_text"] = None if corpus is None else {"dataset": public, "sentences": len(corpus)}
    path = Path(directory) / AUDIT_FILE
    path.write_text(json.dumps(report, indent=2))
    return path
