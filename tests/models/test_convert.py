"""HF -> Megatron distributed checkpoint -> HF, across layouts, on real gloo worlds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcore_r1.models.hf_checkpoint import HFCheckpointReader
from mcore_r1.models.tiny import ensure_tiny_model, tiny_hf_config
from tests.dist_utils import run_workers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dirs = {name: ensure_tiny_model(name, root) for name in ("qwen2", "llama3", "qwen2_vl", "qwen2_5_vl")}
    dirs["odd_vocab"] = _odd_vocab_model(root / "odd_vocab")
    return dirs


def _odd_vocab_model(path: Path) -> Path:
    """A Qwen2 whose vocabulary (2001) is not divisible by TP=2."""
    import transformers

    config = tiny_hf_config("qwen2")
    config.vocab_size = 2001
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def hf_logits(model_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def tokens():
    return torch.randint(0, 2001, (2, 10), generator=torch.Generator().manual_seed(5))


def _init(world_size, tp, pp):
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(world_size, tp=tp, pp=pp))


def _to_mcore(rank, world_size, tp, pp, pairs):
    from mcore_r1.models.convert import hf_to_mcore
    from mcore_r1.models.dense import ModelLayout

    _init(world_size, tp, pp)
    for hf_dir, out in pairs:
        hf_to_mcore(hf_dir, out, ModelLayout(tp=tp, pp=pp))


def _to_hf(rank, world_size, tp, pp, pairs):
    from mcore_r1.models.convert import mcore_to_hf
    from mcore_r1.models.dense import ModelLayout

    _init(world_size, tp, pp)
    for mcore_dir, out in pairs:
        mcore_to_hf(mcore_dir, out, ModelLayout(tp=tp, pp=pp), max_shard_bytes=1 << 20)


def _logits_from(rank, world_size, tp, pp, source, kind, first_stage_layers=None):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.convert import load_mcore_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.forward import forward_logits

    _init(world_size, tp, pp)
    layout = ModelLayout(tp=tp, pp=pp, first_stage_layers=first_stage_layers)
    model, hf = (load_mcore_model if kind == "mcore" else load_hf_model)(source, layout)
    logits = forward_logits(model.eval(), tokens(), hf["vocab_size"])
    return logits if first_stage_layers is None else (logits, len(model.decoder.layers))


def assert_same_checkpoint(a: Path, b: Path):
    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    assert sorted(ra.keys()) == sorted(rb.keys())
    for key in ra.keys():
        ta, tb = ra.get(key), rb.get(key)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_round_trip_tp2_pp2_is_bit_exact(models, tmp_path):
    names = ("qwen2", "llama3", "odd_vocab", "qwen2_vl", "qwen2_5_vl")
    run_workers(_to_mcore, 4, 2, 2, [(str(models[n]), str(tmp_path / f"{n}.mcore")) for n in names])
    run_workers(_to_hf, 1, 1, 1, [(str(tmp_path / f"{n}.mcore"), str(tmp_path / f"{n}.hf")) for n in names])
    for name in names:
        assert_same_checkpoint(models[name], tmp_path / f"{name}.hf")
    assert (tmp_path / "qwen2.hf" / "tokenizer.json").is_file()
    assert (tmp_path / "qwen2.hf" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "qwen2_5_vl.hf" / "preprocessor_config.json").is_file()
    # several shards were written (1 MiB budget) and transformers loads the result
    assert len(list((tmp_path / "llama3.hf").glob("model-*-of-*.safetensors"))) > 1
    expected = hf_logits(models["llama3"], tokens())
    assert torch.equal(hf_logits(tmp_path / "llama3.hf", tokens()), expected)


def test_round_trip_from_tp1_written_from_the_hf_files_is_bit_exact(models, tmp_path):
    # at TP=1 most tensors are written straight from the mapped HF files (dist_io.DirectWrites)
    names = ("qwen2", "qwen2_5_vl")
    run_workers(_to_mcore, 1, 1, 1, [(str(models[n]), str(tmp_path / f"{n}.mcore")) for n in names])
    run_workers(_to_hf, 2, 2, 1, [(str(tmp_path / f"{n}.mcore"), str(tmp_path / f"{n}.hf")) for n in names])
    for name in names:
        assert_same_checkpoint(models[name], tmp_path / f"{name}.hf")


def test_saved_at_tp2_loads_at_pp2_with_same_logits(models, tmp_path):
    run_workers(_to_mcore, 2, 2, 1, [(str(models["qwen2"]), str(tmp_path / "m"))])
    results = run_workers(_logits_from, 2, 1, 2, str(tmp_path / "m"), "mcore")
    diff = (results[-1] - hf_logits(models["qwen2"], tokens())).abs().max().item()
    assert diff <= 1e-4, diff
    # and back out from the PP=2 layout, exactly
    run_workers(_to_hf, 2, 1, 2, [(str(tmp_path / "m"), str(tmp_path / "h"))])
    assert_same_checkpoint(models["qwen2"], tmp_path / "h")


def test_odd_vocab_at_tp2_and_uneven_pipeline(models):
    results = run_workers(_logits_from, 2, 2, 1, str(models["odd_vocab"]), "hf")
    expected = hf_logits(models["odd_vocab"], tokens())
    assert results[0].shape[-1] == 2001
    assert (results[0] - expected).abs().max().item() <= 1e-4
    # 4 layers as 1 + 3 over two pipeline stages
    (_, first_layers), (logits, last_layers) = run_workers(
        _logits_from, 2, 1, 2, str(models["llama3"]), "hf", 1)
    assert (first_layers, last_layers) == (1, 3)
    assert (logits - hf_logits(models["llama3"], tokens())).abs().max().item() <= 1e-4


def _bad_inputs(rank, world_size, good, bad, out):
    from mcore_r1.models.convert import hf_to_mcore
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.mapping import MappingError

    _init(world_size, 1, 1)
    try:
        hf_to_mcore(bad, out, ModelLayout())
    except MappingError as err:
        message = str(err)
    else:
        message = None
    return message, Path(out).exists(), sorted(p.name for p in Path(out).parent.iterdir())


def test_mismatched_weights_are_named_and_nothing_looks_complete(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(models["qwen2"], bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.2.mlp.down_proj.weight"] = torch.zeros(256, 500)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "m"
    out.parent.mkdir()
    message, exists, siblings = run_workers(_bad_inputs, 1, str(models["qwen2"]), str(bad), str(out))[0]
    assert message is not None and "decoder.layers.2.mlp.linear_fc2.weight" in message
    assert "model.layers.2.mlp.down_proj.weight (256, 500)" in message and "(256, 512)" in message
    assert not exists and "m" not in siblings


def test_cli_verify_relaunches_under_torchrun(models):
    out = subprocess.run(
        [sys.executable, "tools/convert_hf_mcore.py", "verify", "--hf", str(models["qwen2"]),
         "--tp", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "max |logit diff| at TP=2 PP=1" in out.stdout and "ok" in out.stdout
