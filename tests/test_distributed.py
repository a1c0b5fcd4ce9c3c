"""Data-parallel training under `accelerate launch`: 2 CPU processes (gloo), on one machine or on two machines
(loopback), equal 1 process with the same global batch, step for step, to fp32 rounding."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import pair_data, read_jsonl, write_yaml
from safetensors.torch import load_file

BIN = Path(sys.executable).parent


def environment(**extra: str) -> dict[str, str]:
    # One thread per process: two processes on two cores, neither starving the other.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def run(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


# `--multi_gpu` without a GPU is accelerate's multi-CPU mode: torch.distributed with gloo (`--cpu` is its
# one-process launcher).
CPU_PROCESSES = ("--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no")


def launch(*flags: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", *flags, "-m", "philora", "train"]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "method"), [("float32", "sft"), ("bfloat16", "sft"), ("float32", "dpo")])
def test_two_processes_match_one_with_the_same_global_batch(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], dtype: str, method: str
) -> None:
    # No dropout: its masks are drawn per process, so they could not match one process's.
    # dpo: each process computes a share of the reference log-probabilities, and the pairs are the units.
    data = tiny_data if method == "sft" else pair_data(tmp_path, tiny_data)
    config = write_yaml(
        tmp_path / "ddp.yaml",
        f"""
model: {{name_or_path: {tiny_phi3}, dtype: float32}}
data: {{train: {data[0]}, eval: {data[1]}, max_length: 256}}
peft_config: {{r: 4, lora_alpha: 8, lora_dropout: 0.0}}
training_config: {{max_steps: 5, per_device_train_batch_size: 4, learning_rate: 0.01, logging_steps: 1,
                   save_steps: 100, eval_strategy: steps, eval_steps: 5, seed: 7, method: {method}}}
""",
    )
    single = [str(BIN / "philora"), "train", "--config", str(config)]
    run([*single, "--output", "one", "--set", f"model.dtype={dtype}"], tmp_path)
    run([*launch(*CPU_PROCESSES, "--num_processes", "2", "--num_machines", "1"), "--config", str(config), "--output",
         "two", "--set", "training_config.per_device_train_batch_size=2", "--set", f"model.dtype={dtype}"],
        tmp_path)  # fmt: skip
    one, two = (steps_of(tmp_path / f"{d}/metrics.jsonl") for d in ("one", "two"))
    # the answers are scored at the evaluation by the main process and handed to the other (early stopping's rule
    # needs the same numbers on both)
    assert {k for k in one[-1] if k.startswith("eval_")} == {k for k in two[-1] if k.startswith("eval_")} >= {
        "eval_loss", "eval_exact_match", "eval_rouge_l"}  # fmt: skip
    first, second = (load_file(tmp_path / f"{d}/adapter/adapter_model.safetensors") for d in ("one", "two"))
    keys = ("loss", "grad_norm", "eval_loss")
    if dtype == "float32":
        rel, weights = dict.fromkeys(keys, 1e-6), 1e-6  # fp32 rounding of half-size batches and the all-reduce
    else:
        # Two processes compute the same sums on half batches, which bf16 rounds differently: each number of the
        # two runs may drift apart by as much as it drifts between a bf16 and an fp32 run (same data), no more.
        run([*single, "--output", "exact", "--set", "model.dtype=float32"], tmp_path)
        exact = steps_of(tmp_path / "exact/metrics.jsonl")
        rel = {
            k: 2 * max(abs(a[k] - e[k]) / abs(e[k]) for a, e in zip(one, exact, strict=True) if k in a) for k in keys
        }
        exact_weights = load_file(tmp_path / "exact/adapter/adapter_model.safetensors")
        weights = 2 * max(float((first[n] - exact_weights[n]).abs().max()) for n in first)
        assert all(0 < r < 0.05 for r in rel.values()) and weights > 0, (rel, weights)

    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5, 5]
    if method == "dpo":
        # dpo's loss, and the weights of its gradient, are functions of reward margins: small differences of
        # summed log-probabilities (hundreds of nats here) that each run sums in other batches. fp32 rounds such a
        # sum at ~1e-7 of it, and a reward is beta (0.1) times it; 10x that is the bound on losses and margins.
        rel["grad_norm"] = 1e-5
        # Adam turns those gradient differences into weight differences far above fp32's rounding of the weights:
        # a weight whose gradient sits near zero moves by up to the learning rate either way. Equally valid orders
        # of the same sums (one process in halves, or MKL's products for oneDNN's) drifted by 2.3e-7 on average
        # and 8e-5 at most here; a wrong gradient (a lost or doubled share) moves weights by the rate, 1e-2.
        weights = 1e-3
        drift = torch.cat([(first[n] - second[n]).abs().flatten() for n in first]).mean()
        assert drift < 1e-6, drift
    for a, b in zip(one, two, strict=True):
        assert a.get("tokens") == b.get("tokens")  # the same rows in every global batch
        prefix = "eval_" if "eval_loss" in a else ""
        bound = 0.1 * abs(a.get(f"{prefix}logps/chosen", 0.0)) * 1e-6
        for key in keys:
            if key in a and method == "dpo" and key != "grad_norm":
                assert b[key] == pytest.approx(a[key], abs=bound), (a["step"], key)
            elif key in a:
                assert b[key] == pytest.approx(a[key], rel=rel[key]), (a["step"], key)
        if method == "dpo":
            margin = f"{prefix}rewards/margins"
            assert b[margin] == pytest.approx(a[margin], abs=bound), (a["step"], margin)

    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] - second[name]).abs().max() <= weights, name  # fp32: rounding; dpo: see above
    assert all(t.abs().max() > 1e-4 for n, t in first.items() if "lora_B" in n)  # trained: B starts at zero
    assert json.loads((tmp_path / "two/run.json").read_text())["processes"] == 2
    assert not (tmp_path / "two/metrics.jsonl.tmp").exists()


def test_each_process_takes_every_world_th_row_and_a_short_batch_lends_one() -> None:
    from philora.train.plan import Plan

    rows = [[i] for i in range(5)]
    plans = [Plan(rows, batch_size=2, accumulation=1, total_steps=2, seed=0, world=2, rank=r) for r in (0, 1)]
    single = Plan(rows, batch_size=4, accumulation=1, total_steps=2, seed=0)
    assert plans[0].per_epoch == single.per_epoch == 2
    for step in range(2):
        (global_rows,) = plans[0].micro_batches(step)
        assert global_rows == single.micro_batches(step)[0] == plans[1].micro_batches(step)[0]
        shares = [p.mine(global_rows) for p in plans]
        owned = [p.owns(global_rows) for p in plans]
        if step == 0:
            assert shares == [global_rows[0::2], global_rows[1::2]] and owned == [True, True]
        else:  # the epoch's fifth row alone: process 1 runs it too, for step-lock, and it counts nowhere
            assert len(global_rows) == 1 and shares == [global_rows, global_rows] and owned == [True, False]


ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "philora" / "configs" / "accelerate"


@pytest.mark.parametrize("name", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_gets_the_loops_batch_accumulation_and_clipping(name: str) -> None:
    """accelerate cannot resolve DeepSpeed's `auto` batch sizes without a DataLoader, which philora does not give
    it: philora fills them, and its accumulation and clipping, into the plugin the shipped config builds."""
    import yaml
    from accelerate.utils import DeepSpeedPlugin

    from philora.config import TrainingSection
    from philora.train.distributed import configure

    settings = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(**settings)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"  # what accelerate leaves open
    state = SimpleNamespace(deepspeed_plugin=plugin, num_processes=8)
    tc = TrainingSection(per_device_train_batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5)
    configure(state, tc)
    ds = plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 8 and ds["gradient_clipping"] == 0.5
    assert not any(plugin.is_auto(k) for k in ("train_micro_batch_size_per_gpu", "train_batch_size"))
    assert ds["zero_optimization"]["stage"] == settings["zero_stage"]
    configure(state, TrainingSection(max_grad_norm=0.0))
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # max_grad_norm 0: no clipping, as in the loop


def test_fsdp_keeps_original_parameters_for_lora() -> None:
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    from philora.config import TrainingSection
    from philora.train.distributed import configure

    settings = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=settings["fsdp_version"],
        auto_wrap_policy=settings["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[settings["fsdp_transformer_layer_cls_to_wrap"]],
        activation_checkpointing=True,  # as a user's config might say: philora checkpoints layers itself
    )
    configure(SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=plugin, num_processes=2), TrainingSection())
    assert plugin.use_orig_params is True and plugin.activation_checkpointing is False


@pytest.mark.slow
def test_two_processes_accumulating_and_clipping_match_one_process(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]
) -> None:
    """philora's own accumulation (2 micro-batches a step, gradients synchronised once) and clipping (active: the
    norms are above max_grad_norm) across 2 processes equal one process with the same global batch."""
    config = write_yaml(
        tmp_path / "acc.yaml",
        f"""
model: {{name_or_path: {tiny_phi3}, dtype: float32}}
data: {{train: {tiny_data[0]}, max_length: 256}}
peft_config: {{r: 4, lora_alpha: 8, lora_dropout: 0.0}}
training_config: {{max_steps: 3, per_device_train_batch_size: 2, gradient_accumulation_steps: 2, learning_rate: 0.01,
                   max_grad_norm: 0.05, logging_steps: 1, save_steps: 100, seed: 7}}
""",
    )
    run([str(BIN / "philora"), "train", "--config", str(config), "--output", "one", "--set",
         "training_config.per_device_train_batch_size=4"], tmp_path)  # fmt: skip
    run([*launch(*CPU_PROCESSES, "--num_processes", "2", "--num_machines", "1"), "--config", str(config), "--output",
         "two"], tmp_path)  # fmt: skip
    one = assert_same_training(tmp_path / "one", tmp_path / "two", [1, 2, 3])
    assert all(r["grad_norm"] > 0.05 for r in one)  # clipping was active at every step


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine", [CPU_PROCESSES, ("--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"))], ids=["flags", "ddp.yaml"]
)
def test_two_machines_match_one_process_with_the_same_global_batch(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], engine: tuple[str, ...]
) -> None:
    """accelerate's multi-machine launch, two machines on loopback: one launcher per machine, each starting one
    process (its machine's local rank 0; global rank 0 and 1), which meet at machine 0's address and port and train
    as one run. Machine 1 has a disk of its own (its cache and --output): only machine 0's process writes files."""
    config = write_yaml(
        tmp_path / "nodes.yaml",
        f"""
model: {{name_or_path: {tiny_phi3}, dtype: float32}}
data: {{train: {tiny_data[0]}, eval: {tiny_data[1]}, max_length: 256}}
peft_config: {{r: 4, lora_alpha: 8, lora_dropout: 0.0}}
training_config: {{max_steps: 3, per_device_train_batch_size: 2, learning_rate: 0.01, logging_steps: 1,
                   save_steps: 2, eval_strategy: steps, eval_steps: 3, seed: 7}}
""",
    )
    run([str(BIN / "philora"), "train", "--config", str(config), "--output", "one", "--set",
         "training_config.per_device_train_batch_size=4"], tmp_path)  # fmt: skip
    with socket.socket() as s:  # a free port for machine 0's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    disks = [(tmp_path / "two", os.environ["PHILORA_CACHE_DIR"]), (tmp_path / "node1/two", f"{tmp_path}/node1/cache")]
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    machines = []
    try:
        for rank, (output, cache) in enumerate(disks):
            command = [*launch(*engine, "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)),
                       "--config", str(config), "--output", str(output)]  # fmt: skip
            env = environment(PHILORA_CACHE_DIR=cache)
            with logs[rank].open("w") as log:  # the child holds its own copy of the file
                machines.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True))  # fmt: skip
        codes = [machine.wait(timeout=300) for machine in machines]
    finally:  # one machine's failure leaves the other waiting at the rendezvous or in a collective
        for machine in machines:
            if machine.poll() is None:
                os.killpg(machine.pid, signal.SIGKILL)
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]

    assert_same_training(tmp_path / "one", tmp_path / "two", [1, 2, 3, 3])  # the last: step 3's evaluation
    assert json.loads((tmp_path / "two/run.json").read_text())["processes"] == 2
    assert (tmp_path / "two/checkpoints/step-2").is_dir()
    assert not (tmp_path / "node1/two").exists()  # machine 1 wrote nothing there: no output dir, no checkpoint
    assert any((tmp_path / "node1/cache/data").glob("*.npz"))  # it encoded the data itself, into its own cache


def assert_same_training(one: Path, two: Path, steps: list[int]) -> list[dict]:
    """The run in `two` (2 processes, fp32) logged the steps of the run in `one` (1 process, the same global
    batches) with the same rows and, to fp32 rounding of half batches summed by the all-reduce, the same losses,
    grad norms and eval losses, and saved the same adapter. Returns one's training records."""
    first, second = steps_of(one / "metrics.jsonl"), steps_of(two / "metrics.jsonl")
    assert [r["step"] for r in first] == [r["step"] for r in second] == steps
    for a, b in zip(first, second, strict=True):
        assert a.get("tokens") == b.get("tokens")  # the same rows in every global batch
        for key, rel in (("loss", 1e-6), ("grad_norm", 1e-5), ("eval_loss", 1e-6)):
            assert (key in a) == (key in b), (a["step"], key)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    adapters = [load_file(d / "adapter/adapter_model.safetensors") for d in (one, two)]
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[0].items():
        assert (weight - adapters[1][name]).abs().max() <= 1e-6, name
    assert all(t.abs().max() > 1e-4 for n, t in adapters[0].items() if "lora_B" in n)  # trained: B starts at zero
    return first


def test_deepspeed_steps_once_per_accumulated_step() -> None:
    """Under DeepSpeed, accelerate's backward makes every micro-batch an accumulation boundary (and steps the
    engine) while `sync_gradients` is true. The loop must raise it on the last micro-batch of a step only, and keep
    the engine from scaling the loss by the accumulation steps again. Checked against a recording accelerator:
    DeepSpeed's engine does not run on a CPU under accelerate (it demotes a CPU process to plain DDP)."""
    import torch
    from accelerate.utils import DistributedType

    from philora.config import TrainingSection
    from philora.train.loop import optimizer_step

    calls: list[tuple[bool, dict]] = []
    weight = torch.nn.Parameter(torch.ones(3))

    class Recorder(SimpleNamespace):
        def backward(self, loss: torch.Tensor, **kwargs: object) -> None:
            calls.append((self.sync_gradients, kwargs))
            loss.backward()

    engine = SimpleNamespace(get_global_grad_norm=lambda: 0.5)
    accelerator = Recorder(
        num_processes=1, device=torch.device("cpu"), distributed_type=DistributedType.DEEPSPEED, sync_gradients=True,
        no_sync=lambda model: contextlib.nullcontext(), deepspeed_engine_wrapped=SimpleNamespace(engine=engine),
    )  # fmt: skip

    def loss_fn(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (weight * x).sum(), {"seen": x.sum()}

    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = [({"x": torch.full((3,), float(i))}, True) for i in range(1, 4)]
    loss, norm, stats = optimizer_step(loss_fn, batches, 9, accelerator, TrainingSection(max_grad_norm=1.0),
                                       optimizer, scheduler)  # fmt: skip
    assert [sync for sync, _ in calls] == [False, False, True]
    assert all(kwargs == {"scale_wrt_gas": False} for _, kwargs in calls)
    assert loss == 18.0 and norm == 0.5  # the summed loss; the norm the engine measured before its clipping
    assert stats == {"seen": 18.0}  # the loss module's statistics, summed over the micro-batches


def steps_of(path: Path) -> list[dict]:
    """metrics.jsonl's records of training steps: not step 0's, the starting model's answers scored."""
    return [r for r in read_jsonl(path) if r["step"] > 0]
