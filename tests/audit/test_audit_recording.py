"""Recording the cloud's view in process (split-plain and secure), the transcript files, and the
``train --audit`` / ``audit --run`` commands, on the tiny model and a few dozen samples."""

from __future__ import annotations

import json

import pytest
import torch

from flower_split.api import train
from flower_split.audit import CloudViewRecorder, TranscriptError, load_transcript
from flower_split.cli import QUICK, main
from flower_split.config import ConfigError, RunConfig
from flower_split.model import load_encoder, split_encoder

TINY = {**QUICK, "epochs": 1, "max_train_samples": 24, "max_test_samples": 8, "batch_size": 8, "device": "cpu"}


def recorded(tmp_path, **overrides) -> tuple[CloudViewRecorder, object]:
    recorder = CloudViewRecorder()
    train(RunConfig(**{**TINY, **overrides}), progress=False, recorder=recorder)
    recorder.save(tmp_path)
    return recorder, load_transcript(tmp_path)


def test_plain_run_records_f_grad_and_truth_and_round_trips(tmp_path) -> None:
    recorder, transcript = recorded(tmp_path)
    live = recorder.transcript()
    assert [v.train for v in transcript.views] == [True] * 3 + [False]  # 24 train rows, 8 test rows
    first, truth = transcript.views[0], transcript.truth[0]
    embedder, _ = split_encoder(load_encoder("tiny", seed=0))
    real = first.attention_mask.unsqueeze(-1).to(first.f.dtype)  # f travels at the real tokens only
    torch.testing.assert_close(first.f, embedder(truth.input_ids) * real)  # the head starts as identity: f = e
    # the default pooled tail: the cloud sends h pooled and gets dL/d(pooled h) [B, d]; no logits
    assert first.grad_h.shape == (first.f.shape[0], first.f.shape[2]) and first.z is None
    assert transcript.views[-1].grad_h is None  # inference: no gradient
    assert truth.labels.shape == (8,) and transcript.meta["num_classes"] == 77
    for saved, kept in zip(transcript.views, live.views):
        for name in ("f", "attention_mask", "grad_h"):
            a, b = getattr(saved, name), getattr(kept, name)
            assert (a is None and b is None) or torch.equal(a, b)


def test_plain_run_with_a_per_token_tail_records_the_gradient_per_token(tmp_path) -> None:
    _, transcript = recorded(tmp_path, tail_input="tokens")
    first = transcript.views[0]
    assert first.grad_h.shape == first.f.shape


@pytest.mark.parametrize("protection", ["he", "client"])
def test_secure_run_records_what_the_cloud_decodes(tmp_path, protection: str) -> None:
    _, transcript = recorded(tmp_path, security="secure", label_protection=protection, max_train_samples=16)
    train_views = [v for v in transcript.views if v.train]
    assert len(train_views) == 2
    embedder, _ = split_encoder(load_encoder("tiny", seed=0))
    first, truth = train_views[0], transcript.truth[0]
    # f is opened to the cloud in fixed point (16 fractional bits): e up to rounding, at the real
    # tokens (the head's 2PC skips padding; the cloud's body gets 0 there)
    real = first.attention_mask.bool()
    torch.testing.assert_close(first.f[real], embedder(truth.input_ids)[real], atol=1e-3, rtol=0)
    assert not first.f[~real].any()
    assert first.grad_h is not None and float(first.grad_h.abs().max()) > 0
    assert (first.z is not None) == (protection == "he")  # the logits reach the cloud only in he mode
    assert transcript.meta["label_protection"] == protection


@pytest.mark.parametrize("tail_input", ["tokens", "pooled"])
def test_recorded_secure_gradient_is_in_plain_units(tail_input: str, tmp_path) -> None:
    """Secure dL/dh is opened scaled by 2^grad_scale_bits; the recorder divides the public scale out.
    With a pooled tail both open it per sequence, the gradient of the pooled input."""
    same_start = {"max_train_samples": 8, "insecure_reproducible_init": True,  # both runs from one adapter start
                  "tail_input": tail_input}
    _, plain = recorded(tmp_path / "plain", **same_start)
    _, secure = recorded(tmp_path / "secure", security="secure", label_protection="client", **same_start)
    a, b = plain.views[0].grad_h, secure.views[0].grad_h
    assert a.dim() == b.dim() == (2 if tail_input == "pooled" else 3) and a.shape == b.shape
    torch.testing.assert_close(b, a, atol=2e-3 * float(a.abs().max()) + 1e-4, rtol=0.05)


def test_missing_transcript_is_a_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(TranscriptError, match="transcript.json"):
        load_transcript(tmp_path)
    assert main(["audit", "--run", str(tmp_path), "--no-progress"]) == 2
    assert "train --audit" in capsys.readouterr().err
    (tmp_path / "transcript.json").write_text('{"format": "other"}')
    (tmp_path / "cloud_view.safetensors").write_bytes(b"")
    (tmp_path / "ground_truth.safetensors").write_bytes(b"")
    with pytest.raises(TranscriptError, match="format"):
        load_transcript(tmp_path)


def test_audit_needs_a_split_run() -> None:
    with pytest.raises(ConfigError, match="^audit:"):
        train(RunConfig(**{**TINY, "mode": "centralized"}), progress=False, recorder=CloudViewRecorder())


def test_cli_train_audit_writes_transcript_and_audit(tmp_path) -> None:
    argv = ["train", "--quick", "--epochs", "1", "--set", "max_train_samples=24", "--set", "max_test_samples=8",
            "--audit", "--public-data", "none", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["format"] == "flower-split-audit/1" and report["public_text"] is None
    f = report["leak_points"]["f"]
    assert f["attacks"]["nearest_token"]["first_step"] > 0.99  # identity head at step 0
    assert report["leak_points"]["grad_h"]["examples"] == 24
    assert report["leak_points"]["z"] == {"seen": False}
    (tmp_path / "audit.json").unlink()
    assert main(["audit", "--run", str(tmp_path), "--public-data", "none", "--no-progress"]) == 0
    assert json.loads((tmp_path / "audit.json").read_text())["leak_points"]["f"] == f
