#!/usr/bin/env python
"""Cost of one EBFT training step against one SFT step on the same chunk (a benchmark, not a test).

Everything runs in one process, after warm-up, and each repeat times every piece once in turn
(so slow drifts of a shared machine hit all pieces alike); the table shows medians over repeats.

Pieces (one micro-batch of ``--batch`` chunks of T tokens):

- ``sft step``: forward + backward + AdamW step over the T tokens (``cross_entropy_term`` on the
  backbone's hidden states, as ``FineTuneModule.chunk_ce``).
- ``ebft sample``: KV-cached strided sampling (``sample_strided``) + building the strided row.
- ``ebft features``: the frozen feature network over the strided row (``strided_features``).
- ``ebft update fwd+bwd``: ``ebft_update`` (rewards, advantages, and one forward over T + n*NB*G
  tokens: PG + CE) + backward.
- ``ebft optimizer``: the AdamW step.

The three EBFT pieces are :func:`ebft_step`, the calls ``EBFTModule.training_step`` makes, with the
method's settings composed from ``conf/`` (``method=ebft`` and the top-level ``alpha``, ``gamma``:
whitening, baseline, rl_coef, loss reduction, CE mask), so the benchmark times the code that trains.
- baselines, not part of the step: ``authors sampling`` (``sample_authors_style``: n copies of the
  chunk, G uncached forwards of the whole row) and ``generate() per prefix`` (for each of the NB
  prefixes ``x[0:C+k*s]`` one ``model.generate`` call with do_sample, ``num_return_sequences=n``,
  exactly G new tokens, the batch of chunks together; KV cache on).

``--ablations`` adds the slower variants the step avoids, timed in the same repeats.

Examples::

    python bench/step_cost.py                                  # CPU, SmolLM2-135M shape, T=256
    python bench/step_cost.py --model smollm2                  # real SmolLM2-135M-Instruct weights
    python bench/step_cost.py --device cuda --model qwen2.5-1.5b-shape --batch 8 --attn flex_attention
    python bench/step_cost.py --device cuda --model qwen2.5-1.5b-shape --find-max-batch --gradient-checkpointing

The last line printed is ``ebft_over_sft=<EBFT step / SFT step>``.

``--lora`` instead compares the EBFT step with full fine-tuning and with LoRA (rank ``--lora-rank`` on
the attention and MLP projections; the feature network is then the generator's own layers with the
adapters disabled), each side in a fresh process: step time, resident memory, and the bytes of the
trainable parameters plus their AdamW state; then it prints an ESTIMATE (not a measurement) of the peak
GPU memory of Qwen2.5-7B at T=1024 with and without LoRA::

    python bench/step_cost.py --lora --threads 1            # CPU, SmolLM2-135M shape, T=256
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.samplers import dense_strided_sdpa, sample_authors_style, sample_strided_nocache  # noqa: E402
import ebft.objectives.ebft_update as update_module  # noqa: E402
from ebft.config import EBFTSettings, LoraSettings, compose_config, method_settings  # noqa: E402
import ebft.objectives.losses as losses_module  # noqa: E402
import ebft.rollout.sampler as sampler_module  # noqa: E402
from ebft.core.anchors import anchored_blocks, answer_tokens  # noqa: E402
from ebft.core.documents import StridedDocuments  # noqa: E402
from ebft.core.strided import strided_hidden  # noqa: E402
from ebft.objectives.ebft_update import EBFTStatistics, actor_loss, ebft_update  # noqa: E402
from ebft.core.compat import decoder_layers  # noqa: E402
from ebft.models.features import FeatureNetwork  # noqa: E402
from ebft.models.architectures import shipped_config  # noqa: E402
from ebft.models.loading import resolve_attn  # noqa: E402
from ebft.models.lora import FAMILY_TARGETS, lora_config  # noqa: E402
from ebft.objectives.losses import cross_entropy_term  # noqa: E402
from ebft.core import masks  # noqa: E402
from ebft.core.layout import StridedLayout  # noqa: E402
from ebft.rollout.sampler import sample_strided  # noqa: E402
from ebft.rollout.sampler import sample_from_logits as _inverse_cdf  # noqa: E402

MODELS = ("smollm2-shape", "smollm2", "qwen2.5-1.5b-shape", "tiny")
ANSWER = " [answer]"   # the pieces of the answer-anchored step (--anchors answer)
ABLATIONS = ("nocache", "multinomial", "dense_attention", "copies", "full_features", "inference_mode",
             "full_logits", "checkpointed_logprobs", "eager", "mask_build")


# ------------------------------------------------------------------------------------------ models
SHAPES = {"smollm2-shape": "HuggingFaceTB/SmolLM2-135M-Instruct", "qwen2.5-1.5b-shape": "Qwen/Qwen2.5-1.5B"}


def build_generator(name: str, device: torch.device, attn: str, seed: int):
    """The trainable model in fp32 weights (GPU runs autocast to bf16, as Lightning's bf16-mixed)."""
    from transformers import AutoModelForCausalLM

    from ebft.models.loading import EMBEDDED_DEFAULT, build_tiny_model, load_model

    torch.manual_seed(seed)
    if name == "smollm2":
        model = load_model(EMBEDDED_DEFAULT, dtype=torch.float32, attn_implementation=attn)
    elif name == "tiny":
        model = build_tiny_model(attn_implementation=attn, seed=seed)
    else:
        config = shipped_config(SHAPES[name], bos_token_id=1, eos_token_id=2, pad_token_id=2)  # SmolLM2's tokenizer
        with torch.device(device):  # random init directly on the device (1.5B on CPU is slow)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device)


# ----------------------------------------------------------------------------------------- timing
class Meter:
    """Wall time (device synchronised) and peak memory of one piece."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, list[float]] = {}
        self.peaks: dict[str, float] = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM (the peak RSS) to the current RSS
                Path("/proc/self/clear_refs").write_text("5")

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

    @contextlib.contextmanager
    def time(self, name: str, record: bool):
        self.sync()
        self.reset_peak()
        start = time.perf_counter()
        yield
        self.sync()
        elapsed = time.perf_counter() - start
        if record:
            self.times.setdefault(name, []).append(elapsed)
            self.peaks[name] = max(self.peaks.get(name, 0.0), self.peak_gib())

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


# ------------------------------------------------------------------------------------------ steps
def ebft_method(n: int, temperature: float | None = None, whitening: str | None = None,
                anchors: str | None = None) -> EBFTSettings:
    """The settings of ``python train.py method=ebft`` (alpha, gamma, whitening, baseline, rl_coef, loss
    reduction, CE mask, temperature, anchors) with ``n`` samples per context and the knobs given here."""
    overrides = ["method=ebft", f"method.num_samples={n}"]
    overrides += [f"method.temperature={temperature}"] if temperature is not None else []
    overrides += [f"method.whitening={whitening}"] if whitening is not None else []
    overrides += [f"method.anchors={anchors}"] if anchors is not None else []
    return method_settings(compose_config("train", overrides))


def ebft_step(generator, feature_network, layout: StridedLayout, ids: torch.Tensor, answer_mask: torch.Tensor,
              method: EBFTSettings, rng: torch.Generator, opt=None, meter: Meter | None = None,
              record: bool = False, fields: dict | None = None, document_mask: bool = False,
              suffix: str = "") -> tuple[torch.Tensor, EBFTStatistics]:
    """The EBFT step as ``EBFTModule.training_step`` makes it (anchored blocks, sample, features,
    ``ebft_update``, backward), each piece timed by ``meter`` when given (its name + ``suffix``); returns
    the strided rows and the update's statistics. ``fields``: the batch's other fields (``doc_ids``,
    ``doc_pos``, ``last_answer_mask``), which answer anchors and ``document_mask`` read."""
    def timed(name):
        return meter.time(name + suffix, record) if meter is not None else contextlib.nullcontext()

    s, m = method.sampling, method
    batch = {"input_ids": ids, "answer_mask": answer_mask, **(fields or {})}
    used = anchored_blocks(layout, batch, m.anchors, m.min_answer_prefix, m.answer_turns)
    with timed("ebft sample"):
        docs = StridedDocuments(layout, batch["doc_ids"]) if document_mask else None
        tokens = sample_strided(generator, ids, layout, temperature=s.temperature, top_p=s.top_p, generator=rng,
                                documents=docs)
        row = layout.scatter_generated(ids, tokens)
    with timed("ebft features"):
        gen_f, gt_f = feature_network.strided_features(row, layout, docs)
    with timed("ebft update fwd+bwd"):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss, stats = ebft_update(generator, layout, row, tokens, gen_f, gt_f, method,
                                  answer_tokens(batch, m.answer_turns), used, docs)
        loss.backward()
    return row, stats


def synthetic_examples(batch: int, seq_len: int, prompt_len: int, answer_len: int) -> dict[str, torch.Tensor]:
    """Chunk fields of a stream of synthetic prompt/answer examples (``--prompt-len`` prompt tokens, then
    ``--answer-len`` answer tokens, its EOS included; no real text): chunk b is the stream's tokens
    ``b*T .. (b+1)*T - 1``, so chunks after the first may start inside an example, as packed data does.
    What answer anchors and document masking read: ``answer_mask``, ``doc_ids``, ``doc_pos``,
    ``last_answer_mask``."""
    length = prompt_len + answer_len
    stream = torch.arange(batch * seq_len).view(batch, seq_len)
    pos = stream % length
    answer = pos >= prompt_len
    return {"answer_mask": answer, "doc_ids": stream // length, "doc_pos": pos, "last_answer_mask": answer}


class Bench:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.generator = build_generator(args.model, device, args.attn, args.seed)
        if args.gradient_checkpointing:
            self.generator.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fdtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.adapters = None
        if args.arm == "lora":  # as model.lora: the base frozen in the model dtype, fp32 adapters
            from peft import get_peft_model

            lora = LoraSettings(rank=args.lora_rank)
            targets = FAMILY_TARGETS[self.generator.config.model_type]
            self.adapters = get_peft_model(self.generator.to(fdtype), lora_config(lora, targets))
        self.generator.train()
        self.feature_network = FeatureNetwork(self.generator, layers=(0.25, 0.5, 0.75), pooling=args.pooling,
                                       adapters=self.adapters).to(fdtype)
        self.opt = torch.optim.AdamW([p for p in self.generator.parameters() if p.requires_grad], lr=1e-6,
                                     betas=(0.9, 0.95), weight_decay=0.0)
        self.layout = StridedLayout(args.T, args.C, args.s, args.G, args.n).to(device)
        self.method = ebft_method(args.n, args.temperature, args.whitening)
        self.answer_method = ebft_method(args.n, args.temperature, args.whitening, anchors="answer")
        self.blocks_used: float | None = None   # of the last answer-anchored step
        self.rng = torch.Generator(device=device).manual_seed(args.seed)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def chunk(self, batch: int) -> torch.Tensor:
        vocab = self.generator.config.vocab_size
        return torch.randint(0, vocab, (batch, self.args.T), generator=torch.Generator().manual_seed(1)).to(self.device)

    # -- the two steps ------------------------------------------------------------------------------
    def sft_step(self, meter: Meter, ids: torch.Tensor, record: bool):
        weight = self.generator.get_output_embeddings().weight
        with meter.time("sft step", record), _attention(self.generator, "sdpa"):  # as SFT training loads it
            self.opt.zero_grad(set_to_none=True)
            with self.autocast():
                hidden = self.generator.get_decoder()(input_ids=ids).last_hidden_state
                loss = cross_entropy_term(hidden, weight, ids)
            loss.backward()
            self.opt.step()
        return loss.detach()

    def ebft_step(self, meter: Meter, ids: torch.Tensor, record: bool):
        with self.autocast():
            answer_mask = torch.ones_like(ids, dtype=torch.bool)
            row, stats = ebft_step(self.generator, self.feature_network, self.layout, ids, answer_mask, self.method,
                                   self.rng, self.opt, meter, record)
        with meter.time("ebft optimizer", record):
            self.opt.step()
        return row, stats.advantages

    def answer_step(self, meter: Meter, ids: torch.Tensor, record: bool) -> float:
        """``--anchors answer``: the EBFT step with answer anchors (and ``--document-mask``) on the synthetic
        examples of :func:`synthetic_examples`, pieces timed as ``... [answer]``; returns the fraction of
        blocks used."""
        a = self.args
        fields = {k: v.to(self.device) for k, v in synthetic_examples(len(ids), a.T, a.prompt_len, a.answer_len).items()}
        with self.autocast():
            _, stats = ebft_step(self.generator, self.feature_network, self.layout, ids, fields["answer_mask"],
                                 self.answer_method, self.rng, self.opt, meter, record, fields, a.document_mask,
                                 ANSWER)
        with meter.time("ebft optimizer" + ANSWER, record):
            self.opt.step()
        return stats.block_used.float().mean().item()

    # -- baselines and ablations --------------------------------------------------------------------
    def authors_sampling(self, meter, ids, record):
        with self.autocast(), meter.time("authors sampling", record):
            sample_authors_style(self.generator, ids, self.layout, temperature=self.method.sampling.temperature,
                                 generator=self.rng)

    def generate_per_prefix(self, meter, ids, record):
        a, layout, model = self.args, self.layout, self.generator
        was_training = model.training
        model.eval()
        with self.autocast(), meter.time("generate() per prefix", record), torch.inference_mode():
            for end in layout.context_end.tolist():
                model.generate(ids[:, :end], attention_mask=torch.ones_like(ids[:, :end]), do_sample=True,
                               temperature=self.method.sampling.temperature, top_p=1.0, top_k=0, max_new_tokens=a.G,
                               min_new_tokens=a.G, num_return_sequences=a.n, use_cache=True,
                               pad_token_id=0)
        model.train(was_training)

    def ablations(self, meter, ids, row, advantages, record):
        """The variants the step avoids, each timed like the piece it replaces."""
        a, layout, model, m = self.args, self.layout, self.generator, self.method
        which = set(a.ablations)

        def actor(name):
            with self.autocast(), meter.time(name, record):
                self.opt.zero_grad(set_to_none=True)
                loss, _, _ = actor_loss(model, layout, row, advantages, temperature=m.sampling.temperature, gamma=m.gamma)
                loss.backward()

        def sample(name):
            with self.autocast(), meter.time(name, record):
                sample_strided(model, ids, layout, temperature=self.method.sampling.temperature, generator=self.rng)

        def features(name, single=None, rows=None):
            with self.autocast(), meter.time(name, record):
                self.feature_network.strided_features(row if rows is None else rows, single or layout)

        if "nocache" in which:
            with self.autocast(), meter.time("abl: sampling without KV cache (G full-row forwards)", record):
                sample_strided_nocache(model, ids, layout, temperature=m.sampling.temperature, generator=self.rng)
        if "multinomial" in which:
            with _patched(sampler_module, "sample_from_logits", _multinomial_sample_from_logits):
                sample("abl: sampling, torch.multinomial draws")
        if "dense_attention" in which:
            with dense_strided_sdpa():
                sample("abl: sampling, dense sdpa step masks")
                features("abl: features, dense sdpa mask")
                actor("abl: actor fwd+bwd, dense sdpa mask")
        if "copies" in which:
            single = StridedLayout(a.T, a.C, a.s, a.G, 1).to(self.device)
            copies = single.scatter_generated(ids.repeat_interleave(a.n, 0),
                                              row[:, layout.token_index].flatten(0, 1).unsqueeze(1))
            adv = advantages.flatten(0, 1).unsqueeze(1)
            with self.autocast(), meter.time("abl: actor fwd+bwd, n copies of the chunk", record):
                self.opt.zero_grad(set_to_none=True)
                loss, _, _ = actor_loss(model, single, copies, adv, temperature=m.sampling.temperature, gamma=m.gamma)
                loss.backward()
            features("abl: features, n copies of the chunk", single, copies)
        if "full_features" in which:
            with self.autocast(), meter.time("abl: features, full depth + LM head", record), torch.no_grad():
                model.eval()
                hidden = strided_hidden(model, row, layout)
                model.get_output_embeddings()(hidden)
                model.train()
        if "inference_mode" in which:
            with torch.inference_mode():
                features("abl: features under inference_mode (step: no_grad)")
        if "full_logits" in which:
            with self.autocast(), meter.time("abl: actor fwd+bwd, full-length fp32 logits", record):
                self.opt.zero_grad(set_to_none=True)
                hidden = strided_hidden(model, row, layout)
                logits = model.get_output_embeddings()(hidden).float()  # (B, length, V), as the authors
                logp_t = (logits / self.method.sampling.temperature).log_softmax(-1)
                pg = logp_t[:, layout.score_index].gather(-1, row[:, layout.token_index, None])[..., 0]
                ce = logits.log_softmax(-1)[:, : a.T - 1].gather(-1, row[:, 1: a.T, None])[..., 0]
                (-(pg * layout.broadcast_to_tokens(advantages)).mean() - self.method.gamma * ce.mean()).backward()
        if "checkpointed_logprobs" in which:
            with _patched(losses_module, "token_logprobs", _checkpointed_token_logprobs), \
                    _patched(update_module, "token_logprobs", _checkpointed_token_logprobs):
                actor("abl: actor fwd+bwd, log-probs by checkpointed autograd")
        if "eager" in which:
            with _attention(model, "eager"):
                actor("abl: actor fwd+bwd, eager attention")
        if "mask_build" in which:
            impl = model.config._attn_implementation
            with meter.time("abl: building the step's masks (uncached)", record):
                masks._build_mask(layout, impl, torch.float32, None, None)
                for g in range(a.G - 1):
                    rows = layout.step_rows(g)
                    masks._build_mask(layout, impl, torch.float32, rows, rows.stop)
                if masks._use_banded(self.device):
                    masks.band_plan(StridedLayout(a.T, a.C, a.s, a.G, a.n).to(self.device))
        self.opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _attention(model, implementation: str):
    """``model`` with another attention implementation within the block."""
    old = model.config._attn_implementation
    if old != implementation:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if old != implementation:
            model.set_attn_implementation(old)


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _multinomial_sample_from_logits(logits, temperature, top_p, generator):
    """The sampler's draw with ``torch.multinomial`` (top_p = 1 only): the previous implementation."""
    if temperature == 0 or top_p < 1:
        return _inverse_cdf(logits, temperature, top_p, generator)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def _checkpointed_token_logprobs(hidden, lm_head_weight, targets, temperature=1.0, chunk_size=1024,
                                 lm_head_bias=None, softcap=None):
    """Log-probs by plain autograd ops under activation checkpointing per chunk: the previous
    implementation (same values; the backward recomputes the chunk's whole autograd graph)."""
    from torch.utils.checkpoint import checkpoint

    def chunk(h, w, b, t):
        logits = torch.nn.functional.linear(h, w, b).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        return logits.log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)

    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    pieces = [checkpoint(chunk, flat_h[i:i + chunk_size], lm_head_weight, lm_head_bias, flat_t[i:i + chunk_size],
                         use_reentrant=False) for i in range(0, max(flat_t.shape[0], 1), chunk_size)]
    return torch.cat(pieces).reshape(targets.shape)


# -------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default="smollm2-shape", choices=MODELS,
                   help="smollm2-shape: SmolLM2-135M architecture, random init; smollm2: its real weights; "
                        "qwen2.5-1.5b-shape: Qwen2.5-1.5B architecture, random init (GPU); tiny: tests' model")
    p.add_argument("--T", type=int, default=None, help="chunk length (default 1024 on cuda, 256 on cpu)")
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--s", type=int, default=8)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="chunks per micro-batch")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the method's)")
    p.add_argument("--whitening", default=None, help="none | reference | paper (default: the method's)")
    p.add_argument("--pooling", default="last_token")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "eager", "flex_attention"),
                   help="attention of the strided rows; auto = what training picks (flex_attention on CUDA, "
                        "sdpa on CPU); the SFT step always runs sdpa, as SFT training does")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for the MFU (default: 989 on H100/H200, 312 on A100)")
    p.add_argument("--json", default=None, help="also write the summary (ebft_over_sft, actor MFU, ...) here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-authors", action="store_true", help="skip the authors-style sampling baseline")
    p.add_argument("--no-generate", action="store_true", help="skip the per-prefix generate() baseline")
    p.add_argument("--anchors", default="all", choices=("all", "answer"),
                   help="answer: also time the step with method.anchors=answer on synthetic prompt/answer examples "
                        "and print the fraction of blocks used next to the anchors=all step")
    p.add_argument("--prompt-len", type=int, default=64, help="--anchors answer: prompt tokens per synthetic example")
    p.add_argument("--answer-len", type=int, default=128, help="--anchors answer: answer tokens per synthetic example")
    p.add_argument("--document-mask", action="store_true",
                   help="--anchors answer: with data.document_mask=true (each example attends only to itself)")
    p.add_argument("--ablations", nargs="*", default=[], choices=("all", *ABLATIONS),
                   help="also time the slower variants the step avoids")
    p.add_argument("--find-max-batch", action="store_true",
                   help="GPU: double --batch until the EBFT step runs out of memory; report the largest that fits")
    p.add_argument("--lora", action="store_true",
                   help="EBFT step with full fine-tuning vs LoRA (one process each) + a Qwen2.5-7B GPU memory estimate")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--arm", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)  # one side of --lora
    args = p.parse_args(argv)
    if args.T is None:
        args.T = 1024 if args.device.startswith("cuda") else 256
    args.attn = resolve_attn(args.attn, args.device, strided=True)
    if "all" in args.ablations:
        args.ablations = list(ABLATIONS)
    return args


def find_max_batch(bench: Bench, meter: Meter) -> None:
    """Double the micro-batch until the EBFT step (and the SFT step) no longer fit in GPU memory."""
    if bench.device.type != "cuda":
        raise SystemExit("--find-max-batch needs --device cuda (CPU memory is not probed)")
    batch, best = bench.args.batch, None
    while True:
        try:
            ids = bench.chunk(batch)
            bench.ebft_step(meter, ids, record=False)
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            bench.ebft_step(meter, ids, record=False)
            torch.cuda.synchronize()
            ebft_s, ebft_peak = time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2 ** 30
            best = (batch, ebft_s, ebft_peak)
            print(f"batch {batch:4d}: EBFT step {ebft_s:8.3f} s  peak {ebft_peak:7.2f} GiB  "
                  f"({batch * bench.layout.length} strided tokens)", flush=True)
            batch *= 2
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch:4d}: out of memory", flush=True)
            break
        finally:
            bench.opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    if best is not None:
        print(f"max_batch={best[0]} (EBFT step {best[1]:.3f} s, peak {best[2]:.2f} GiB)")


# ------------------------------------------------------------------------------------------- LoRA
def vm_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def run_arm(bench: Bench, meter: Meter) -> None:
    """One side of ``--lora``: the EBFT step after warm-up; prints one ``ARM {json}`` line."""
    args, parts = bench.args, ("ebft sample", "ebft features", "ebft update fwd+bwd", "ebft optimizer")
    setup_rss = vm_rss_gib()
    ids = bench.chunk(args.batch)
    for rep in range(args.warmup + args.repeats):
        bench.ebft_step(meter, ids, rep >= args.warmup)
    trainable = [p for p in bench.generator.parameters() if p.requires_grad]
    frozen = [p for p in bench.generator.parameters() if not p.requires_grad]
    print("ARM " + json.dumps({
        "arm": args.arm, "step_s": sum(meter.median(p) for p in parts),
        "setup_rss_gib": setup_rss, "step_peak_rss_gib": max(meter.peaks[p] for p in parts),
        "trainable_params": sum(p.numel() for p in trainable), "trainable_bytes": tensor_bytes(trainable),
        "adam_bytes": tensor_bytes(t for state in bench.opt.state.values() for t in state.values()),
        "frozen_generator_bytes": tensor_bytes(frozen), "feature_network_bytes": tensor_bytes(bench.feature_network.parameters()),
    }), flush=True)


def compare_lora(args, argv: list[str]) -> None:
    """``--lora``: each side in its own process (so resident memory is its own)."""
    arms = {}
    for arm in ("full", "lora"):
        cmd = [sys.executable, __file__, *[a for a in argv if a != "--lora"], "--arm", arm]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{arm} side failed:\n{done.stderr[-3000:]}")
        arms[arm] = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("ARM "))[4:])
        print(f"  {arm}: {arms[arm]}", flush=True)
    print(f"\n| {args.model}, T={args.T}, batch {args.batch}, {args.device} | full fine-tuning | LoRA r={args.lora_rank} |")
    print("|---|---:|---:|")
    rows = [("EBFT step, median s", "step_s", "{:.2f}"), ("resident memory after setup, GiB", "setup_rss_gib", "{:.2f}"),
            ("peak resident memory in the step, GiB", "step_peak_rss_gib", "{:.2f}"),
            ("trainable parameters", "trainable_params", "{:,}")]
    for label, key, fmt in rows:
        print(f"| {label} | {fmt.format(arms['full'][key])} | {fmt.format(arms['lora'][key])} |")
    for label, fn in (("trainable weights + AdamW state, MiB", lambda a: (a["trainable_bytes"] + a["adam_bytes"]) / 2 ** 20),
                      ("feature network's own weights, MiB", lambda a: a["feature_network_bytes"] / 2 ** 20)):
        print(f"| {label} | {fn(arms['full']):.1f} | {fn(arms['lora']):.1f} |")
    print("\nThe planned peak of a run at any shape, itemised: python bench/memory.py <train.py overrides>")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lora:
        compare_lora(args, sys.argv[1:] if argv is None else list(argv))
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bench = Bench(args, device)
    meter = Meter(device)
    lay = bench.layout
    print(f"model={args.model} device={device} attn={args.attn} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} grad_ckpt={args.gradient_checkpointing}")
    print(f"T={args.T} C={args.C} s={args.s} G={args.G} n={args.n} batch={args.batch}: NB={lay.num_blocks}, "
          f"strided row {lay.length} tokens (chunk {args.T} + {args.n * lay.num_blocks * args.G} generated)",
          flush=True)
    if args.find_max_batch:
        find_max_batch(bench, meter)
        return
    if args.arm:
        run_arm(bench, meter)
        return
    ids = bench.chunk(args.batch)
    for rep in range(args.warmup + args.repeats):
        record = rep >= args.warmup
        row, adv = bench.ebft_step(meter, ids, record)
        if args.anchors == "answer":
            bench.blocks_used = bench.answer_step(meter, ids, record)
        bench.sft_step(meter, ids, record)
        if not args.no_authors:
            bench.authors_sampling(meter, ids, record)
        if not args.no_generate:
            bench.generate_per_prefix(meter, ids, record)
        if args.ablations:
            bench.ablations(meter, ids, row, adv, record)
        print(f"  repeat {rep + 1}/{args.warmup + args.repeats}{'' if record else ' (warm-up)'}: "
              + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in meter.times.items() if k.startswith(("ebft", "sft"))
                          and record), flush=True)
    report(meter, args, bench)


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks (SXM)


def actor_flops(model, layout: StridedLayout, batch: int) -> float:
    """Model FLOPs of one actor forward + backward over ``batch`` strided rows (the useful work, mask-aware):

    ``6 * tokens * P_layers`` (decoder-layer matmuls: 2 per parameter and token forward, 4 backward)
    ``+ 6 * scored * V * H`` (LM head on the ``n*NB*G`` scoring rows and ``T - 1`` CE rows)
    ``+ 12 * L * heads * d_head * pairs`` (QK^T and PV over the allowed query-key pairs of the strided
    rule, forward 4 and backward 8 per pair, head dimension and layer).
    """
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = decoder_layers(model)
    layer_params = sum(p.numel() for p in layers.parameters())
    tokens = batch * layout.length
    scored = batch * (layout.num_samples * layout.num_blocks * layout.gen_len + layout.seq_len - 1)
    pairs = batch * int(layout.allowed().sum())
    return (6 * tokens * layer_params + 6 * scored * cfg.vocab_size * cfg.hidden_size
            + 12 * len(layers) * heads * head_dim * pairs)


def peak_flops(device: torch.device, override: float | None) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (``--peak-tflops`` or a known GPU), None where unknown."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def report(meter: Meter, args, bench: Bench) -> dict:
    med = {k: meter.median(k) for k in meter.times}
    parts = ("ebft sample", "ebft features", "ebft update fwd+bwd", "ebft optimizer")
    ebft, sft = sum(med[p] for p in parts), med["sft step"]
    mem = "peak GiB (GPU allocated)" if meter.device.type == "cuda" else "peak RSS GiB"
    print(f"\n| piece | median s | x SFT step | {mem} |\n|---|---:|---:|---:|")
    for name in ("sft step", *parts):
        print(f"| {name} | {med[name]:.3f} | {med[name] / sft:.2f} | {meter.peaks[name]:.2f} |")
    print(f"| **ebft step (sum)** | {ebft:.3f} | {ebft / sft:.2f} | {max(meter.peaks[p] for p in parts):.2f} |")
    answer = sum(med[p + ANSWER] for p in parts) if args.anchors == "answer" else None
    if answer is not None:
        print(f"| **ebft step, anchors=answer{', document mask' if args.document_mask else ''} (sum)** | {answer:.3f} "
              f"| {answer / sft:.2f} | {max(meter.peaks[p + ANSWER] for p in parts):.2f} |")
    for name in sorted(k for k in med if k not in parts and k != "sft step" and not k.endswith(ANSWER)):
        print(f"| {name} | {med[name]:.3f} | {med[name] / sft:.2f} | {meter.peaks[name]:.2f} |")
    print()
    if "authors sampling" in med:
        speedup = med["authors sampling"] / med["ebft sample"]
        print(f"strided sampler speedup over authors-style sampling: {speedup:.2f}x")
        print(f"EBFT step with authors-style sampling / SFT: "
              f"{(ebft - med['ebft sample'] + med['authors sampling']) / sft:.2f}x")
    if "generate() per prefix" in med:
        print(f"strided sampler speedup over per-prefix generate(): "
              f"{med['generate() per prefix'] / med['ebft sample']:.2f}x")
    print(f"highest peak of any piece: {max(meter.peaks.values()):.2f} GiB")
    flops = actor_flops(bench.generator, bench.layout, args.batch)
    achieved = flops / med["ebft update fwd+bwd"]
    peak = peak_flops(meter.device, args.peak_tflops)
    mfu = achieved / peak if peak else None
    print(f"generator fwd+bwd (actor): {flops / 1e12:.3f} TFLOP in {med['ebft update fwd+bwd']:.3f} s = "
          f"{achieved / 1e12:.2f} TFLOP/s" + (f", MFU {mfu:.3f} of {peak / 1e12:.0f} TFLOP/s" if mfu else
                                               " (MFU: unknown device peak, give --peak-tflops)"))
    if answer is not None:
        print(f"anchors=answer on synthetic examples (prompt {args.prompt_len} + answer {args.answer_len} tokens"
              f"{', document mask' if args.document_mask else ''}): fraction of blocks used {bench.blocks_used:.3f} "
              f"(of NB={bench.layout.num_blocks} per chunk); EBFT step {answer:.3f} s vs {ebft:.3f} s with anchors=all "
              f"(answer_over_all={answer / ebft:.3f})")
    print(f"ebft_over_sft={ebft / sft:.3f}")
    summary = {"model": args.model, "device": str(meter.device), "attn": args.attn, "T": args.T, "n": args.n,
               "batch": args.batch, "strided_tokens": bench.layout.length, "sft_step_s": sft, "ebft_step_s": ebft,
               "actor_s": med["ebft update fwd+bwd"], "sample_s": med["ebft sample"],
               "ebft_over_sft": ebft / sft, "actor_tflops": achieved / 1e12, "actor_mfu": mfu,
               "peak_gib": max(meter.peaks.values())}
    if answer is not None:
        summary.update(answer_step_s=answer, blocks_used=bench.blocks_used, document_mask=args.document_mask)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
