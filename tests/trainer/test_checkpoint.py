"""The checkpoint directory protocol on its own (no workers): publish, verify, resolve, prune."""

import json
from pathlib import Path

import pytest

from mcore_r1.models.tiny import ensure_tiny_model
from mcore_r1.trainer.checkpoint import CheckpointError, CheckpointManager, verify

STATE = {"layout": {"world": 1, "tp": 1, "pp": 1, "cp": 1}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model("qwen2", tmp_path_factory.mktemp("tiny"))


def save(manager: CheckpointManager, step: int, model_dir: Path, payload: bytes = b"x" * 64,
         val: dict | None = None) -> Path:
    """What a run does: workers fill the staging directory, the driver publishes it."""
    staging = manager.begin(step)
    (staging / "model").mkdir()
    (staging / "model" / "__0_0.distcp").write_bytes(payload)
    return manager.finish(staging, step, {**STATE, "step": step, "val_metrics": val or {}}, model_dir)


def test_publish_layout_and_pointer(tmp_path, model_dir):
    m = CheckpointManager(tmp_path / "ckpt")
    final = save(m, 3, model_dir)
    assert final.name == "step_000003" and m.pointer("latest") == "step_000003"
    assert (final / "hf" / "config.json").is_file()  # export needs nothing else
    assert json.loads((final / "mcore_r1_checkpoint.json").read_text())["step"] == 3
    manifest = json.loads((final / "manifest.json").read_text())["files"]
    assert manifest["model/__0_0.distcp"] == 64 and "trainer_state.json" in manifest
    verify(final)
    assert not list(m.root.glob(".*"))  # no staging or temporary files left


def test_unfinished_save_is_invisible(tmp_path, model_dir):
    m = CheckpointManager(tmp_path / "ckpt")
    save(m, 1, model_dir)
    staging = m.begin(2)  # the process dies here
    (staging / "model").mkdir()
    assert m.pointer("latest") == "step_000001"
    assert m.resolve("auto").name == "step_000001"
    save(m, 2, model_dir)  # the next save clears the left-over
    assert not list(m.root.glob(".*.partial"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model" / "__0_0.distcp").write_bytes(b"x" * 10), "has 10 bytes, the manifest says 64"),
    (lambda d: (d / "model" / "__0_0.distcp").unlink(), "model/__0_0.distcp is missing"),
    (lambda d: (d / "manifest.json").unlink(), "never completed"),
    (lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest"),
])
def test_auto_falls_back_and_explicit_path_refuses(tmp_path, model_dir, capsys, damage, message):
    m = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    save(m, 1, model_dir)
    newest = save(m, 2, model_dir)
    damage(newest)
    assert m.resolve("auto").name == "step_000001"
    assert message in capsys.readouterr().out  # said, not silent
    with pytest.raises(CheckpointError, match=message):
        m.resolve(str(newest))


def test_resolve_off_missing_and_roots(tmp_path, model_dir):
    m = CheckpointManager(tmp_path / "ckpt")
    assert m.resolve("auto") is None and m.resolve("off") is None  # nothing saved yet
    with pytest.raises(CheckpointError, match="does not exist"):
        m.resolve(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        m.resolve(str(empty))
    save(m, 5, model_dir)
    assert m.resolve(str(m.root)).name == "step_000005"  # a checkpoints directory: its newest


def test_keeps_the_last_k_and_the_best(tmp_path, model_dir):
    m = CheckpointManager(tmp_path / "ckpt", keep_last=2, best_metric="val/accuracy")
    for step, acc in [(1, 0.2), (2, 0.9), (3, 0.5), (4, None), (5, 0.7)]:
        save(m, step, model_dir, val={"val/accuracy": acc} if acc is not None else {})
    assert sorted(p.name for p in m.complete_checkpoints()) == ["step_000002", "step_000004", "step_000005"]
    assert m.best() == {"name": "step_000002", "metric": "val/accuracy", "value": 0.9}
    assert m.pointer("latest") == "step_000005"


def test_failed_save_message_names_the_intact_checkpoint(tmp_path, model_dir):
    m = CheckpointManager(tmp_path / "ckpt")
    assert m.describe_previous() == "there is no earlier checkpoint"
    save(m, 1, model_dir)
    assert m.describe_previous() == f"the previous checkpoint {m.root / 'step_000001'} is intact"
