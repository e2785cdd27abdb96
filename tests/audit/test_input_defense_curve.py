"""``simulations/input_defense_curve.py`` on the tiny model: the body runs in pieces exactly as
whole, the attacks recover every token of the undefended view and few under overwhelming noise."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from flower_split.model import load_encoder, load_tokenizer, split_encoder

SCRIPT = Path(__file__).resolve().parents[2] / "simulations" / "input_defense_curve.py"


@pytest.fixture(scope="module")
def curve():
    spec = importlib.util.spec_from_file_location("input_defense_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_body_run_in_pieces_equals_the_body(curve) -> None:
    embedder, body = split_encoder(load_encoder("tiny", seed=0))
    corpus = curve.encode(load_tokenizer("tiny"), ["my card is lost", "why was I charged a fee twice"], [0, 1], 16)
    ids, mask = corpus.ids[0], corpus.masks[0]
    e = embedder(ids)
    blocks = curve.Blocks(body)
    with torch.no_grad():
        whole = body(e, mask.long())
    assert torch.equal(blocks.run(blocks.run(e, mask, 0, 1), mask, 1), whole)
    assert len(blocks.model.encoder.layer) == blocks.count == 2  # the layers are put back


def test_recovery_is_total_without_noise_and_small_under_large_noise(curve, tmp_path: Path) -> None:
    public = tmp_path / "public"
    public.mkdir()
    words = "the card payment was declined and my transfer has not arrived yet please help".split()
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (8,), generator=generator).tolist()) + "\t1"
             for _ in range(40)]
    for name in ("train.tsv", "dev.tsv"):
        (public / name).write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    report = curve.main(["--model", "tiny", "--train-rows", "60", "--test-rows", "20", "--attack-rows", "10",
                         "--public-sentences", "40", "--public-dir", str(public), "--noise", "0", "8",
                         "--client-layers", "--mlp-below", "0", "--out", str(tmp_path / "out"),
                         "--plot", str(tmp_path / "curve.png")])
    clean, noisy = report["points"]
    assert clean["recovery"]["nearest_token"] == clean["recovery"]["posterior"] == 1.0
    assert clean["noise_to_signal"] == 0 and clean["gdp"] is None
    assert noisy["recovery"]["nearest_token"] < 0.2 and noisy["noise_to_signal"] > 5
    assert noisy["gdp"]["nearest_p50"]["mu"] < noisy["gdp"]["any_pair"]["mu"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["points"][0]["sigma"] == 0
    assert (tmp_path / "curve.png").stat().st_size > 0
