"""Real size: a Phi-3-mini-shaped model (random weights, scripts/make_real_shape.py) through training on this machine,
`philora check`'s memory estimate beside the measured peak of the whole process (loading and quantizing included).

    python bench/real_size.py                                   # phi3-mini-4k, the cases below (about an hour)
    python bench/real_size.py --shape 1b --case lora:float32:512:ckpt --case qlora:float32:512:ckpt

A case is MODE:DTYPE:LENGTH:CKPT (MODE lora|qlora, DTYPE float32|bfloat16, CKPT ckpt|nockpt); bfloat16 cases run
only where this CPU multiplies bf16 in hardware (PHILORA_CPU_BF16=1 forces them). Each case: `philora check
--json` (the estimate; when the check refuses the case, its message instead of a run), then a training run of one
warm-up step and --steps timed steps, micro-batch 1, LoRA r16 on every linear layer, in a process of its own.
Printed per case: the estimate, the peak while loading, the peak of the whole process, estimate / peak, s/step,
tokens/s, and MFU against this CPU's matmul peak measured on the model's shapes (a LoRA step costs 4 x parameters
FLOP a token, 6 x with every layer recomputed).

Then the commands after training, each a `philora` process with its wall time and peak RSS (os.wait4's): a one-step
LoRA run in the CPU's dtype that saves its adapter, `merge`, and `export gguf --type q4_k_m` with llama.cpp's
verification, and f16 (with random weights, 4-bit types move near-tied logits past each other, so q4_k_m's
verification can fail where f16's bound on the logits says the file is right), in --work (kept: the merged model
and the GGUFs are the size of the model). --stages none skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from harness import Run, matmul_peak, philora_settings, spawn, work_if_worker  # noqa: E402

CASES = ["lora:float32:512:ckpt", "lora:bfloat16:512:ckpt", "lora:bfloat16:512:nockpt", "lora:bfloat16:2048:ckpt",
         "qlora:float32:512:ckpt", "qlora:bfloat16:512:ckpt", "qlora:bfloat16:2048:ckpt",
         "lora:float32:2048:nockpt"]  # fmt: skip


def parse_case(case: str, model_dir: str, data: str, steps: int) -> Run:
    mode, dtype, length, ckpt = case.split(":")
    return Run(model_dir, data, int(length), 1, steps, dtype, quantization="4bit" if mode == "qlora" else None,
               checkpoint_layers=1.0 if ckpt == "ckpt" else 0.0)  # fmt: skip


def estimated(run: Run, env: dict[str, str]) -> tuple[int | None, str]:
    """`philora check --json`'s memory total for the run, and the check's first error ('' when it passes)."""
    with tempfile.TemporaryDirectory() as scratch:
        sets = [a for k, v in philora_settings(run, Path(scratch)).items() for a in ("--set", f"{k}={v}")]
        done = subprocess.run([sys.executable, "-m", "philora", "check", "--json", *sets], capture_output=True,
                              text=True, env=env)  # fmt: skip
    report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    memory = report.get("memory") or {}
    errors = report.get("errors") or ([done.stderr.strip().splitlines()[-1]] if done.returncode else [])
    return memory.get("total"), errors[0] if errors else ""


def shape_arguments(p: argparse.ArgumentParser, shape: str, steps: int) -> None:
    """The flags this bench and bench/allocator.py share, and the hidden ones a worker process is started with."""
    p.add_argument("--shape", default=shape, help="a scripts/make_real_shape.py shape (made when missing)")
    p.add_argument("--models", type=Path, default=ROOT / "out" / "shapes", help="where the shapes are kept")
    p.add_argument("--steps", type=int, default=steps, help="timed steps after the warm-up step")
    p.add_argument("--worker", choices=["philora"], help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)


def made(shape: str, models: Path) -> Path:
    """The shape's model directory, made first when it is not there."""
    from scripts.make_real_shape import make

    model_dir = models / shape
    if not (model_dir / "config.json").exists():
        print(f"making {shape} in {model_dir}", flush=True)
        make(shape, model_dir)
    return model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(p, "phi3-mini-4k", steps=2)
    p.add_argument("--case", action="append", help="MODE:DTYPE:LENGTH:CKPT (repeatable; default: the list above)")
    p.add_argument("--rows", type=int, default=600, help="generated conversations to train on")
    p.add_argument("--stages", choices=["export", "none"], default="export", help="train, merge, export after")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "real-size", help="where the stages write (a new dir)")
    args = p.parse_args()
    if work_if_worker(args):
        return

    from data_prep import generate
    from train_speed import cpu_line

    from philora.hardware import cpu_has_fast_bf16

    model_dir = made(args.shape, args.models)
    config = json.loads((model_dir / "config.json").read_text())
    print(cpu_line(), flush=True)
    print(f"{'case':<26}{'estimate':>10}{'load peak':>11}{'peak':>9}{'est/peak':>9}{'s/step':>8}{'tok/s':>7}"
          f"{'MFU':>6}", flush=True)  # fmt: skip
    peaks: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        generate(data, args.rows)
        for case in args.case or CASES:
            run = parse_case(case, str(model_dir), str(data), args.steps)
            bf16 = run.dtype == "bfloat16"
            if bf16 and not cpu_has_fast_bf16():
                print(f"{case:<26} skipped: this CPU has no bf16 arithmetic", flush=True)
                continue
            env = {**os.environ, "PHILORA_CPU_BF16": "1" if bf16 else "0", "TQDM_DISABLE": "1"}
            estimate, refused = estimated(run, env)
            if refused:
                print(f"{case:<26}{gib(estimate):>10}  check refuses it: {refused}", flush=True)
                continue
            r = spawn(__file__, "philora", run, env=env)
            shape = (run.length, config["hidden_size"], config["intermediate_size"])
            if (run.dtype, run.length) not in peaks:
                peaks[(run.dtype, run.length)] = matmul_peak(run.dtype, shape=shape)
            per_token = 6 if run.checkpoint_layers else 4
            utilisation = r["tokens_per_s"] * per_token * r["params"] / (peaks[(run.dtype, run.length)] * 1e9)
            peak = r["peak_rss_mb"] * 2**20
            print(f"{case:<26}{gib(estimate):>10}{gib(r['load_peak_rss_mb'] * 2**20):>11}{gib(peak):>9}"
                  f"{(estimate or 0) / peak:>9.2f}{run.length / r['tokens_per_s']:>8.1f}{r['tokens_per_s']:>7.1f}"
                  f"{utilisation:>6.0%}", flush=True)  # fmt: skip
    if args.stages != "none":
        stages(model_dir, args.work)


def stages(model_dir: Path, work: Path) -> None:
    """train (one step, adapter saved) -> merge -> export gguf q4_k_m, each timed with its peak RSS."""
    if work.exists() and any(work.iterdir()):
        sys.exit(f"--work {work}: already holds files; give a new directory")
    # no warm-up: the one step moves B, so the merge's parity check means something
    settings = ("data.max_length=512", "training_config.per_device_train_batch_size=1",
                "training_config.gradient_accumulation_steps=1", "training_config.max_steps=1",
                "training_config.predict_with_generate=false", "training_config.do_eval=false",
                "training_config.eval_strategy=no", "training_config.warmup_ratio=0")  # fmt: skip
    one_step = ["--config", "phi3-mini-4k-lora", "--set", f"model.name_or_path={model_dir}",
                *[a for s in settings for a in ("--set", s)]]  # fmt: skip
    commands = {
        "train (1 step, 512 tokens)": ["train", *one_step, "--output", str(work / "run")],
        "merge": ["merge", "--adapter", str(work / "run"), "--output", str(work / "merged")],
        "export gguf q4_k_m + verify": ["export", "gguf", "--merged", str(work / "merged"), "--output",
                                        str(work / "model-q4_k_m.gguf"), "--type", "q4_k_m"],
        "export gguf f16 + verify": ["export", "gguf", "--merged", str(work / "merged"), "--output",
                                     str(work / "model-f16.gguf"), "--type", "f16"],
    }  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'command':<30}{'seconds':>9}{'peak RSS':>10}  result", flush=True)
    for i, (name, command) in enumerate(commands.items(), 1):
        seconds, peak, log = timed([sys.executable, "-m", "philora", *command], work / f"{i}-{command[0]}.log")
        lines = [line for line in log.splitlines() if "parity" in line or "error" in line] or log.splitlines()[-1:]
        print(f"{name:<30}{seconds:>9.0f}{gib(peak):>10}  {' | '.join(lines)[-300:]}", flush=True)


def timed(command: list[str], log: Path) -> tuple[float, int, str]:
    """Run `command` with its output to `log`: (seconds, peak RSS in bytes, the log's text). A command that exits
    1 (a verification that failed) is reported as it is; one that fails otherwise stops the bench."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if process.returncode not in (0, 1) or (process.returncode and "parity" not in text):
        sys.exit(f"{' '.join(command)} failed:\n{text[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, text


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}G"


if __name__ == "__main__":
    main()
