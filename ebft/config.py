"""Typed settings at the boundary: the composed Hydra config becomes small frozen dataclasses ONCE,
at the entry points (``train.py`` / :mod:`ebft.app.run`, ``evaluate.py``), and every module below takes
those objects, never the config itself.

Each dataclass checks its values in ``__post_init__`` and raises :class:`ConfigError` with one clear
message per mistake, naming the key, the bad value and the fix, before any model or dataset is
loaded. :func:`train_settings` and :func:`evaluate_settings` do the conversion; the checks that
need a model's files (paths, LoRA targets) run in :func:`ebft.app.run.validate`.

The settings and who takes them:

- :class:`TaskSettings` (``task``): the geometry T, C, s, G (paper §2) and the task's pooling and suite;
- :class:`DataSettings` (``data``): the rows' source and the held-out split (``ebft.data``);
- :class:`ModelSettings` (``model``, with :class:`LoraSettings`): the generator (``ebft.methods``,
  ``ebft.models.lora``);
- :class:`FeatureNetworkSettings` (``feature_network``): the frozen feature network phi of training (EBFT's
  rewards) and of evaluation (CFM, ``val/cfm``): one spec, one factory
  (:func:`ebft.models.features.build_feature_network`);
- :class:`OptimSettings` (``method.lr``, ...): AdamW and its schedule;
- :class:`SamplingSettings` (``method.num_samples``, ...): training rollouts; :class:`DecodingSettings`:
  evaluation's generation;
- one per method, checked in ``__post_init__``: :class:`SFTSettings`, :class:`EBFTSettings`
  (``alpha`` and ``gamma`` stay top-level keys), :class:`RLVRSettings`;
- :class:`EvalSettings` (``eval``): calibration, downstream benchmarks, the verifiable reward;
- :class:`TrainSettings` / :class:`EvaluateSettings`: what ``train.py`` / ``evaluate.py`` hand down.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# The allowed values of every choice, defined here once; the modules that implement them import them.
SCHEDULES = ("constant", "cosine")
LOSS_ON = ("answer", "all")
WHITENING = ("none", "reference", "paper")            # ebft.objectives.rewards
POOLING = ("last_token", "mean", "mean_raw")          # ebft.core.layout
NORMALISATION = ("joint", "per_layer")                # ebft.models.features
REDUCTIONS = ("token_mean", "sequence_sum")           # ebft.objectives.losses
SCALE_REWARDS = ("none", "group", "batch")            # ebft.objectives.baselines (GRPO)
BASELINES = ("rloo_corrected", "rloo", "group_norm", "reinforce")   # ebft.objectives.baselines (EBFT)
ANCHORS = ("all", "answer")                           # ebft.core.anchors: which blocks are trained on / scored
ANSWER_TURNS = ("all", "last")                        # ebft.core.anchors: which assistant turns of a chat are answers
PACKING = ("stream", "examples")                      # ebft.data.packing: where chunks start
LOGGERS = ("csv", "tensorboard", "wandb")
QUANTIZATION = ("4bit",)                              # ebft.models.quantization (QLoRA); null = none

FEATURE_NETWORK = "the feature network of training and evaluation is one group, `feature_network`"
SAMPLES = "samples per context (or prompt, or problem) are `num_samples` everywhere"
RENAMED = {"model.feature_network": ("feature_network.name", FEATURE_NETWORK),
           "method.features.": ("feature_network.", FEATURE_NETWORK),
           "n_samples": ("num_samples", SAMPLES), "eval.n_samples": ("eval.num_samples", SAMPLES),
           "eval.cfm_samples": ("eval.cfm_num_samples", SAMPLES),
           "eval.reward.samples": ("eval.reward.num_samples", SAMPLES),
           "model.lora.alpha": ("model.lora.lora_alpha",
                                "LoRA's scale is peft's `lora_alpha`, apart from the diversity weight `alpha`")}
"""Keys of earlier versions: ``old -> (new, why)``; an ``old`` ending in ``.`` renames a whole group."""


def compose_config(config_name: str, overrides) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` outside a Hydra app (scripts, drivers),
    with the Hydra node so that group choices can be read."""
    check_renamed(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and how to fix it."""


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the key and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}")


def check_alpha(alpha) -> float:
    """The diversity weight ``alpha`` of eq. 67 as a float: a finite number in [0, 1] (paper App. C: 1 is the
    proper scoring rule, smaller values bias towards alignment). The one check of ``alpha``, used by the
    settings and by the reward functions."""
    number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not number or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ConfigError(f"alpha={alpha!r} must be a number in [0, 1] (paper App. C; the paper sweeps 0, 0.5, 1); "
                          "use alpha=1 for the proper scoring rule")
    return float(alpha)


def check_renamed(overrides: Sequence[str]) -> None:
    """Refuse a command-line override of a renamed key, naming the new one (Hydra would only say
    that the key is not in the config)."""
    for override in overrides:
        key = str(override).lstrip("+~").split("=", 1)[0]
        for old, (new, why) in RENAMED.items():
            if key == old.rstrip(".") or (old.endswith(".") and key.startswith(old)):
                now = new + key[len(old):] if old.endswith(".") else new
                raise ConfigError(f"{key} was renamed ({why}): use {now}=...")


# --------------------------------------------------------------------------- the pieces


def check_anchors(prefix: str, anchors: str, min_answer_prefix: int, answer_turns: str) -> None:
    """The anchor settings of training (``method.``) or evaluation (``eval.``): allowed values, and the
    knobs of answer anchors only with ``anchors=answer`` (``ebft.core.anchors``)."""
    _choice(f"{prefix}anchors", anchors, ANCHORS)
    _choice(f"{prefix}answer_turns", answer_turns, ANSWER_TURNS)
    _require(isinstance(min_answer_prefix, int) and not isinstance(min_answer_prefix, bool) and min_answer_prefix >= 0,
             f"{prefix}min_answer_prefix={min_answer_prefix!r} must be a whole number of answer tokens >= 0")
    _require(anchors == "answer" or (min_answer_prefix == 0 and answer_turns == "all"),
             f"{prefix}min_answer_prefix={min_answer_prefix} and {prefix}answer_turns={answer_turns} choose among "
             f"answer blocks, but {prefix}anchors=all uses every block; set {prefix}anchors=answer, or leave them at "
             "0 and all")


@dataclass(frozen=True)
class TaskSettings:
    """``task``: chunks of T tokens; the first context has C tokens, contexts start every s tokens and
    G tokens are generated per context (paper §2): NB = floor((T - G - C)/s) + 1 >= 1 blocks."""

    name: str
    seq_len: int
    context_len: int
    stride: int
    gen_len: int
    pooling: str = "last_token"
    eval_suite: str = "none"
    verifiable: bool = False

    def __post_init__(self):
        T, C, s, G = self.geometry
        _require(C >= 1, f"task.context_len={C} must be >= 1 (every context needs a token)")
        _require(s >= 1, f"task.stride={s} must be >= 1")
        _require(G >= 1, f"task.gen_len={G} must be >= 1")
        _require(T >= C + G, f"task.seq_len={T} is too small for context_len={C} + gen_len={G}: "
                             f"raise task.seq_len to at least {C + G} or shorten the geometry")

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        """``(T, C, s, G)``, the first four arguments of :class:`ebft.core.layout.StridedLayout`."""
        return self.seq_len, self.context_len, self.stride, self.gen_len


@dataclass(frozen=True)
class DataSettings:
    """``data``: where the rows of ``task`` come from (``source``: the resolved ``data`` node, as
    :func:`ebft.data.sources.load_rows` reads it) and the held-out split (``val_size`` rows, ``seed``);
    ``chat_template``: rows rendered with the tokenizer's chat template; ``document_mask``: in every
    strided pass (and plain causal pass over a chunk) a token attends only to tokens of its own example,
    with position ids restarting at each example (:mod:`ebft.core.documents`); ``packing``: chunks cut
    from the token stream every T tokens, or each starting at an example (:mod:`ebft.data.packing`)."""

    task: str
    source: Mapping[str, Any]
    val_size: int = 1000
    seed: int = 43
    chat_template: bool = False
    document_mask: bool = False
    packing: str = "stream"

    def __post_init__(self):
        _require(self.val_size >= 0, f"data.val_size={self.val_size} must be >= 0")
        _choice("data.packing", self.packing, PACKING)


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora`` with ``rank`` set (``ebft.models.lora``): ``lora_alpha`` (peft's name; the adapters'
    scale is lora_alpha / rank) null = 2 x rank; ``target_modules``
    null = the model family's attention and MLP projections."""

    rank: int
    lora_alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        rank = self.rank
        _require(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1,
                 f"model.lora.rank={rank!r} must be a whole number >= 1 (e.g. 16), or null for full fine-tuning")
        _require(self.lora_alpha is None or float(self.lora_alpha) > 0,
                 f"model.lora.lora_alpha={self.lora_alpha} must be > 0, or null for 2 x rank")
        _require(0 <= float(self.dropout) < 1, f"model.lora.dropout={self.dropout} must be in [0, 1)")
        targets = self.target_modules
        _require(targets is None or (not isinstance(targets, str) and len(targets) >= 1),
                 f"model.lora.target_modules={targets!r} must be a list of layer names, e.g. [q_proj,v_proj], "
                 "or null for the model family's attention and MLP projections")

    @property
    def scale_alpha(self) -> float:
        """peft's ``lora_alpha`` (the scale is lora_alpha / rank): ``lora_alpha``, or 2 x rank when null."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.rank


@dataclass(frozen=True)
class ModelSettings:
    """``model`` (+ ``init_from`` and ``method.gradient_checkpointing``): the base model ``name`` (the
    tokenizer's and, by default, the feature network's), its dtype and attention backend, LoRA (None:
    full fine-tuning), the warm start and ``quantization`` (None, or ``4bit``: the frozen base in 4-bit
    NF4 under the LoRA adapters, QLoRA, ``ebft.models.quantization``; ``dtype`` is then the compute
    dtype and that of the layers left unquantised)."""

    name: str
    dtype: str = "auto"
    attn_implementation: str = "auto"
    lora: LoraSettings | None = None
    init_from: str | None = None
    gradient_checkpointing: bool = False
    quantization: str | None = None

    def __post_init__(self):
        if self.quantization is None:
            return
        _require(self.quantization in QUANTIZATION,
                 f"model.quantization={self.quantization!r} is not one of null, {', '.join(QUANTIZATION)} "
                 "(4bit: a frozen NF4 base under LoRA adapters, QLoRA)")
        _require(self.lora is not None,
                 f"model.quantization={self.quantization} freezes the base in 4 bits and trains LoRA adapters over it, "
                 "but LoRA is off: set model.lora.rank (e.g. model.lora.rank=16), or model.quantization=null "
                 "for full fine-tuning")


@dataclass(frozen=True)
class FeatureNetworkSettings:
    """``feature_network``: the frozen feature network phi (paper §2, eqs. 2-4) of EBFT's rewards and of
    evaluation's CFM (``evaluate.py``, ``val/cfm`` during every method's training): ``name`` null = the base
    model (``model.name``); taps at depth fractions ``layers`` in (0, 1], the ``pooling`` of the G-token
    window and the ``normalisation`` of the taps (``ebft.models.features``)."""

    name: str | None = None
    layers: tuple[float, ...] = (0.25, 0.5, 0.75)
    pooling: str = "last_token"
    normalisation: str = "joint"

    def __post_init__(self):
        _choice("feature_network.pooling", self.pooling, POOLING)
        _choice("feature_network.normalisation", self.normalisation, NORMALISATION)
        layers = list(self.layers)
        _require(len(layers) >= 1 and all(not isinstance(q, bool) and isinstance(q, (int, float)) and 0 < q <= 1
                                           for q in layers),
                 f"feature_network.layers={layers} must be depth fractions in (0, 1], e.g. [0.25,0.5,0.75]")


@dataclass(frozen=True)
class OptimSettings:
    """``method.lr``, ...: AdamW (``betas``, ``weight_decay``) with a linear warmup over ``warmup_ratio`` of
    the steps, then ``constant`` or ``cosine`` down to ``min_lr_ratio`` x lr; ``batch_size`` per micro-batch."""

    lr: float
    batch_size: int
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        _require(self.lr > 0, f"method.lr={self.lr} must be > 0")
        _require(self.batch_size >= 1, f"method.batch_size={self.batch_size} must be >= 1")
        _require(0 <= self.warmup_ratio < 1, f"method.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"method.betas={list(self.betas)} must be two numbers in [0, 1)")
        _choice("method.schedule", self.schedule, SCHEDULES)


@dataclass(frozen=True)
class SamplingSettings:
    """Training rollouts: ``num_samples`` per context (EBFT) or prompt (RLVR) from
    ``softmax(logits / temperature)``.

    Training samples with ``top_p = 1``: the update scores every sampled token under the full
    distribution (the log-probs of paper eq. 7; the PPO ratio of RLVR), so tokens drawn from a top-p
    nucleus would be scored under another distribution than the one they were drawn from
    (off-policy). Refused rather than silently biased."""

    num_samples: int
    temperature: float
    top_p: float = 1.0

    def __post_init__(self):
        _require(self.temperature > 0, f"method.temperature={self.temperature} must be > 0")
        _require(self.top_p == 1,
                 f"method.top_p={self.top_p}: training scores each sampled token under the full distribution "
                 "softmax(logits / temperature) (paper eq. 7), so nucleus sampling (top_p < 1) would make the update "
                 "off-policy; use method.top_p=1.0 (the paper's setting). Evaluation's nucleus is eval.top_p")


@dataclass(frozen=True)
class SFTSettings:
    """``method=sft``: cross-entropy on the ``answer`` tokens or on ``all`` tokens of a chunk."""

    loss_on: str = "answer"
    name: str = field(default="sft", init=False)

    def __post_init__(self):
        _choice("method.loss_on", self.loss_on, LOSS_ON)


@dataclass(frozen=True)
class EBFTSettings:
    """``method=ebft`` (paper §2, Algorithm 1): rewards ``r = AT - alpha DT`` (eq. 7; ``alpha``, ``gamma``:
    the top-level keys), whitening (eqs. 8-9), loss ``rl_coef * PG + gamma * CE``.

    ``anchors``: ``all`` blocks of a chunk (the paper's), or only ``answer`` blocks, whose G ground-truth
    tokens lie in one example's answer after ``min_answer_prefix`` answer tokens, with the example's whole
    prompt in the context (``ebft.core.anchors``); ``answer_turns``: every assistant turn of a chat is an
    answer (``all``) or only the ``last`` one. ``ce_on`` None follows the anchors (answer tokens for
    answer anchors, else all tokens). ``skip_flat_groups``: a block whose n rewards are all equal is left
    out of the policy gradient (``ebft.objectives.baselines.flat_groups``)."""

    sampling: SamplingSettings
    alpha: float = 1.0
    gamma: float = 0.0
    whitening: str = "reference"
    loss_reduction: str = "token_mean"
    rl_coef: float = 1.0
    ce_on: str | None = None
    baseline: str = "rloo_corrected"
    anchors: str = "all"
    min_answer_prefix: int = 0
    answer_turns: str = "all"
    skip_flat_groups: bool = False
    name: str = field(default="ebft", init=False)

    def __post_init__(self):
        check_anchors("method.", self.anchors, self.min_answer_prefix, self.answer_turns)
        if self.ce_on is None:
            object.__setattr__(self, "ce_on", "answer" if self.anchors == "answer" else "all")
        alpha, n = check_alpha(self.alpha), self.sampling.num_samples
        _require(self.gamma >= 0, f"gamma={self.gamma} must be >= 0 (weight of the CE term)")
        _require(n >= 1, f"method.num_samples={n} must be >= 1")
        _choice("method.baseline", self.baseline, BASELINES)
        _require(n >= 2 or self.baseline == "reinforce",
                 f"method.num_samples=1: method.baseline={self.baseline} needs n >= 2 samples per context (the "
                 "leave-one-out of paper eq. 94 has no other sample); set method.num_samples>=2, or ask for plain "
                 "REINFORCE without a baseline with method.baseline=reinforce alpha=0")
        _require(not (n == 1 and self.skip_flat_groups),
                 "method.skip_flat_groups=true with method.num_samples=1: the one reward of a group is always "
                 "'all equal', so every block would be skipped; set method.num_samples>=2")
        _require(not (n == 1 and alpha > 0),
                 f"method.num_samples=1 with alpha={alpha}: the diversity term needs n >= 2 samples; "
                 "set method.num_samples>=2 or alpha=0")
        if self.baseline == "reinforce":
            log.warning("method.baseline=reinforce: plain REINFORCE, the advantages are the raw rewards (no "
                        "baseline; higher variance than the corrected leave-one-out of paper eq. 94)")
        _choice("method.whitening", self.whitening, WHITENING)
        _choice("method.loss_reduction", self.loss_reduction, REDUCTIONS)
        _choice("method.ce_on", self.ce_on, LOSS_ON)
        if alpha < 1:
            log.warning("alpha=%s < 1: the feature-matching objective is then not a proper scoring rule "
                        "(paper App. C); alpha=1 is the calibrated choice", alpha)


@dataclass(frozen=True)
class PromptSettings:
    """Which training rows become RLVR prompts (``ebft.data.prompts.select_prompts``)."""

    max_prompt_tokens: int = 1024
    check_references: bool = True

    def __post_init__(self):
        _require(self.max_prompt_tokens >= 1, f"method.max_prompt_tokens={self.max_prompt_tokens} must be >= 1")


@dataclass(frozen=True)
class RLVRSettings:
    """``method=rlvr``: GRPO with a verifiable reward (``ebft.methods.rlvr``)."""

    sampling: SamplingSettings
    max_new_tokens: int = 128
    prompts: PromptSettings = PromptSettings()
    scale_rewards: str = "group"
    ppo_epochs: int = 1
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    name: str = field(default="rlvr", init=False)

    def __post_init__(self):
        n = self.sampling.num_samples
        _require(n >= 2, f"method.num_samples={n}: GRPO needs >= 2 samples per prompt")
        _require(self.max_new_tokens >= 1, f"method.max_new_tokens={self.max_new_tokens} must be >= 1")
        _choice("method.scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _require(self.ppo_epochs == 1,
                 f"method.ppo_epochs={self.ppo_epochs}: only 1 update per rollout batch is supported (online GRPO, "
                 "as in the paper; Lightning's automatic optimisation takes one step per batch); set method.ppo_epochs=1")
        _require(0 < self.clip_eps < 1, f"method.clip_eps={self.clip_eps} must be in (0, 1); PPO's usual value is 0.2")
        _require(self.kl_coef >= 0, f"method.kl_coef={self.kl_coef} must be >= 0 (0 = no KL penalty, the paper)")


MethodSettings = SFTSettings | EBFTSettings | RLVRSettings


@dataclass(frozen=True)
class DecodingSettings:
    """How evaluation draws completions: ``num_samples`` at ``temperature`` / ``top_p`` besides the greedy one."""

    num_samples: int = 16
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 43

    def __post_init__(self):
        if self.num_samples < 0:
            raise ValueError(f"num_samples={self.num_samples} must be >= 0 (0 = greedy only)")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (greedy decoding is always included)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; 1.0 switches nucleus sampling off")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} must be >= 1")

    @property
    def prompts_per_call(self) -> int:
        """Prompts per ``generate`` call so that a call holds at most ``batch_size`` sampled sequences."""
        return max(1, self.batch_size // max(1, self.num_samples))


@dataclass(frozen=True)
class CalibrationSettings:
    """``eval``'s calibration on held-out chunks: CE, CFM with its whitened proxy, the FM profile; CFM and
    the profile score the contexts of ``anchors`` (``min_answer_prefix``, ``answer_turns``: as training's
    ``method.*``, ``ebft.core.anchors``)."""

    seed: int = 43
    cfm_chunks: int | None = None
    cfm_skip: int = 0
    cfm_num_samples: int = 4
    cfm_temperature: float = 0.6
    whitening: str = "reference"
    profile_lengths: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    profile_chunks: int | None = None
    chunk_batch_size: int = 8
    anchors: str = "all"
    min_answer_prefix: int = 0
    answer_turns: str = "all"

    def __post_init__(self):
        for key in ("cfm_chunks", "profile_chunks"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"eval.{key}={value} must be >= 1, or null for all")
        _require(self.cfm_skip >= 0, f"eval.cfm_skip={self.cfm_skip} must be >= 0")
        _choice("eval.whitening", self.whitening, WHITENING)
        check_anchors("eval.", self.anchors, self.min_answer_prefix, self.answer_turns)


@dataclass(frozen=True)
class BenchmarkSettings:
    """``eval``'s downstream benchmarks: sandbox limits, the optional benchmarks' files and toolchains."""

    seed: int = 43
    timeout: float = 3.0
    workers: int | None = None
    require_isolation: bool = False
    mbpp_path: str | None = None
    multipl_e: tuple[str, ...] = ()
    multipl_e_dir: str | None = None
    comet_python: str | None = None


@dataclass(frozen=True)
class RewardSettings:
    """``eval.reward``: how many prompts (None: all) and completions per prompt, how they are sampled
    (as RLVR's ``method.temperature``, ``top_p``, ``max_new_tokens``) and which prompts are kept
    (``max_prompt_tokens``, ``check_references``: RLVR's prompt filters)."""

    prompts: int | None = 32
    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_prompt_tokens: int = 1024
    check_references: bool = True
    batch_size: int = 4

    def __post_init__(self):
        positive = {"num_samples": self.num_samples, "max_new_tokens": self.max_new_tokens,
                    "max_prompt_tokens": self.max_prompt_tokens, "batch_size": self.batch_size}
        if self.prompts is not None:
            positive["prompts"] = self.prompts
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"eval.reward.{key}={value} must be >= 1" +
                                  (" (or null for all held-out prompts)" if key == "prompts" else ""))
        if self.temperature <= 0:
            raise ConfigError(f"eval.reward.temperature={self.temperature} must be > 0 (RLVR samples)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.reward.top_p={self.top_p} is outside (0, 1]; 1.0 keeps every token")

    @property
    def prompt_selection(self) -> PromptSettings:
        return PromptSettings(self.max_prompt_tokens, self.check_references)


@dataclass(frozen=True)
class EvalSettings:
    """``eval``: calibration, benchmarks and the verifiable reward, the reference model of paired
    comparisons, the device."""

    calibration: CalibrationSettings = CalibrationSettings()
    benchmarks: BenchmarkSettings = BenchmarkSettings()
    reward: RewardSettings = RewardSettings()
    reference: str | None = None
    device: str = "auto"


@dataclass(frozen=True)
class InTrainingEval:
    """``eval.every_n_steps`` (0 = off), ``eval.cfm_train_chunks`` (0 = no ``train/cfm_fixed``) and, with
    ``eval.downstream_limit`` > 0, the task's benchmarks on that many problems drawn with ``sampling``."""

    every_n_steps: int = 0
    cfm_train_chunks: int = 0
    downstream_limit: int = 0
    sampling: DecodingSettings | None = None

    def __post_init__(self):
        _require(self.cfm_train_chunks >= 0,
                 f"eval.cfm_train_chunks={self.cfm_train_chunks} must be >= 0 (0 = no train/cfm_fixed)")


@dataclass(frozen=True)
class TrainerSettings:
    """``trainer`` (any Lightning Trainer keyword, resolved), ``global_batch`` (chunks or prompts per optimizer
    step over all devices; sets the accumulation) and ``checkpoint_every_n_steps`` (default: the
    validation interval)."""

    kwargs: Mapping[str, Any] = field(default_factory=dict)
    global_batch: int | None = None
    checkpoint_every_n_steps: int | None = None


@dataclass(frozen=True)
class LoggerSettings:
    """``logger``: ``kind`` (csv, tensorboard, wandb) and wandb's ``project``, ``entity``, ``offline``."""

    kind: str = "csv"
    project: str | None = None
    entity: str | None = None
    offline: bool = False

    def __post_init__(self):
        _choice("logger.kind", self.kind, LOGGERS)


@dataclass(frozen=True)
class HubSettings:
    """``hub``: upload the saved model to ``repo_id`` (owner/name) at the end of the run."""

    push: bool = False
    repo_id: str | None = None
    private: bool = False

    def __post_init__(self):
        _require(not self.push or str(self.repo_id or "").count("/") == 1,
                 f"hub.push=true needs hub.repo_id=<owner/name>, got {self.repo_id!r}")


@dataclass(frozen=True)
class RunSettings:
    """What the application (``ebft.app``) needs besides the method's settings: the run directory,
    the checkpoint to resume (``ckpt_path``), the method's LightningModule (``module``, a class
    path), the Trainer, logger and hub. ``output_dir`` is None for a config composed outside a run."""

    output_dir: str | None
    module: str
    ckpt_path: str | None = None
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    hub: HubSettings = field(default_factory=HubSettings)


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``train.py`` hands to the application: the method's module, datamodule and callback take
    their parts; ``run`` is the application's own. ``record`` is the run's resolved config as plain data
    (the run directory relative to the working directory when inside it), saved with every checkpoint
    (``hyper_parameters["cfg"]``), the model card's ``config.yaml``, and read back only to check that a
    resumed checkpoint is of the same method and model."""

    method: MethodSettings
    optim: OptimSettings
    model: ModelSettings
    task: TaskSettings
    data: DataSettings
    feature_network: FeatureNetworkSettings
    eval: EvalSettings
    in_training: InTrainingEval
    seed: int = 43
    device: str = "cpu"
    record: Mapping[str, Any] = field(default_factory=dict)
    run: RunSettings = field(default_factory=lambda: RunSettings(None, "ebft.methods.ebft.EBFTModule"))


@dataclass(frozen=True)
class EvaluateSettings:
    """What ``evaluate.py`` hands to :func:`ebft.eval.runner.evaluate`: the models (``ckpt``), the metrics
    asked for (None = the default plan), ``limit``, generation ``sampling``, and ``record``: the resolved
    config without ``ckpt`` and ``output_dir`` (what a saved part must share to be taken over)."""

    ckpt: tuple[str, ...]
    metrics: tuple[str, ...] | None
    limit: int | None
    sampling: DecodingSettings
    model: ModelSettings
    task: TaskSettings
    data: DataSettings
    feature_network: FeatureNetworkSettings
    eval: EvalSettings
    output_dir: str
    seed: int = 43
    record: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.limit is not None:
            _require(self.limit >= 1, f"limit={self.limit} must be >= 1, or null for all")
        c = self.eval.calibration
        check_anchor_geometry(self.task, c.anchors, c.min_answer_prefix, "eval.")
        check_document_mask(self.data, self.model)


# --------------------------------------------------------------------------- the conversion


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    return node


NUMBERS = {"alpha": float, "gamma": float, "seed": int, "global_batch": int, "method.lr": float,
           "method.batch_size": int, "method.warmup_ratio": float, "method.weight_decay": float,
           "method.num_samples": int, "method.temperature": float, "method.top_p": float,
           "method.max_new_tokens": int, "method.min_answer_prefix": int, "task.seq_len": int,
           "task.context_len": int, "task.stride": int, "task.gen_len": int, "trainer.max_steps": int,
           "eval.min_answer_prefix": int}


def validate_numbers(cfg: DictConfig) -> None:
    """Every numeric key that is set holds a number (``alpha=abc`` names ``alpha``)."""
    for key, kind in NUMBERS.items():
        value = _get(cfg, key)
        if value is None:
            continue
        try:
            if isinstance(value, bool) or kind(value) != float(value):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}") from None


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def task_settings(task: DictConfig) -> TaskSettings:
    return TaskSettings(str(task.name), int(task.seq_len), int(task.context_len), int(task.stride),
                        int(task.gen_len), str(task.get("pooling", "last_token")), str(task.get("eval_suite", "none")),
                        bool(task.get("verifiable", False)))


def data_settings(cfg: DictConfig) -> DataSettings:
    data = cfg.data
    return DataSettings(str(cfg.task.name), _plain(data), int(data.get("val_size", 1000)), int(data.get("seed", 43)),
                        bool(data.get("chat_template", False)), bool(data.get("document_mask", False)),
                        str(data.get("packing", "stream")))


def feature_network_spec(node: DictConfig) -> FeatureNetworkSettings:
    layers = node.layers
    layers = tuple(layers) if isinstance(layers, (ListConfig, list, tuple)) else (layers,)
    return FeatureNetworkSettings(None if node.get("name") is None else str(node.name), layers,
                              str(node.pooling), str(node.normalisation))


def model_settings(cfg: DictConfig) -> ModelSettings:
    m, lora = cfg.model, cfg.model.get("lora")
    if lora is not None and lora.get("rank") is not None:
        targets = lora.get("target_modules")
        targets = tuple(str(t) for t in targets) if isinstance(targets, (ListConfig, list, tuple)) else targets
        lora = LoraSettings(lora.rank, lora.get("lora_alpha"), float(lora.get("dropout", 0.0)), targets)
    else:
        lora = None
    method = cfg.get("method") or {}
    quantization = m.get("quantization")
    return ModelSettings(str(m.name), str(m.get("dtype", "auto")), str(m.get("attn_implementation", "auto")), lora,
                         None if cfg.get("init_from") is None else str(cfg.init_from),
                         bool(method.get("gradient_checkpointing", False)),
                         None if quantization is None else str(quantization))


def eval_settings(cfg: DictConfig) -> EvalSettings:
    e, seed = cfg.eval, int(cfg.seed)
    calibration = CalibrationSettings(
        seed, _optional_int(e.get("cfm_chunks")), int(e.get("cfm_skip") or 0), int(e.cfm_num_samples),
        float(e.cfm_temperature), str(e.whitening), tuple(int(g) for g in e.profile_lengths),
        _optional_int(e.get("profile_chunks")), int(e.chunk_batch_size), str(e.get("anchors", "all")),
        int(e.get("min_answer_prefix", 0)), str(e.get("answer_turns", "all")))
    benchmarks = BenchmarkSettings(
        seed, float(e.timeout), _optional_int(e.get("workers")), bool(e.get("require_isolation", False)),
        None if e.get("mbpp_path") is None else str(e.mbpp_path), tuple(str(x) for x in e.get("multipl_e") or ()),
        None if e.get("multipl_e_dir") is None else str(e.multipl_e_dir),
        None if e.get("comet_python") is None else str(e.comet_python))
    r = e.get("reward")
    reward = RewardSettings() if r is None else RewardSettings(
        _optional_int(r.prompts), int(r.num_samples), float(r.temperature), float(r.top_p), int(r.max_new_tokens),
        int(r.max_prompt_tokens), bool(r.check_references), int(r.batch_size))
    return EvalSettings(calibration, benchmarks, reward, None if e.get("reference") is None else str(e.reference),
                        str(e.get("device", "auto")))


def decoding_settings(node, cfg: DictConfig, prefix: str = "") -> DecodingSettings:
    """Generation settings from ``node`` (num_samples, temperature, max_new_tokens) and ``cfg.eval``."""
    try:
        return DecodingSettings(num_samples=int(node.num_samples), temperature=float(node.temperature),
                        top_p=float(cfg.eval.top_p), max_new_tokens=int(node.max_new_tokens),
                        batch_size=int(cfg.eval.gen_batch_size), seed=int(cfg.seed))
    except ValueError as err:
        raise ConfigError(f"{prefix}{err}") from None


def _rollout(m: DictConfig) -> SamplingSettings:
    return SamplingSettings(int(m.num_samples), float(m.temperature), float(m.top_p))


def method_settings(cfg: DictConfig) -> MethodSettings:
    m, name = cfg.method, str(cfg.method.name)
    if name == "sft":
        return SFTSettings(str(m.get("loss_on", "answer")))
    if name == "ebft":
        _require(int(m.num_samples) >= 1, f"method.num_samples={m.num_samples} must be >= 1")
        ce_on = m.get("ce_on")
        return EBFTSettings(_rollout(m), float(cfg.alpha), float(cfg.gamma), str(m.whitening), str(m.loss_reduction),
                            float(m.rl_coef), None if ce_on is None else str(ce_on),
                            str(m.get("baseline", "rloo_corrected")), str(m.get("anchors", "all")),
                            int(m.get("min_answer_prefix", 0)), str(m.get("answer_turns", "all")),
                            bool(m.get("skip_flat_groups", False)))
    if name == "rlvr":
        _require(bool(cfg.task.get("verifiable", False)),
                 f"method=rlvr needs a verifiable reward, and task={cfg.task.name} has no verifier "
                 "(no unit tests or references to score against); use method=ebft for this task")
        _require(int(m.num_samples) >= 2, f"method.num_samples={m.num_samples}: GRPO needs >= 2 samples per prompt")
        return RLVRSettings(_rollout(m), int(m.max_new_tokens),
                            PromptSettings(int(m.max_prompt_tokens), bool(m.check_references)),
                            str(m.scale_rewards), int(m.ppo_epochs), float(m.clip_eps), float(m.kl_coef))
    raise ConfigError(f"method.name={name!r} is not one of sft, ebft, rlvr")


def optim_settings(m: DictConfig) -> OptimSettings:
    return OptimSettings(float(m.lr), int(m.batch_size), tuple(float(b) for b in m.betas), float(m.weight_decay),
                         float(m.warmup_ratio), str(m.schedule), float(m.get("min_lr_ratio", 0.1)))


def device_kind(trainer: DictConfig) -> str:
    """``cuda`` when the Trainer runs on GPUs (``trainer.accelerator`` gpu / cuda, or auto with CUDA), else ``cpu``."""
    import torch

    accel = str(trainer.get("accelerator", "auto"))
    return "cuda" if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()) else "cpu"


def in_training_eval(cfg: DictConfig) -> InTrainingEval:
    every = cfg.eval.get("every_n_steps") or 0
    if isinstance(every, float) and not every.is_integer() or int(every) < 0:
        raise ConfigError(f"eval.every_n_steps={every} must be a whole number of optimizer steps >= 0 (0 = off); "
                          "set it explicitly when trainer.val_check_interval is a fraction of an epoch")
    limit = int(cfg.eval.get("downstream_limit") or 0)
    return InTrainingEval(int(every), int(cfg.eval.get("cfm_train_chunks") or 0), limit,
                          decoding_settings(cfg.eval, cfg, prefix="eval.") if limit else None)


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The training config as typed settings; raises :class:`ConfigError` on the first bad value (checks
    that read a model's files: :func:`ebft.app.run.validate`)."""
    validate_numbers(cfg)
    task = task_settings(cfg.task)
    optim = optim_settings(cfg.method)
    method = method_settings(cfg)
    model = model_settings(cfg)
    if model.lora is not None:
        strategy = cfg.trainer.get("strategy")
        strategy = strategy.get("_target_", "") if hasattr(strategy, "get") else strategy
        _require("fsdp" not in str(strategy).lower(),
                 "model.lora with trainer=fsdp is not supported (the merged export reads the live, sharded weights); "
                 "use trainer=ddp: with adapters every device holds one frozen bf16 copy and small trainable state")
    if isinstance(method, EBFTSettings):
        check_anchor_geometry(task, method.anchors, method.min_answer_prefix, "method.")
    data = data_settings(cfg)
    check_document_mask(data, model)
    evaluation = eval_settings(cfg)
    c = evaluation.calibration
    check_anchor_geometry(task, c.anchors, c.min_answer_prefix, "eval.")
    return TrainSettings(method, optim, model, task, data, feature_network_spec(cfg.feature_network),
                         evaluation, in_training_eval(cfg), int(cfg.seed), device_kind(cfg.trainer),
                         recorded_config(cfg) if _output_dir(cfg) is not None else {}, run_settings(cfg))


def check_anchor_geometry(task: TaskSettings, anchors: str, min_answer_prefix: int, prefix: str) -> None:
    """Refuse answer anchors whose ``min_answer_prefix`` leaves no block in any chunk: a block's context
    ``x[0 : C + k*s]`` must hold at least one prompt token and ``min_answer_prefix`` answer tokens, and the
    longest context is that of the last block, ``C + (NB - 1)*s`` tokens."""
    if anchors != "answer":
        return
    T, C, s, G = task.geometry
    longest = C + (T - G - C) // s * s
    _require(min_answer_prefix <= longest - 1,
             f"{prefix}min_answer_prefix={min_answer_prefix} leaves no block in any chunk: the longest context "
             f"(C + (NB-1)*s = {longest} tokens of task.seq_len={T}) must hold at least one prompt token and "
             f"{min_answer_prefix} answer tokens; use {prefix}min_answer_prefix <= {longest - 1} or raise task.seq_len")


def check_document_mask(data: DataSettings, model: ModelSettings) -> None:
    """Document masking needs an attention backend that takes a custom mask (sdpa, eager, flex)."""
    _require(not (data.document_mask and model.attn_implementation.startswith("flash")),
             f"data.document_mask=true needs a custom attention mask, which model.attn_implementation="
             f"{model.attn_implementation} cannot take; use model.attn_implementation=auto (sdpa, or flex for "
             "strided rows on CUDA), sdpa or eager")


def _output_dir(cfg: DictConfig) -> str | None:
    """``output_dir``, or None where it does not resolve (a config composed outside a Hydra run)."""
    value = OmegaConf.select(cfg, "output_dir", throw_on_resolution_failure=False)
    return None if value is None else str(value)


def run_settings(cfg: DictConfig) -> RunSettings:
    """The application's settings (:class:`RunSettings`) of a composed training config."""
    logger, hub = cfg.get("logger") or {}, cfg.get("hub") or {}
    every = cfg.get("checkpoint_every_n_steps")
    return RunSettings(
        _output_dir(cfg), str(cfg.method.module), None if cfg.get("ckpt_path") is None else str(cfg.ckpt_path),
        TrainerSettings(_plain(cfg.trainer), _optional_int(cfg.get("global_batch")), _optional_int(every)),
        LoggerSettings(str(logger.get("kind", "csv")), logger.get("project"), logger.get("entity"),
                       bool(logger.get("offline", False))),
        HubSettings(bool(hub.get("push", False)), hub.get("repo_id"), bool(hub.get("private", False))))


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as a run records it (``hparams.yaml``, checkpoints, ``hf_model/config.yaml``):
    the run directory relative to the working directory when it lies inside it, so that a run's
    record names no path of the machine it ran on."""
    record = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    out, cwd = Path(str(record.get("output_dir", ""))), Path.cwd()
    if out.is_absolute() and out.is_relative_to(cwd):
        record["output_dir"] = str(out.relative_to(cwd))
    return record


def evaluate_settings(cfg: DictConfig) -> EvaluateSettings:
    """The evaluation config as typed settings (the request's own checks: :func:`ebft.eval.runner.check_request`)."""
    value = cfg.ckpt
    names = list(value) if isinstance(value, (list, ListConfig)) else [c.strip() for c in str(value).split(",")]
    requested = cfg.get("metrics")
    if requested is not None:
        requested = [m.strip() for m in requested.split(",")] if isinstance(requested, str) else list(requested)
    record = {k: v for k, v in _plain(cfg).items() if k not in ("ckpt", "output_dir")}
    return EvaluateSettings(tuple(str(n) for n in names if str(n)), None if requested is None else tuple(requested),
                            _optional_int(cfg.get("limit")), decoding_settings(cfg, cfg), model_settings(cfg),
                            task_settings(cfg.task), data_settings(cfg), feature_network_spec(cfg.feature_network),
                            eval_settings(cfg), str(cfg.output_dir), int(cfg.seed), record)
