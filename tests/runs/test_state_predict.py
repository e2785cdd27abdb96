"""A tenant keeps and uses what it trained: train -> save -> load in fresh objects -> predict.

The in-run evaluation's predicted labels are captured from the driver; a classifier loaded
from disk (new party objects, the model rebuilt, every state read back) must give the same
labels on the same texts, through the split inference protocol (secure: the 2PC protocol).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flower_split.backends.saved as saved_module
import flower_split.train.driver as driver
from flower_split.api import SplitClassifier, StateError, train
from flower_split.cli import main
from flower_split.config import RunConfig
from flower_split.data import load_dataset
from flower_split.data.tenants import sample_rows
from flower_split.state import META_FILE, cloud_dir, dealer_dir, read_party, tenant_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUNS = {"plain": dict(security="plain"), "secure-client": dict(security="secure", label_protection="client"),
        # the offset is saved with the tail (plain) or in the tenant's party state (secure)
        "plain-prior-offset": dict(security="plain", prior_offset=True),
        "secure-client-prior-offset": dict(security="secure", label_protection="client", prior_offset=True)}


def _config(**overrides) -> RunConfig:
    values = dict(model="tiny", epochs=2, batch_size=8, max_train_samples=64, max_test_samples=20, max_length=16,
                  head_rank=4, tail_bottleneck=8, lr_head=0.02, lr_tail=0.3, device="cpu")  # QUICK's stable rates
    return RunConfig(**{**values, **overrides})


def _test_texts(config: RunConfig) -> list[str]:
    _, test = load_dataset(config.dataset, config.data_dir)
    return test.subset(sample_rows(len(test), config.max_test_samples, config.seed + 1)).texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory,
            small_banking: str) -> dict[str, tuple[RunConfig, Path, torch.Tensor]]:
    """Each run trained once with its state saved, and the labels its in-run evaluation predicted
    (4 distinct intents, so that the tiny model's predictions vary)."""
    runs = {}
    original = driver.predict
    with pytest.MonkeyPatch.context() as patch:
        for name, overrides in RUNS.items():
            captured = []
            patch.setattr(driver, "predict", lambda *a, **k: captured.append(original(*a, **k)) or captured[-1])
            config = _config(dataset=small_banking, **overrides)
            root = tmp_path_factory.mktemp(name) / "state"
            train(config, progress=False, state_dir=root)
            runs[name] = (config, root, captured[-1][0])
    return runs


@pytest.mark.parametrize("name", list(RUNS))
def test_reloaded_tenant_predicts_what_the_run_evaluated(trained, name: str) -> None:
    config, root, in_run = trained[name]
    classifier = SplitClassifier.load(root)
    predictions = classifier.predict(_test_texts(config), batch_size=config.batch_size)
    assert len(set(in_run.tolist())) > 1, "a constant classifier would not test the reload"
    assert [p.index for p in predictions] == in_run.tolist()
    assert all(p.label == classifier.label_names[p.index] for p in predictions)
    probabilities = predictions[0].probabilities
    assert len(probabilities) == 4 and abs(sum(probabilities.values()) - 1) < 1e-4
    assert max(probabilities, key=probabilities.get) == predictions[0].label
    top = classifier.predict(["my card was declined"], top_k=3)[0]
    assert len(top.probabilities) == 3 and next(iter(top.probabilities)) == top.label


def test_secure_loads_reserve_their_step_numbers(trained) -> None:
    """Two loads of the same directory never reuse a step number (Beaver material is per step)."""
    _, root, _ = trained["secure-client"]
    first = SplitClassifier.load(root)
    start = first.restored.session.client.state_dict()["next_step"]
    first.predict(["a", "b", "c"], batch_size=2)  # 2 steps reserved on disk before they run
    counters = [read_party(dealer_dir(root), "dealer").state["tenants"]["tenant-0"]["next_step"],
                read_party(cloud_dir(root), "cloud").state["tenants"]["tenant-0"]["next_step"],
                read_party(tenant_dir(root, "tenant-0"), "tenant").state["next_step"]]
    assert counters == [start + 2] * 3
    second = SplitClassifier.load(root)  # a fresh process would start here, not at ``start``
    assert second.restored.session.client.state_dict()["next_step"] == start + 2
    assert len(second.predict(["d"])) == 1


def test_a_different_body_is_refused(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    _, root, _ = trained["plain"]
    build = saved_module.build_split

    def other_body(*args, **kwargs):
        parts = build(*args, **kwargs)
        with torch.no_grad():
            next(parts.body.parameters()).add_(1e-3)
        return parts

    monkeypatch.setattr(saved_module, "build_split", other_body)
    with pytest.raises(StateError, match=r"cloud/party.json: the body differs"):
        SplitClassifier.load(root)


def test_the_cloud_keeps_no_tenant_secret(tmp_path: Path) -> None:
    """Every file of the cloud's directory, searched for each of the tenant's secrets (he mode)."""
    root = tmp_path / "state"
    train(_config(security="secure", label_protection="he", epochs=1, max_train_samples=8, max_test_samples=8),
          progress=False, state_dir=root)
    client = SplitClassifier.load(root).restored.session.client
    state = client.state_dict()
    secrets = {"x25519": state["x25519"], "dealer_key": state["dealer_key"],
               "ckks secret key": client.he_keys._secret_key_bytes[-64:]}
    secrets.update({f"half {k}": v.numpy().tobytes()[:64] for k, v in state["halves"]["weights"].items()})
    cloud_bytes = b"".join(p.read_bytes() for p in cloud_dir(root).iterdir())
    tenant_bytes = b"".join(p.read_bytes() for p in tenant_dir(root, "tenant-0").iterdir())
    for what, secret in secrets.items():
        assert len(secret) >= 32 and secret in tenant_bytes, what  # the search finds what is there
        assert secret not in cloud_bytes, f"the cloud's files hold the tenant's {what}"
        assert secret.hex() not in cloud_bytes.decode("latin-1"), what


def test_predict_command_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--quick", "--out", str(out), "--no-progress", "--set", "max_train_samples=16",
                 "--set", "max_test_samples=8", "--set", "epochs=1", "--set", "max_length=16"]) == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("my card was declined\n\nhow do I top up by bank transfer?\n", encoding="utf-8")
    preds = tmp_path / "preds.jsonl"
    args = ["predict", "--state", str(out), "--input", str(texts), "--out", str(preds), "--no-progress"]
    assert main(args + ["--top-k", "2"]) == 0
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [line["text"] for line in lines] == ["my card was declined", "how do I top up by bank transfer?"]
    assert all(len(line["probabilities"]) == 2 and line["label"] in line["probabilities"] for line in lines)
    texts.write_text("\n \n")
    assert main(args) == 2 and "empty input" in capsys.readouterr().err
    texts.write_text("hello\n")
    assert main(["predict", "--state", str(tmp_path / "nothing"), "--input", str(texts), "--out", str(preds)]) == 2
    assert "state directory not found" in capsys.readouterr().err
    meta = out / "state" / "tenants" / "tenant-0" / META_FILE
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 99}))
    assert main(args) == 2
    assert f"{meta}: format version 99" in capsys.readouterr().err
