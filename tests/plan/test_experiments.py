"""Every shipped full-size experiment composes, validates without weights, fits the planner's
memory check, and its real-size Megatron model (meta device, fake process group of the
experiment's world) loads and exports the real checkpoint's tensor list exactly."""

import json
import subprocess
import sys

import pytest
import torch

from mcore_r1.config import CONF_DIR, compose, experiment_names, resolve_model_hf_config, to_config, validate
from mcore_r1.config.model_source import SHIPPED_CONFIGS, shipped_config_names
from mcore_r1.plan.memory import plan
from mcore_r1.plan.params import total_params
from tests.dist_utils import run_workers

ROOT = CONF_DIR.parent
SHIPPED = [n for n in experiment_names() if not n.startswith("tiny_")]
# Sizes as published on the model cards (billions of parameters).
PUBLISHED_B = {"Qwen2.5-VL-3B-Instruct": 3.75, "Qwen2.5-VL-7B-Instruct": 8.29,
               "Qwen2.5-VL-32B-Instruct": 33.5, "Qwen2.5-VL-72B-Instruct": 73.4,
               "Qwen3-8B": 8.19, "Qwen3-32B": 32.8, "Llama-3.1-70B-Instruct": 70.6}


def load(name, *overrides):
    return to_config(compose([f"+experiment={name}", *overrides]))


def test_the_large_experiments_are_shipped():
    assert {"qwen2_5_vl_72b", "qwen2_5_vl_32b", "qwen2_5_vl_7b", "qwen2_5_vl_3b", "qwen3_8b",
            "qwen3_32b", "llama3_70b"} <= set(SHIPPED)
    assert set(PUBLISHED_B) == set(shipped_config_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_parameter_counts_match_published_sizes_and_transformers(name):
    import transformers

    hf = json.loads((SHIPPED_CONFIGS / name / "config.json").read_text())
    counted = total_params(hf)
    assert abs(counted / 1e9 - PUBLISHED_B[name]) / PUBLISHED_B[name] < 0.005, counted
    config = transformers.CONFIG_MAPPING[hf["model_type"]].from_dict(hf)
    with torch.device("meta"):
        model = getattr(transformers, hf["architectures"][0])._from_config(config)
    assert counted == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", SHIPPED)
def test_experiment_validates_without_weights_and_fits(name):
    cfg = load(name)
    assert cfg.model.config and cfg.model.dtype == "bfloat16"
    assert cfg.data.train_files and cfg.data.val_files
    validate(cfg)
    hf, source = resolve_model_hf_config(cfg.model, cfg.data)
    assert "model.config" in source  # no checkpoint here: the shipped config stands in
    result = plan(cfg, hf)
    assert result.fits, result.problems()


def _simulate_all(rank, world_size, names):
    from mcore_r1.config import compose, resolve_model_hf_config, to_config
    from mcore_r1.plan.simulate import simulate_layout

    reports = {}
    for name in names:
        cfg = to_config(compose([f"+experiment={name}"]))
        hf, _ = resolve_model_hf_config(cfg.model, cfg.data)
        reports[name] = simulate_layout(cfg, hf)
    return reports


@pytest.fixture(scope="module")
def simulations():
    # One fresh process (no torch.distributed group of the test runner's to collide with)
    # simulates every experiment in turn.
    return run_workers(_simulate_all, 1, SHIPPED, timeout_s=600)[0]


@pytest.mark.parametrize("name", SHIPPED)
def test_full_size_shape_simulation(simulations, name):
    report = simulations[name]
    assert report.ok, report.describe()
    cfg = load(name)
    tp_ranks = sorted({0, cfg.parallel.tp - 1})
    assert [(c.pp_rank, c.tp_rank) for c in report.checks] == [
        (p, t) for p in range(cfg.parallel.pp) for t in tp_ranks]
    assert all(c.loaded > 0 and c.params == c.planned for c in report.checks)


def _simulate_with_broken_shapes(rank, world_size):
    from mcore_r1.config import compose, resolve_model_hf_config, to_config
    from mcore_r1.plan import simulate

    cfg = to_config(compose(["+experiment=qwen3_8b"]))
    hf, _ = resolve_model_hf_config(cfg.model, cfg.data)
    shapes = simulate.hf_tensor_shapes(hf)
    shapes["model.layers.3.mlp.up_proj.weight"] = torch.Size([12289, 4096])  # one row too many
    shapes["model.layers.99.mlp.up_proj.weight"] = torch.Size([12288, 4096])  # no such layer
    consumed = set()
    check = simulate.check_rank(cfg, hf, shapes, 0, 0, consumed)
    return check.errors, sorted(set(shapes) - consumed)


def test_simulation_reports_wrong_and_leftover_tensors():
    errors, leftover = run_workers(_simulate_with_broken_shapes, 1, timeout_s=300)[0]
    assert any("decoder.layers.3.mlp.linear_fc1.weight" in e for e in errors), errors
    assert "model.layers.99.mlp.up_proj.weight" in leftover


def plan_cli(*args):
    return subprocess.run([sys.executable, "tools/plan.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_plan_cli_prints_the_memory_and_exits_by_the_verdict():
    out = plan_cli("+experiment=qwen2_5_vl_7b")
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("weights", "gradients (fp32 buffer)", "optimizer (fp32 master + Adam m, v)",
                 "reference weights (kl_coef > 0)", "activations", "vLLM weights", "vLLM KV cache",
                 "verdict: fits"):
        assert line in out.stdout, line
    small = plan_cli("+experiment=qwen2_5_vl_7b", "trainer.gpu_memory_gib=24")
    assert small.returncode == 1 and "does not fit" in small.stdout
    bad = plan_cli("+experiment=qwen2_5_vl_7b", "parallel.tp=3", "trainer.devices_per_node=6")
    assert bad.returncode == 2 and "28 attention heads are not divisible by TP=3" in bad.stderr


def test_plan_cli_search_lists_fitting_layouts():
    out = plan_cli("+experiment=qwen3_8b", "--search")
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("layouts for 8 GPUs:")[1]
    assert " 4   1   2          2 " in table and "fits" in table
    assert "valid layouts fit in 80 GiB per GPU" in table


def test_a_checkpoint_that_disagrees_with_model_config_is_reported(tmp_path):
    hf = json.loads((SHIPPED_CONFIGS / "Qwen3-8B" / "config.json").read_text())
    hf["num_hidden_layers"] = 30
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load("qwen3_8b", f"model.path={tmp_path}")
    with pytest.raises(Exception, match="num_hidden_layers 30 vs 36"):
        validate(cfg)


def test_a_local_run_needs_the_checkpoint_not_just_model_config(tmp_path):
    cfg = load("qwen3_8b", f"model.path={tmp_path / 'absent'}")
    validate(cfg)  # planning from a laptop: fine
    with pytest.raises(Exception, match="holds no checkpoint"):
        validate(cfg, local_run=True)
