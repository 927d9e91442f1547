"""Will it fit? The planned peak memory per device of ``python train.py <overrides>``, itemised, in seconds
and without downloading anything (the paper's architectures ship with the project):

    python bench/memory.py experiment=paper_qa_code model=qwen2.5-7b model.lora.rank=16
    python bench/memory.py experiment=paper_qa_code model=qwen2.5-7b trainer=fsdp trainer.devices=8 --card-gib 80

The plan is for CUDA (bf16-mixed) unless ``--device cpu``. ``--card-gib G`` adds the largest micro-batch
(``method.batch_size``) whose plan fits a card of G GiB. ``--measure`` also runs two optimizer steps of the
run on this machine (its device) and prints the measured peak next to the plan.

``--check`` measures the shapes of ``CHECKS`` on this machine (CPU) and writes the table of planned against
measured peaks (bench/README.md, "Memory planner"); measurements are kept in ``--results`` and reused.
The model of the plan is ``ebft.app.memory``; the measurement ``ebft.app.peak``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ebft.app.memory import GIB, format_plan, largest_micro_batch, plan  # noqa: E402
from ebft.app.peak import measure  # noqa: E402
from ebft.config import compose_config, train_settings  # noqa: E402
from ebft.files import write_json  # noqa: E402

TOLERANCE = 0.15
# Real shapes with random weights on this machine's CPU (fp32, or the base in bf16 under LoRA): name ->
# (train.py overrides, optimizer steps measured; the last one's peak is compared). EBFT unless it says
# SFT; data: the embedded Q&A code (translation for the paper's translation recipe). Full fine-tuning
# runs two steps (from the second on, AdamW's moments and the previous gradients are alive); under LoRA
# those are the adapters' (0.1 GiB at 1B), so one step of the 1B model's paper recipe is measured.
PAPER_SHAPE = "Llama-3.2-1B, paper translation recipe (T=1024, rows of 9,168 tokens), LoRA r=16, bf16 base"
SMALL_DATA = ("data.limit=400", "data.val_size=20")   # rows of the embedded data: train and held out
CHECKS = {
    "SmolLM2-135M, T=256, full": (["model.name=random:HuggingFaceTB/SmolLM2-135M-Instruct", "task.seq_len=256",
                                   *SMALL_DATA], 2),
    "SmolLM2-135M, T=1024, SFT": (["model.name=random:HuggingFaceTB/SmolLM2-135M-Instruct", "task.seq_len=1024",
                                   "method=sft", *SMALL_DATA], 2),
    "Qwen2.5-0.5B, T=256, full": (["model.name=random:Qwen/Qwen2.5-0.5B", "task.seq_len=256", "method.batch_size=1",
                                   *SMALL_DATA], 2),
    "Llama-3.2-1B, T=256, LoRA r=16, bf16 base": (["model.name=random:meta-llama/Llama-3.2-1B", "task.seq_len=256",
                                                   "model.lora.rank=16", "model.dtype=bfloat16",
                                                   "method.batch_size=1", *SMALL_DATA], 2),
    PAPER_SHAPE: (["experiment=paper_translation", "data=embedded", "model.name=random:meta-llama/Llama-3.2-1B",
                   "model.lora.rank=16", "model.dtype=bfloat16", "global_batch=null", "method.batch_size=1",
                   "data.limit=400", "data.val_size=80"], 1),   # the held-out pairs must fill a chunk of 1,024
}


def settings_of(overrides: list[str], device: str):
    accelerator = ["trainer.accelerator=gpu"] if device == "cuda" else ["trainer.accelerator=cpu"]
    return train_settings(compose_config("train", [*overrides, *accelerator, "output_dir=unused"]))


def check(results_path: Path, only: list[str] | None = None) -> list[dict]:
    """Plan and measure the shapes of :data:`CHECKS` (``only`` these names; measurements cached in
    ``results_path``)."""
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows = []
    for name, (overrides, steps) in CHECKS.items():
        if only and name not in only:
            continue
        args = list(overrides)
        if name not in results or results[name]["overrides"] != args:
            print(f"measuring {name} ...", flush=True)
            results[name] = {"overrides": args, **measure(args, steps)}
            print(f"{name}: {results[name]}", flush=True)
            write_json(results, results_path)
        measured = results[name]["step_peak_bytes"][-1]
        predicted = plan(settings_of(args, "cpu"))
        rows.append({"shape": name, "predicted_gib": predicted.total / GIB, "measured_gib": measured / GIB,
                     "error": predicted.total / measured - 1, "phase": predicted.peak_phase,
                     "step_s": results[name]["step_seconds"][-1]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides (key=value)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="plan for this device (default cuda)")
    parser.add_argument("--card-gib", type=float, help="also the largest micro-batch that fits a card of this many GiB")
    parser.add_argument("--measure", action="store_true", help="also measure two optimizer steps on this machine")
    parser.add_argument("--json", type=Path, help="--measure: also write the plan and the measurement here")
    parser.add_argument("--check", action="store_true", help="plan vs measured peaks at the shapes of CHECKS (CPU)")
    parser.add_argument("--only", nargs="+", help="--check: only these shapes (names of CHECKS)")
    parser.add_argument("--results", type=Path, default=Path("bench/memory_check.json"),
                        help="--check: where measurements are kept (default bench/memory_check.json)")
    args = parser.parse_args(argv)
    if args.check:
        rows = check(args.results, args.only)
        print("| shape (EBFT unless SFT) | planned GiB | measured GiB | error | planned peak phase | step s |")
        print("|---|---:|---:|---:|---|---:|")
        for r in rows:
            print(f"| {r['shape']} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {r['error']:+.1%} | "
                  f"{r['phase']} | {r['step_s']:.0f} |")
        worst = max(abs(r["error"]) for r in rows)
        print(f"\nlargest error {worst:.1%} (tolerance {TOLERANCE:.0%})")
        return 0 if worst <= TOLERANCE else 1
    if args.measure:   # the plan of what is measured: this machine's device
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = settings_of(args.overrides, args.device)
    result = plan(settings)
    fits = largest_micro_batch(settings, args.card_gib) if args.card_gib else None
    print(format_plan(result, args.card_gib, fits))
    if args.measure:
        measured = measure(args.overrides)["step_peak_bytes"][-1]
        error = result.total / measured - 1
        print(f"\nmeasured on this machine: {measured / GIB:.2f} GiB ({error:+.1%} planned)")
        if args.json:
            write_json({"describe": result.describe, "planned_gib": result.total / GIB, "measured_gib": measured / GIB,
                        "error": error, "tolerance": TOLERANCE, "overrides": args.overrides}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
