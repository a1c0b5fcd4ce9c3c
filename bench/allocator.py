"""Memory allocators side by side: peak RSS and step time of the same training run under glibc as it comes, glibc
with a fixed mmap threshold (what philora sets in merge and export, philora/heap.py), jemalloc and tcmalloc
(Debian's libjemalloc2 and libtcmalloc-minimal4, preloaded where installed).

    python bench/allocator.py                                   # the 1b real shape, 512 tokens, checkpointing
    python bench/allocator.py --shape phi3-mini-4k --dtype float32 --steps 2

Each allocator's run is a process of its own (one warm-up step, then --steps timed); the same run for all.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from harness import spawn, work_if_worker  # noqa: E402
from real_size import made, parse_case, shape_arguments  # noqa: E402

LIBRARIES = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}


def environments() -> dict[str, dict[str, str]]:
    """Each allocator's environment: philora's own setting switched off except where it is the one measured."""
    plain = {**os.environ, "PHILORA_HEAP": "0"}
    found = {}
    for name, library in LIBRARIES.items():
        path = next((p / library for p in map(Path, ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                                                     "/lib/aarch64-linux-gnu", "/usr/lib")) if (p / library).exists()),
                    None)  # fmt: skip
        if path is not None:
            found[name] = {**plain, "LD_PRELOAD": str(path)}
    return {"glibc": plain, "glibc + philora's threshold": {**os.environ, "PHILORA_HEAP": "1"}, **found}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(p, "1b", steps=3)
    p.add_argument("--case", default="lora:float32:512:ckpt", help="MODE:DTYPE:LENGTH:CKPT, as bench/real_size.py")
    args = p.parse_args()
    if work_if_worker(args):
        return

    from data_prep import generate
    from train_speed import cpu_line

    model_dir = made(args.shape, args.models)
    print(cpu_line(), f"\n{args.shape}, {args.case}, {args.steps} timed steps", flush=True)
    print(f"{'allocator':<30}{'peak RSS':>10}{'load peak':>11}{'s/step':>8}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        generate(data, 600)
        run = parse_case(args.case, str(model_dir), str(data), args.steps)
        for name, env in environments().items():
            env["PHILORA_CPU_BF16"] = "1" if run.dtype == "bfloat16" else "0"
            r = spawn(__file__, "philora", run, env=env)
            print(f"{name:<30}{r['peak_rss_mb'] / 1024:>9.2f}G{r['load_peak_rss_mb'] / 1024:>10.2f}G"
                  f"{run.length * run.batch / r['tokens_per_s']:>8.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
