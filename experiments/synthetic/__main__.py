"""``python -m experiments.synthetic``: the known-answer bench of EBFT against SFT (see the package docstring).

    python -m experiments.synthetic                              # -> results/synthetic/README.md (+ csv, png)
    python -m experiments.synthetic --quick --runs R --out O     # a pipeline check in minutes

Resumable: every finished run and test is read back from ``--runs`` on the next call (same settings).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ebft.config import EBFTSettings, SamplingSettings
from ebft.core.layout import StridedLayout
from ebft.data.synthetic import make_process, mixture, save_symbol_tokenizer
from ebft.eval.oracle import exact_kl
from ebft.files import atomic_path, write_json
from ebft.models.features import FeatureNetwork
from ebft.models.loading import build_tiny_model
from experiments.synthetic import report
from experiments.synthetic.harness import Budget, chunk_ce, context_cfm, train

SETTINGS = Path(__file__).with_name("settings.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="outputs/synthetic", help="models and per-run records (not committed)")
    p.add_argument("--out", default="results/synthetic", help="the report: README.md, csv, png")
    p.add_argument("--quick", action="store_true", help="the cut-down settings (section `quick`)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the runs are small; default 1)")
    return p.parse_args(argv)


def load_settings(quick: bool):
    s = OmegaConf.load(SETTINGS)
    if not quick:
        return s
    merged = OmegaConf.merge(s, s.quick)
    merged.ablations.variants = s.quick.ablations.variants     # the quick variants replace the full list
    return merged


class Bench:
    """The processes, data and models of one bench, and the stages that train and test them."""

    def __init__(self, s, runs: Path):
        self.s, self.runs = s, runs
        p = s.process
        components = [make_process(**OmegaConf.to_container(p.component), seed=int(seed)) for seed in p.seeds]
        self.broad, self.task = mixture(components, list(p.weights)), mixture(components, list(p.task_weights))
        self.vocab = self.broad.vocab
        e = s.ebft
        self.layout = StridedLayout(int(s.chunk), int(e.context_len), int(e.stride), int(e.gen_len),
                                    int(e.num_samples))
        t = s.test
        rng = np.random.default_rng(int(t.seed))
        self.test_contexts = self.task.sample(int(t.contexts), int(t.context_len), rng)[0]
        truth = self.task.continue_from(self.task.filter(self.test_contexts), int(t.horizons[0]), 1, rng)[:, 0]
        self.test_continuations = torch.from_numpy(truth)
        self.test_chunks = self.chunks(self.task, int(t.ce_chunks), rng)
        self.records: list[dict] = []

    def chunks(self, process, num: int, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(process.sample(num, int(self.s.chunk), rng)[0])

    def new_model(self, state: dict | None = None):
        m = self.s.model
        model = build_tiny_model(vocab_size=self.vocab + 1, num_layers=int(m.layers), hidden=int(m.hidden), seed=0)
        if state is not None:
            model.load_state_dict(state)
        return model.eval()

    def method(self, **changes) -> EBFTSettings:
        e = {**OmegaConf.to_container(self.s.ebft), **changes}
        return EBFTSettings(SamplingSettings(int(e["num_samples"]), float(e["temperature"])), float(e["alpha"]),
                            float(e["gamma"]), str(e["whitening"]), rl_coef=float(e.get("rl_coef", 1.0)))

    def save_hf(self, model, directory: Path) -> None:
        """``model`` with the symbol tokenizer as an HF directory (``python train.py experiment=synthetic``
        starts from it), unless it is there."""
        if (directory / "config.json").is_file():
            return
        with atomic_path(directory) as tmp:
            tokenizer = save_symbol_tokenizer(self.vocab, tmp)
            for key in ("eos_token_id", "pad_token_id"):
                setattr(model.config, key, tokenizer.eos_token_id)
                setattr(model.generation_config, key, tokenizer.eos_token_id)
            model.config.bos_token_id = model.generation_config.bos_token_id = None
            model.save_pretrained(tmp)

    def feature_network(self, base) -> FeatureNetwork:
        e = self.s.ebft
        return FeatureNetwork(copy.deepcopy(base), layers=tuple(e.layers), pooling=str(e.pooling))

    # -------------------------------------------------------------------------------------- runs
    def run(self, name: str, start: dict, train_chunks, val_chunks, budget: Budget, seed: int,
            ebft: dict | None = None, feature_network: FeatureNetwork | None = None) -> dict:
        """One training run from the state ``start`` (SFT, or EBFT with the method changes ``ebft``), read
        back from disk when it finished before; returns its best state."""
        folder = self.runs / name
        if (folder / "run.json").is_file():
            return torch.load(folder / "state.pt", weights_only=True)
        model = self.new_model(start)
        spec = None if ebft is None else (feature_network, self.layout, self.method(**ebft))
        print(f"  {name}: {'EBFT' if ebft is not None else 'SFT'} lr {budget.lr:g}", flush=True)
        result = train(model, train_chunks, val_chunks, budget, seed, spec)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(result.state, folder / "state.pt")
        write_json({"name": name, "best_step": result.best_step, "curve": result.curve, "seconds": result.seconds,
                    "cpu_seconds": result.cpu_seconds, "lr": budget.lr, "ebft": ebft}, folder / "run.json")
        return result.state

    def record(self, name: str) -> dict:
        return json.loads((self.runs / name / "run.json").read_text())

    def test(self, name: str, state: dict, feature_network: FeatureNetwork) -> dict:
        """Test CE per chunk, the exact KLs and CFM per context (read back when done)."""
        path = self.runs / name / "test.json"
        if path.is_file():
            return json.loads(path.read_text())
        t, model = self.s.test, self.new_model(state)
        kl = exact_kl(model, self.task, self.test_contexts, list(t.horizons), num=int(t.rollouts), seed=int(t.seed))
        units = {"ce": chunk_ce(model, self.test_chunks).tolist(),
                 "cfm": context_cfm(model, feature_network, torch.from_numpy(self.test_contexts),
                                    self.test_continuations, int(t.rollouts), int(t.seed)).tolist()}
        for g, parts in kl.items():
            units.update({f"{kind}_kl/G{g}": values.tolist() for kind, values in parts.items()})
        write_json(units, path)
        return units


def budget(node, lr: float) -> Budget:
    return Budget(lr=float(lr), max_steps=int(node.max_steps), batch=int(node.get("batch", 16)),
                  eval_every=int(node.get("eval_every", 20)), patience=int(node.get("patience", 5)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    s = load_settings(args.quick)
    runs, out = Path(args.runs), Path(args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench = Bench(s, runs)
    timings, start, cpu = {}, time.time(), time.process_time()

    def stage(name):
        timings[name] = (time.time() - start, time.process_time() - cpu)
        print(f"== {name} ({timings[name][0] / 60:.1f} min)", flush=True)

    stage("pretrain")
    p = s.pretrain
    rng = np.random.default_rng(1)
    base_state = bench.run("base", None, bench.chunks(bench.broad, int(p.steps) * int(p.batch), rng),
                           bench.chunks(bench.broad, 256, rng), budget(OmegaConf.merge(p, {"max_steps": p.steps}),
                                                                       p.lr), seed=1)
    base = bench.new_model(base_state)
    bench.save_hf(base, runs / "base" / "hf_model")
    phi = bench.feature_network(base)
    y = s.yardstick
    rng = np.random.default_rng(2)
    yard_state = bench.run("yardstick", base_state, bench.chunks(bench.task, int(y.chunks), rng),
                           bench.chunks(bench.task, 256, rng), budget(OmegaConf.merge(s.finite.sft, y), y.lr), seed=2)
    tests = {"base": [bench.test("base", base_state, phi)], "yardstick": [bench.test("yardstick", yard_state, phi)]}

    stage("finite data")
    f = s.finite
    chosen: dict[tuple[int, str], float] = {}
    for size in f.sizes:
        for i, seed in enumerate(f.seeds):
            rng = np.random.default_rng(100 + int(seed))
            train_set, val_set = bench.chunks(bench.task, int(size), rng), bench.chunks(bench.task, int(f.val_chunks), rng)
            tag = f"n{size}/seed{seed}"
            if i == 0:                                   # the lr of each method, on the first seed's validation CE
                for method, grid in f.lr_grid.items():
                    scores = {}
                    for lr in grid:
                        name = f"{tag}/{method}_lr{lr:g}"
                        bench.run(name, base_state, train_set, val_set, budget(f[method], lr), int(seed),
                                  {} if method == "ebft" else None, phi)
                        scores[float(lr)] = min(ce for _, ce in bench.record(name)["curve"])
                    chosen[(int(size), method)] = min(scores, key=scores.get)
            lr_sft, lr_ebft = chosen[(int(size), "sft")], chosen[(int(size), "ebft")]
            sft = bench.run(f"{tag}/sft_lr{lr_sft:g}", base_state, train_set, val_set, budget(f.sft, lr_sft), int(seed))
            ebft = bench.run(f"{tag}/ebft_lr{lr_ebft:g}", base_state, train_set, val_set, budget(f.ebft, lr_ebft),
                             int(seed), {}, phi)
            warm = bench.run(f"{tag}/ebft_ws", sft, train_set, val_set,
                             budget(OmegaConf.merge(f.ebft, {"max_steps": f.warm_steps}), lr_ebft), int(seed), {}, phi)
            ce_only = bench.run(f"{tag}/ce_only", base_state, train_set, val_set, budget(f.ebft, lr_ebft), int(seed),
                                {"rl_coef": 0.0}, phi)
            variants = {"sft": sft, "ebft": ebft, "ebft_ws": warm, "ce_only": ce_only}
            if int(size) == int(s.ablations.size):
                for name, changes in s.ablations.variants.items():
                    variants[f"ebft_{name}"] = bench.run(f"{tag}/ebft_{name}", base_state, train_set, val_set,
                                                         budget(f.ebft, lr_ebft), int(seed),
                                                         OmegaConf.to_container(changes), phi)
            for variant, state in variants.items():
                tests.setdefault(f"{variant}@{size}", []).append(bench.test(f"{tag}/{variant}", state, phi))

    stage("controls")
    c = s.controls
    rng = np.random.default_rng(3)
    fresh, val = bench.chunks(bench.task, int(c.null_steps) * 16, rng), bench.chunks(bench.task, 256, rng)
    null = Budget(lr=float(y.lr), max_steps=int(c.null_steps), eval_every=int(c.null_steps), early_stop=False)
    tests["null: more SFT"] = [bench.test("null/sft", bench.run("null/sft", yard_state, fresh, val, null, 3), phi)]
    tests["null: EBFT"] = [bench.test("null/ebft", bench.run("null/ebft", yard_state, fresh, val, null, 3, {}, phi),
                                      phi)]
    miscalibrated = bench.new_model(yard_state)
    with torch.no_grad():
        miscalibrated.model.norm.weight.mul_(float(c.positive_scale))
    mis_state = copy.deepcopy(miscalibrated.state_dict())
    positive = Budget(lr=float(c.positive_lr), max_steps=int(c.positive_steps), eval_every=int(c.positive_steps),
                      early_stop=False)
    tests["positive: start"] = [bench.test("positive/start", mis_state, phi)]
    tests["positive: EBFT gamma 0"] = [bench.test("positive/ebft", bench.run(
        "positive/ebft", mis_state, fresh, val, positive, 4, {"gamma": 0.0}, phi), phi)]
    tests["positive: SFT"] = [bench.test("positive/sft", bench.run("positive/sft", mis_state, fresh, val, positive, 4),
                                         phi)]

    stage("report")
    records = {name: bench.record(name) for name in sorted(str(p.parent.relative_to(runs))
                                                           for p in runs.rglob("run.json"))}
    result = report.write(out, s, tests, records, chosen, timings,
                          {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()})
    print(f"\n== report: {out / 'README.md'} ({(time.time() - start) / 60:.1f} min this call)", flush=True)
    return {**result, "tests": tests}


if __name__ == "__main__":
    main()
