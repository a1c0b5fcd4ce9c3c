"""What the training benchmarks share: one training run per side (philora, or TRL's SFTTrainer configured like
the Phi-3 model card's sample_finetune.py), each in a process of its own, reporting tokens/s, peak memory and
its losses as one `RESULT {json}` line on stdout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}


@dataclass
class Run:
    """One side's training run; the same for both sides of a comparison."""

    model_dir: str | None  # None = the embedded model
    data: str
    length: int
    batch: int
    steps: int  # timed steps; one more runs first, untimed
    dtype: str = "float32"
    quantization: str | None = None  # 4bit = NF4 QLoRA
    attn: str = "sdpa"
    learning_rate: float = 2e-4
    # philora recomputes this fraction of layers in backward; TRL (all or nothing) checkpoints every layer when this
    # is above 0 and none when it is 0, so each side runs its fastest setting that fits the same memory
    checkpoint_layers: float = 0.0

    def argv(self) -> list[str]:
        return ["--run", json.dumps(asdict(self))]


def matmul_peak(
    dtype_name: str, device: str = "cpu", shape: tuple[int, int, int] = (2048, 2048, 2048), repeats: int = 10
) -> float:
    """GFLOP/s of an (m x k) @ (k x n) matmul in this dtype on this device: pass a model's own shapes (tokens,
    hidden, intermediate) for the peak its layers can reach. On the CPU, the faster of PyTorch's `mm` and oneDNN's
    linear kernel, which philora's frozen layers use in fp32 (model.cpu_matmul): MFU against the best product here."""
    import torch

    from philora.model import cpu_matmul

    dtype = getattr(torch, dtype_name)
    m, k, n = shape
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(n, k, dtype=dtype, device=device)
    products = [lambda: a @ b.T]
    if cpu_matmul.by_onednn(a):
        products.append(lambda: cpu_matmul.linear(a, b))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for product in products:
        product()
        for _ in range(5):  # the best of five rounds: one round on a busy or cold machine read 25% low
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                product()
            sync()
            best = min(best, time.perf_counter() - start)
    return 2 * m * k * n * repeats / best / 1e9


def rate(marks: list[tuple[float, int]]) -> float:
    """Tokens/s between the end of the first (warm-up) step and the last."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


def philora_settings(run: Run, out: Path) -> dict[str, object]:
    """The config overrides that make philora's side of `run` (its embedded demo config underneath)."""
    settings: dict[str, object] = {
        "model.dtype": run.dtype,
        "model.attn_implementation": run.attn,
        "data.train": run.data,
        "data.max_length": run.length,
        "data.packing": True,
        "data.cache": False,
        "peft_config.r": LORA["r"],
        "peft_config.lora_alpha": LORA["lora_alpha"],
        "peft_config.lora_dropout": LORA["lora_dropout"],
        "training_config.output_dir": str(out),
        "training_config.max_steps": run.steps + 1,
        "training_config.per_device_train_batch_size": run.batch,
        "training_config.learning_rate": run.learning_rate,
        "training_config.lr_scheduler_type": "constant",
        "training_config.warmup_ratio": 0,
        "training_config.logging_steps": 1,
        "training_config.save_steps": 10_000,
        "training_config.predict_with_generate": False,
        "training_config.do_eval": False,  # timed steps only: no eval loss pass at the end
        "training_config.bf16": run.dtype == "bfloat16",
        "training_config.seed": 0,
    }
    if run.model_dir:
        settings["model.name_or_path"] = run.model_dir
    if run.quantization:
        settings["model.quantization"] = run.quantization
    if run.checkpoint_layers:
        settings["training_config.gradient_checkpointing"] = True
        settings["training_config.gradient_checkpointing_layers"] = run.checkpoint_layers
    return settings


def run_philora(run: Run, out: Path) -> dict:
    from philora import heap
    from philora.config import load_config
    from philora.hardware import resident_bytes
    from philora.train import run as run_module
    from philora.train.run import train

    if os.environ.get(heap.SWITCH) == "1":  # bench/allocator.py's trial of the setting merge and export use
        heap.limit_slack()

    loaded: list[float] = []
    load_model = run_module.load_model

    def load_and_mark(*args: object, **kwargs: object) -> object:
        model = load_model(*args, **kwargs)
        loaded.append(resident_bytes("VmHWM") / 2**20)  # the peak of loading (and quantizing) the model
        return model

    settings = philora_settings(run, out)
    run_module.load_model = load_and_mark
    try:
        train(load_config(None, [f"{k}={v}" for k, v in settings.items()]))
    finally:
        run_module.load_model = load_model
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {
        "marks": [(r["elapsed_s"], r["tokens"]) for r in steps],
        "losses": [round(r["loss"], 4) for r in steps],
        "params": json.loads((out / "run.json").read_text())["parameters"]["total"],
        "load_peak_rss_mb": loaded[0],
    }


def run_trl(run: Run, out: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from philora.model.embedded import embedded_model_dir
    from philora.model.load import ensure_safe_pad

    datasets.disable_progress_bars()
    model_dir = run.model_dir or str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_safe_pad(tokenizer)  # the same pad as philora's, never the end-of-turn token
    bf16 = run.dtype == "bfloat16"
    kwargs: dict = {"dtype": getattr(torch, run.dtype), "attn_implementation": run.attn}
    if run.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    cuda = torch.cuda.is_available()
    if cuda:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    marks: list[tuple[float, int]] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, _control, **_kwargs):
            if cuda:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        def on_log(self, _args, _state, _control, logs=None, **_kwargs):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))

    config = SFTConfig(
        output_dir=str(out),
        max_length=run.length,
        packing=True,
        per_device_train_batch_size=run.batch,
        max_steps=run.steps + 1,
        learning_rate=run.learning_rate,
        lr_scheduler_type="constant",
        bf16=bf16,
        gradient_checkpointing=run.checkpoint_layers > 0,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        seed=0,
        include_num_input_tokens_seen="non_padding",
    )
    dataset = datasets.load_dataset("json", data_files=run.data, split="train", cache_dir=str(out / "hf"))
    peft_config = LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    # peft's count, as philora's run.json has it: 4-bit packed weights counted as the weights they hold
    return {"marks": marks, "losses": losses, "params": trainer.model.get_nb_trainable_parameters()[1]}


def worker(side: str, run: Run, out: Path) -> None:
    """Run one side in this process and print its RESULT line."""
    import torch

    result = (run_philora if side == "philora" else run_trl)(run, out)
    result["tokens_per_s"] = rate(result["marks"])  # the marks stay in the result, so the rate can be checked
    from philora.hardware import resident_bytes

    result["peak_rss_mb"] = resident_bytes("VmHWM") / 2**20
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def spawn(script: str, side: str, run: Run, extra: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
    """Run `script --worker SIDE --run ...` in a fresh process (in `env`, else this one's) and return its RESULT."""
    command = [sys.executable, script, "--worker", side, *run.argv(), *(extra or [])]
    done = subprocess.run(command, capture_output=True, text=True, env={**(env or os.environ), "TQDM_DISABLE": "1"})
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def mfu(tokens_per_s: float, params: int, peak_gflops: float) -> float:
    """Model FLOP utilisation: a LoRA step costs about 4 x parameters FLOP per token (the forward, and the
    backward through the frozen weights; attention's own FLOPs are left out)."""
    return tokens_per_s * 4 * params / (peak_gflops * 1e9)


def common_arguments(p: argparse.ArgumentParser, *, steps: int, length: int, batch: int, rows: int) -> None:
    """The run-shape flags both benchmarks take, and the hidden ones a worker process is started with."""
    p.add_argument("--steps", type=int, default=steps, help="timed optimizer steps (one more runs first, untimed)")
    p.add_argument("--length", type=int, default=length, help="packed row length")
    p.add_argument("--batch", type=int, default=batch, help="rows per step")
    p.add_argument("--rows", type=int, default=rows, help="generated conversations")
    p.add_argument("--worker", choices=["philora", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)


def work_if_worker(args: argparse.Namespace) -> bool:
    """In a worker process (started by `spawn`): run its side and return True; in the parent return False."""
    if not args.worker:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        worker(args.worker, Run(**json.loads(args.run)), Path(tmp))
    return True
