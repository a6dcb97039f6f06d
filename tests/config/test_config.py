"""Config composition, the schema's documentation, and the validator's messages."""

import json
import subprocess
import sys
from dataclasses import fields

import pytest
from omegaconf import OmegaConf

from mcore_r1.config import (
    CONF_DIR, SCHEMAS, ConfigError, compose, experiment_names, field_docs, to_config, validate,
)

ROOT = CONF_DIR.parent


def load(*overrides):
    return to_config(compose(list(overrides)))


def main(*args):
    return subprocess.run(
        [sys.executable, "-m", "mcore_r1.main", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )


def test_every_field_has_a_doc():
    docs = field_docs()
    assert len(docs) == sum(len(fields(s)) for s in SCHEMAS.values())
    undocumented = [k for k, v in docs.items() if len(v.strip()) < 10]
    assert not undocumented


def test_every_group_has_a_folder_and_every_yaml_composes():
    for group in list(SCHEMAS) + ["experiment"]:
        assert (CONF_DIR / group).is_dir(), group
    for group in SCHEMAS:
        for option in sorted((CONF_DIR / group).glob("*.yaml")):
            if "???" in option.read_text():
                continue  # templates that require a user value (e.g. model=hf)
            load(f"{group}={option.stem}")


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_composes_and_validates(name):
    cfg = load(f"+experiment={name}")
    shape = validate(cfg)
    assert shape.num_layers % cfg.parallel.pp == 0


def test_experiments_are_shipped():
    assert {"tiny_vl_grpo", "tiny_text_grpo"} <= set(experiment_names())


def test_overrides_are_type_checked():
    from omegaconf.errors import ValidationError
    from hydra.errors import ConfigCompositionException

    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose(["parallel.tp=two"])


def test_cli_prints_composed_config():
    out = main("--cfg", "job")
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.model.tiny == "qwen2_5_vl" and printed.rollout.n == 8
    out = main("+experiment=tiny_text_grpo", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert OmegaConf.create(out.stdout).model.tiny == "qwen2"


def test_cli_unknown_experiment_lists_available():
    out = main("+experiment=no_such_thing", "--cfg", "job")
    assert out.returncode != 0
    for name in experiment_names():
        assert name in out.stderr


def test_cli_impossible_layout_exits_nonzero_naming_the_numbers():
    # tiny Qwen2.5-VL: 4 heads, 2 query groups, 4 layers, vision 2 heads
    out = main("parallel.tp=3", "trainer.devices_per_node=3")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "2 query groups (KV heads) are not divisible by TP=3 (2 % 3 = 2)" in out.stderr
    assert "4 attention heads are not divisible by TP=3 (4 % 3 = 1)" in out.stderr
    assert "Traceback" not in out.stderr


def test_world_not_divisible():
    cfg = load("parallel.tp=2", "parallel.pp=2", "trainer.devices_per_node=6")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "world size 6 is not divisible by TP x PP x CP = 2 x 2 x 1 = 4 (6 % 4 = 2)" in str(err.value)


def test_layers_not_divisible_by_pp():
    cfg = load("parallel.tp=1", "parallel.pp=3", "trainer.devices_per_node=3", "trainer.mini_batch_size=32")
    with pytest.raises(ConfigError, match=r"4 layers are not divisible by PP=3 \(4 % 3 = 1\)"):
        validate(cfg)


def test_batch_arithmetic():
    cfg = load("data.prompts_per_step=6", "rollout.n=5", "trainer.mini_batch_size=8")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert ("data.prompts_per_step x rollout.n = 6 x 5 = 30 is not divisible into "
            "trainer.mini_batch_size=8 (30 % 8 = 6)") in str(err.value)
    cfg = load("parallel.tp=1", "trainer.devices_per_node=4", "trainer.mini_batch_size=2",
               "data.prompts_per_step=4")
    with pytest.raises(ConfigError, match="mini_batch_size=2 is not divisible by the data-parallel size 4"):
        validate(cfg)


def test_rollout_tp_must_divide_world():
    cfg = load("trainer.devices_per_node=2", "rollout.tp=4")
    with pytest.raises(ConfigError, match=r"rollout.tp=4 does not divide the training world of 2 processes \(2 % 4 = 2\)"):
        validate(cfg)


@pytest.mark.parametrize("setting,message", [
    ("rollout.cpu_weights=raw", "rollout.cpu_weights='raw' is not one of plain, packed"),
    ("trainer.packing=thd2", "trainer.packing='thd2' is not one of"),
])
def test_unknown_choice_names_the_setting_and_the_choices(setting, message):
    with pytest.raises(ConfigError, match=message):
        validate(load(setting))


def test_all_problems_reported_together():
    cfg = load("rollout.top_p=0", "algorithm.clip_ratio_c=0.5", "trainer.micro_batch_tokens=10")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert len(err.value.problems) == 3
    assert "cannot hold one sequence of data.max_prompt_length + rollout.max_new_tokens = 256 + 24 = 280" in str(err.value)


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "num_hidden_layers": 2}))
    cfg = load("model=hf", f"model.path={tmp_path}")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "unknown model architecture 'GPT2LMHeadModel'" in message
    assert "Qwen2_5_VLForConditionalGeneration" in message and "LlamaForCausalLM" in message


def test_missing_checkpoint_is_named(tmp_path):
    cfg = load("model=hf", f"model.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="has no config.json"):
        validate(cfg)


def test_default_job_is_the_tiny_vl_grpo_experiment():
    """conf/config.yaml repeats the experiment's recipe (Hydra cannot default to an experiment
    and still accept +experiment=...): keep the two identical."""
    default, experiment = to_config(compose([])), to_config(compose(["+experiment=tiny_vl_grpo"]))
    default.logger.run_name = experiment.logger.run_name
    default.trainer.output_dir = experiment.trainer.output_dir = ""
    assert default == experiment
