"""Plan the peak memory per device of a training run from its settings, itemised, before any weight is
loaded (``python bench/memory.py <train.py overrides>``).

The peak of a step is the model state that lives across steps plus the largest working set of one
phase of the step:

    peak = weights + gradients + AdamW moments + bf16 weight copies + frozen weights
           + max(actor forward+backward, sampling, feature pass)

The state is :func:`ebft.app.strategies.estimate_memory` for the strategy's sharding (fp32 trainable
weights with one gradient and two moments each; under bf16-mixed the autocast cache of bf16 copies of
the weights the forward used; frozen weights: EBFT's feature network, a copy of the embeddings and
the layers up to the deepest tap, none under LoRA, whose feature network is the base with the
adapters off; RLVR's KL reference). Lightning zeroes gradients only after the training step's
forward, so from the second step on the gradients of the previous step are alive while the forward
holds its activations: that is the steady-state peak planned here.

Working sets per micro-batch of ``b`` rows of ``R`` tokens (EBFT: the strided row, ``R = T + n*NB*G``;
SFT: the chunk; RLVR: ``b * num_samples`` rollouts of prompt + completion):

* actor activations, :func:`layer_bytes` per token and decoder layer (saved for the backward), times
  the layers; with gradient checkpointing only each layer's input is kept and one layer is
  recomputed (and differentiated) at a time;
* the LM head: log-probs are computed 1,024 rows at a time (``ebft.objectives.losses.token_logprobs``),
  so the head's working set is a few ``1024 x V`` fp32 blocks, plus a copy of the head's weight in the
  compute dtype;
* sampling (no autograd): the KV cache of the prefill and the ``G - 1`` steps and the ``n*NB``
  sampled rows' fp32 logits;
* the feature pass (no autograd): one layer's working set over the row and the tapped residual streams.

Everything is counted in bytes of the dtypes the run uses: on CUDA (``trainer.precision`` null =
bf16-mixed) fp32 master weights and bf16 compute, the residual stream in the weights' dtype; on CPU
fp32 throughout. The constants of :func:`layer_bytes` count the tensors the Llama / Qwen2 decoder layer
of ``transformers`` saves for its backward; ``bench/README.md`` ("Memory planner") checks the plan
against measured peaks (``ebft.app.peak``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ebft.app.strategies import estimate_memory
from ebft.config import EBFTSettings, RLVRSettings, TrainSettings
from ebft.core.layout import StridedLayout
from ebft.models.architectures import ALIASES, ARCHITECTURES, shipped_config
from ebft.models.loading import load_config, random_config, resolve_dtype, resolve_source

GIB = 2 ** 30
LOGPROB_CHUNK = 1024          # rows of the LM head at a time (token_logprobs' chunk_size)
CUDA_RESERVED = 0.75 * GIB    # CUDA context, cuBLAS workspace: memory of the card no tensor gets
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4-bit codes, an 8-bit scale per 64, an fp32 scale per 256 scales
FRAGMENTATION = 0.05          # share of the card the caching allocator may hold in unusable blocks

# Strategy name (trainer.strategy or its _target_) -> the sharding of estimate_memory.
_LAYOUTS = (("deepspeed", "zero2"), ("fsdp", "full_shard"))


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of an architecture: parameter counts and the dimensions of the activations."""

    params: int
    layer_params: int
    embed_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_params: dict = field(default_factory=dict)   # rank -> adapter parameters of the targets
    lora_layer_targets: int = 0                        # adapted linear layers per decoder layer
    lora_layer_inputs: int = 0                         # the sum of their input widths

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def planning_config(name: str):
    """The ``transformers`` config of ``name`` without weights or downloads where possible: the shipped
    architecture of a known hub id (``ebft.models.architectures``), of a ``random:`` / ``tiny:`` model,
    or a local directory's ``config.json``."""
    src = resolve_source(name)
    if src.kind in ("tiny", "random"):
        return random_config(src)
    key = ALIASES.get(name, name)
    if key in ARCHITECTURES:
        return shipped_config(key)
    return load_config(name)


@functools.lru_cache(maxsize=32)
def model_shape(name: str, lora_rank: int | None = None, lora_targets: tuple[str, ...] | None = None) -> ModelShape:
    """The :class:`ModelShape` of ``name``, counted on the meta device (no memory, no download); with
    ``lora_rank``, also the adapters on the linear layers named ``lora_targets``."""
    from transformers import AutoModelForCausalLM

    config = planning_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lora, per_layer = {}, []
    if lora_rank:
        targets = set(lora_targets)

        def targeted(module):
            return [m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
        lora[lora_rank] = sum(lora_rank * (m.in_features + m.out_features) for m in targeted(model))
        per_layer = targeted(layers[0])
    return ModelShape(params=sum(p.numel() for p in model.parameters()),
                      layer_params=sum(p.numel() for p in layers[0].parameters()),
                      embed_params=model.get_input_embeddings().weight.numel(), hidden=config.hidden_size,
                      intermediate=config.intermediate_size, layers=len(layers), heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab=config.vocab_size, lora_params=lora, lora_layer_targets=len(per_layer) if lora else 0,
                      lora_layer_inputs=sum(m.in_features for m in per_layer) if lora else 0)


@dataclass(frozen=True)
class Precision:
    """Bytes per element: ``weights`` of the backbone (the residual stream's dtype), ``compute`` of the
    matmul outputs (bf16 under autocast), ``trainable`` of the trained parameters; ``mixed``: autocast."""

    weights: int
    compute: int
    trainable: int
    mixed: bool


def precision_of(settings: TrainSettings) -> Precision:
    """The dtypes ``ebft.methods.base.FineTuneModule.load_generator`` and ``ebft.app.trainer`` pick."""
    device, m = settings.device, settings.model
    dtype = resolve_dtype(m.dtype, device)
    precision = settings.run.trainer.kwargs.get("precision")
    if precision is None:
        precision = "bf16-mixed" if device.startswith("cuda") else "32-true"
    precision = str(precision)
    full = m.lora is None
    weights = 4 if full and dtype == torch.bfloat16 else dtype.itemsize
    mixed = precision.endswith("mixed")
    compute = 2 if mixed or "16" in precision else weights
    return Precision(weights=weights, compute=compute, trainable=4 if not full else weights, mixed=mixed)


def lora_casts(p: Precision, lora: bool) -> bool:
    """Whether each adapted projection saves its own copy of its input: ``peft`` casts the input to the
    fp32 adapters' dtype (a copy unless the activations are fp32) and autocast casts it back."""
    return lora and (p.mixed or p.weights != 4)


def layer_bytes(shape: ModelShape, p: Precision, trains_norms: bool, lora_rank: int = 0) -> int:
    """Bytes per token that one decoder layer saves for its backward (the Llama / Qwen2 layer of
    ``transformers``; autograd saves an operand only when the other one needs a gradient):

    - each of the two RMSNorms: its input in fp32 ``4 H`` (the residual stream itself when it is fp32,
      else its fp32 copy) and its ``rsqrt``, and the normalised input ``4 H`` when the norm's weight
      trains (full fine-tuning);
    - attention: rotated queries ``H``, rotated keys and values ``2 H_kv``, the attention output ``H``
      (which causal sdpa lays out as ``o_proj`` reads it; :func:`attention_extra` for the rest), and
      the log-sum-exp per head in fp32;
    - the SwiGLU MLP: gate, up and silu(gate), ``3 I``;
    - the projections' inputs: the two norms' outputs and the MLP product ``2 H + I``; under autocast
      with fp32 weights each of q, k, v, gate and up casts the norm output itself (``5 H + I``); under
      LoRA with a cast (:func:`lora_casts`) each adapted projection saves its own copy (the sum of their
      input widths), in the compute dtype under autocast, else in fp32;
    - LoRA: each adapted projection's ``A x`` (``lora_rank`` wide).
    """
    H, I, kv = shape.hidden, shape.intermediate, shape.kv_dim
    lora = lora_rank > 0
    norms = 2 * (4 * H + (4 * H if trains_norms else 0) + 4)
    adapter_bytes = p.compute if p.mixed else 4
    if lora_casts(p, lora):
        inputs = adapter_bytes * shape.lora_layer_inputs
    elif p.mixed and p.weights == 4:
        inputs = p.compute * (5 * H + I)
    else:
        inputs = p.weights * (2 * H + I)
    adapters = adapter_bytes * lora_rank * shape.lora_layer_targets
    return norms + p.compute * (2 * H + 2 * kv + 3 * I) + 4 * shape.heads + inputs + adapters


def attention_extra(shape: ModelShape, p: Precision, attention: str, rows: int, layout: StridedLayout | None,
                    lora: bool = False) -> int:
    """Bytes per layer that the attention implementation saves beyond :func:`layer_bytes`, for ``rows``
    rows of ``layout`` (None: plain causal rows, for which causal sdpa saves nothing more). The strided
    implementations copy the attention output into ``o_proj``'s layout (``H`` per token; saved unless
    a LoRA cast saves its own copy, :func:`lora_casts`); ``flex_attention``
    (the strided rows on CUDA) saves nothing else. The banded sdpa of strided rows on CPU (``ebft.core.masks.banded_sdpa``)
    saves the queries of the generated rows in block-major order, each band's keys and values (the
    chunk prefix of its last context and its own rows) and each band's mask, which sdpa turns from bool
    into the compute dtype in every layer. sdpa with the dense strided mask (CUDA without flex) repeats
    the keys and values to every query head."""
    if layout is None:
        return 0
    output_copy = 0 if lora_casts(p, lora) else rows * p.compute * layout.length * shape.hidden
    if attention == "flex_attention":
        return output_copy
    generated = layout.length - layout.seq_len
    if attention == "banded":
        from ebft.core.masks import band_plan
        bands = band_plan(layout)
        keys = sum(end + band for band, end, _ in bands)
        masks = sum(mask.numel() for _, _, mask in bands)
        return output_copy + rows * p.compute * (generated * shape.hidden + 2 * keys * shape.kv_dim + masks)
    return output_copy + rows * p.compute * layout.length * 2 * (shape.hidden - shape.kv_dim)


def layer_backward_bytes(shape: ModelShape, p: Precision) -> int:
    """Bytes per token in flight while one layer runs its backward, beyond what it saved: the gradient
    of its output and input (the residual, ``2 H`` in the weights' dtype) and of its widest
    intermediates (the MLP's ``2 I``, in the compute dtype)."""
    return p.weights * 2 * shape.hidden + p.compute * 2 * shape.intermediate


def head_bytes(shape: ModelShape, p: Precision, rows: int) -> int:
    """The LM head's working set over ``rows`` scored rows, a block of at most 1,024 rows at a time: the
    forward holds the block's logits in fp32 (the compute-dtype product is freed once cast) and one fp32
    temporary of the log-sum-exp, 8 bytes per logit; the backward recomputes the block and forms its
    gradient in place, which takes no more. Plus the head weight's copy in the compute dtype when it
    differs from the weights'."""
    block = min(rows, LOGPROB_CHUNK) * shape.vocab
    weight_copy = shape.vocab * shape.hidden * p.compute if p.compute != p.weights else 0
    return block * 8 + weight_copy


@dataclass
class MemoryPlan:
    """Bytes per device, itemised; :attr:`total` is the predicted peak."""

    state: dict[str, float]
    phases: dict[str, dict[str, float]]
    notes: list[str]
    describe: str
    micro_batch: int

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))

    @property
    def total(self) -> float:
        return sum(self.state.values()) + sum(self.phases[self.peak_phase].values())


def strategy_layout(settings: TrainSettings) -> tuple[str, int]:
    """(the sharding of ``estimate_memory``, devices) of ``trainer.strategy`` / ``trainer.devices`` x nodes."""
    kwargs = settings.run.trainer.kwargs
    strategy = kwargs.get("strategy", "auto")
    name = str(strategy.get("_target_", "") if hasattr(strategy, "get") else strategy).lower()
    if hasattr(strategy, "get") and "deepspeed" in name and int(strategy.get("stage", 2)) == 3:
        layout = "full_shard"
    else:
        layout = next((kind for key, kind in _LAYOUTS if key in name), "replicated")
    devices = kwargs.get("devices", 1)
    devices = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else 1
    return layout, devices * int(kwargs.get("num_nodes", 1) or 1)


def layer_forward_bytes(shape: ModelShape, p: Precision) -> int:
    """Bytes per token a decoder layer holds at once in a forward without autograd (sampling, the
    feature pass): the residual and its normalised copy ``2 H`` in fp32, queries and attention output
    ``2 H``, and the MLP's gate, up and product ``3 I`` in the compute dtype."""
    return 4 * 2 * shape.hidden + p.compute * (2 * shape.hidden + 3 * shape.intermediate)


def optimizer_bytes(shape: ModelShape, trainable: int, width: int, device: str) -> int:
    """AdamW's temporaries in ``optimizer.step``: on CUDA the multi-tensor (foreach) update holds
    ``sqrt(v)`` of every trainable parameter at once; on CPU the update runs tensor by tensor, and the
    largest tensor (the embedding) has two temporaries."""
    if device.startswith("cuda"):
        return trainable * width
    return 2 * min(trainable, shape.embed_params) * width


def _geometry(settings: TrainSettings, b: int):
    """(tokens per micro-batch, rows the LM head scores, the strided layout or None, description)."""
    method = settings.method
    if isinstance(method, EBFTSettings):
        geo = StridedLayout(*settings.task.geometry, method.sampling.num_samples)
        generated = geo.num_samples * geo.num_blocks * geo.gen_len
        return (b * geo.length, b * (generated + geo.seq_len - 1), geo,
                f"EBFT, micro-batch {b} chunk(s) of T={geo.seq_len}: strided rows of {geo.length} tokens "
                f"(n={geo.num_samples} x {geo.num_blocks} blocks x G={geo.gen_len} generated)")
    if isinstance(method, RLVRSettings):
        rows, length = b * method.sampling.num_samples, method.prompts.max_prompt_tokens + method.max_new_tokens
        return (rows * length, rows * method.max_new_tokens, None,
                f"RLVR, micro-batch {b} prompt(s) x {method.sampling.num_samples} samples of up to "
                f"{method.prompts.max_prompt_tokens} + {method.max_new_tokens} tokens")
    T = settings.task.seq_len
    return b * T, b * (T - 1), None, f"SFT, micro-batch {b} chunk(s) of T={T}"


def plan(settings: TrainSettings, micro_batch: int | None = None) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``settings`` with ``micro_batch`` rows (default ``method.batch_size``)."""
    m, method, device = settings.model, settings.method, settings.device
    b = micro_batch or settings.optim.batch_size
    targets = None
    if m.lora is not None:
        targets = tuple(m.lora.target_modules) if m.lora.target_modules else _family_targets(m.name)
    shape = model_shape(m.name, m.lora.rank if m.lora else None, targets)
    p = precision_of(settings)
    layout_kind, world = strategy_layout(settings)
    base_bytes = resolve_dtype(m.dtype, device).itemsize
    full = m.lora is None
    notes = []

    # ---- state that lives across steps
    trainable = shape.params if full else shape.lora_params[m.lora.rank]
    frozen = 0 if full else shape.params * base_bytes
    quantised = shape.layers * (shape.layer_params - 2 * shape.hidden) if m.quantization else 0
    if quantised:   # QLoRA: the decoder's linear weights in 4-bit NF4 (ebft.models.quantization)
        frozen -= quantised * (base_bytes - NF4_BYTES)
        notes.append(f"4-bit base: {quantised / 1e9:.2f}B linear weights at {8 * NF4_BYTES:.2f} bits, the rest in "
                     f"{resolve_dtype(m.dtype, device)}")
    if isinstance(method, EBFTSettings) and full:
        from ebft.models.features import tap_layers
        depth = max(tap_layers(shape.layers, settings.feature_network.layers))
        frozen += (shape.embed_params + depth * shape.layer_params) * base_bytes
        notes.append(f"feature network: a frozen copy of the embeddings and {depth} of {shape.layers} layers")
    elif isinstance(method, EBFTSettings):
        notes.append("feature network: the base with the adapters off (no copy)")
    if isinstance(method, RLVRSettings) and method.kl_coef > 0 and full:
        frozen += shape.params * base_bytes
        notes.append("KL reference: a frozen copy of the model")
    state = estimate_memory(trainable, p.trainable, frozen, layout_kind, world, p.mixed)
    state.pop("total")
    copies = state.pop("bf16 copies")   # the autocast cache: alive during the forward only

    # ---- working sets of one micro-batch
    H, L, V = shape.hidden, shape.layers, shape.vocab
    tokens, scored, geo, describe = _geometry(settings, b)
    attention = settings_attention(settings)
    per_layer = tokens * layer_bytes(shape, p, full, 0 if full else m.lora.rank) + attention_extra(shape, p, attention, b, geo, not full)
    residual = tokens * H * p.weights
    final = tokens * 4 * H * (2 if full else 1) + residual + scored * H * p.weights
    head = head_bytes(shape, p, scored)
    actor = {"bf16 weight copies (autocast)": copies} if copies else {}
    if m.gradient_checkpointing:
        actor.update({"checkpointed layer inputs": L * residual,
                      "one layer recomputed + its backward": per_layer + tokens * layer_backward_bytes(shape, p)})
    else:
        actor.update({"saved activations": L * per_layer,
                      "one layer's backward": tokens * layer_backward_bytes(shape, p)})
    actor.update({"final norm, its output and the scored rows": final, "LM head (log-prob blocks)": head})
    if quantised:
        actor["one dequantised weight"] = shape.hidden * shape.intermediate * p.compute
    if layout_kind == "full_shard":
        actor["gathered weights of two layers (sharded)"] = 2 * shape.layer_params * p.compute
    phases = {"actor forward+backward": actor}
    if geo is not None:
        kv_tokens = b * (geo.seq_len + geo.num_samples * geo.num_blocks * (geo.gen_len - 1))
        sampled = b * geo.num_samples * geo.num_blocks
        phases["sampling"] = {
            "KV cache": 2 * L * kv_tokens * shape.kv_dim * p.compute,
            "prefill: one layer's working set": b * geo.seq_len * layer_forward_bytes(shape, p),
            "sampled rows' logits": sampled * V * (p.compute + 8)}
        phases["feature pass"] = {
            "one layer's working set": tokens * layer_forward_bytes(shape, p),
            "tapped residual streams": (len(settings.feature_network.layers) + 1) * tokens * H * base_bytes}
    elif isinstance(method, RLVRSettings):
        rows = b * method.sampling.num_samples
        phases["generation"] = {"KV cache": 2 * L * tokens * shape.kv_dim * p.compute,
                                "logits of one step": rows * V * (p.compute + 8)}
    phases["optimizer step"] = {"AdamW temporaries": optimizer_bytes(shape, trainable // (world if layout_kind != "replicated" else 1),
                                                                      p.trainable, device)}
    if not full:
        base = "4-bit NF4" if quantised else str(resolve_dtype(m.dtype, device))
        notes.append(f"LoRA rank {m.lora.rank}: {trainable / 1e6:.1f}M trainable parameters; the base is frozen in {base}")
    where = "one device" if world == 1 else f"{world} devices, {layout_kind}"
    return MemoryPlan(state=state, phases=phases, notes=notes,
                      describe=f"{m.name} ({shape.params / 1e9:.2f}B parameters), {describe}; {where}; {device}",
                      micro_batch=b)


def settings_attention(settings: TrainSettings) -> str:
    """The attention of the actor's rows: ``flex_attention`` / ``banded`` (CPU sdpa) / ``sdpa`` (dense
    mask) for EBFT's strided rows, ``causal`` for plain rows."""
    from ebft.models.loading import resolve_attn

    if not isinstance(settings.method, EBFTSettings):
        return "causal"
    attn = resolve_attn(settings.model.attn_implementation, settings.device, strided=True)
    if attn == "sdpa" and not settings.data.document_mask:
        return "banded" if settings.device == "cpu" else "sdpa"
    return attn


def _family_targets(name: str) -> tuple[str, ...]:
    from ebft.models.lora import FAMILY_TARGETS
    return tuple(FAMILY_TARGETS[planning_config(name).model_type])


def usable_bytes(card_gib: float) -> float:
    """What tensors can use of a card of ``card_gib`` GiB: less the CUDA context and the allocator's slack."""
    return card_gib * GIB * (1 - FRAGMENTATION) - CUDA_RESERVED


def largest_micro_batch(settings: TrainSettings, card_gib: float, limit: int = 1024) -> int:
    """The largest micro-batch whose planned peak fits ``card_gib`` (0: not even one row)."""
    budget = usable_bytes(card_gib)
    if plan(settings, 1).total > budget:
        return 0
    low, high = 1, 2
    while high <= limit and plan(settings, high).total <= budget:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if plan(settings, mid).total <= budget else (low, mid)
    return low


def format_plan(result: MemoryPlan, card_gib: float | None = None, fits: int | None = None) -> str:
    """The plan as a table in GiB."""
    lines = [f"memory plan per device: {result.describe}", ""]
    lines.append("| item | GiB |\n|---|---:|")
    for key, value in result.state.items():
        lines.append(f"| {key} | {value / GIB:.2f} |")
    for phase, parts in result.phases.items():
        mark = " (the peak)" if phase == result.peak_phase else ""
        lines.append(f"| **{phase}{mark}** | {sum(parts.values()) / GIB:.2f} |")
        lines.extend(f"| &nbsp;&nbsp;{key} | {value / GIB:.2f} |" for key, value in parts.items())
    lines.append(f"| **predicted peak** | **{result.total / GIB:.2f}** |")
    lines.extend(f"- {note}" for note in result.notes)
    if card_gib is not None:
        verdict = ("does not fit, even with one row per micro-batch" if fits == 0 else
                   f"largest micro-batch that fits: {fits} (method.batch_size; now {result.micro_batch})")
        lines.append(f"- a {card_gib:g} GiB card ({usable_bytes(card_gib) / GIB:.1f} GiB for tensors): {verdict}")
    return "\n".join(lines)
