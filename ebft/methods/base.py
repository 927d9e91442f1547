"""Shared LightningModule plumbing for every method (SFT, EBFT, RLVR).

A method is one subclass of :class:`FineTuneModule` implementing
``training_step`` plus one YAML file in ``conf/method/`` whose ``module`` key
names the class. The base class owns: the generator (loaded from ``model.name``
or the ``init_from`` warm start), AdamW with betas (0.9, 0.95) and a warmup +
constant / cosine schedule, validation cross-entropy (all tokens and answer
tokens), and saving the final model in Hugging Face format (with LoRA: the merged model, and with
``model.quantization=4bit`` the dequantised base plus the merged adapters, ``ebft.models.quantization``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import torch

from ebft.config import ModelSettings, TrainSettings
from ebft.data.datamodule import ChunkDataModule
from ebft.data.sources import write_data_record
from ebft.files import atomic_path
from ebft.core.compat import attn_implementation, backbone_forward, lm_head, param_dtype
from ebft.core.masks import causal_chunk_mask
from ebft.models.loading import load_model, resolve_attn, resolve_dtype
from ebft.models.lora import (ADAPTER_SUBDIR, add_adapters, adapter_dir, complete_state, merged_state_dict,
                              target_modules, trainable_state)
from ebft.models.quantization import is_quantized, plain_model
from ebft.objectives.losses import cross_entropy_term, token_logprobs


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float):
    """Multiplier of the peak lr at optimizer step ``t``: linear warmup, then
    ``constant`` (1) or ``cosine`` (from 1 down to ``min_lr_ratio`` at ``total_steps``)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def generator_source(model: ModelSettings) -> str:
    """The generator's weights (under its adapters with LoRA): the warm start when given, else the base
    model; a LoRA warm start from a LoRA run keeps the base model and continues the run's adapter."""
    init = model.init_from
    if init and not (model.lora is not None and adapter_dir(init) is not None):
        return init
    return model.name


class FineTuneModule(L.LightningModule):
    """Base class: generator, optimizer, validation CE, HF export."""

    strided_rows = False  # True: the generator runs strided rows (model.attn_implementation=auto picks flex on CUDA)

    def __init__(self, settings: TrainSettings, tokenizer):
        super().__init__()
        self.settings = settings
        self.tokenizer = tokenizer
        self.save_hyperparameters({"cfg": dict(settings.record)})  # the run's resolved config, for the record
        self.generator = self.load_generator()
        self.train_dtype = next(self.generator.parameters()).dtype
        # The peft model when the generator with its adapters disabled IS the base model (LoRA over model.name,
        # not over a warm start's weights): the feature network and the KL reference run it, no copy is loaded.
        object.__setattr__(self, "base_adapters",
                           self.adapters if generator_source(settings.model) == settings.model.name else None)
        self._step_losses: list[torch.Tensor] = []

    @classmethod
    def make_datamodule(cls, settings: TrainSettings, tokenizer):
        """The data this method trains on; packed chunks unless a method says otherwise."""
        return ChunkDataModule(settings.data, tokenizer, settings.task.seq_len, settings.optim.batch_size,
                               settings.seed)

    @classmethod
    def check_data(cls, settings: TrainSettings, datamodule) -> None:
        """Checks of the settings against the loaded training data, run before any model is loaded;
        raise :class:`ebft.config.ConfigError`. None by default."""

    # ----------------------------------------------------------------- model
    def load_generator(self):
        """The trainable model, in fp32 weights (Lightning's bf16-mixed autocasts on GPU). With
        ``model.lora`` the weights stay frozen in ``model.dtype`` and ``self.adapters`` is the ``peft``
        model around the generator with its fp32 adapters (``ebft.models.lora``); else it is None. With
        ``model.quantization=4bit`` the frozen weights are loaded in 4-bit NF4 on the training device, computing
        in ``model.dtype`` (``ebft.models.quantization``)."""
        m, device = self.settings.model, self.settings.device
        dtype = resolve_dtype(m.dtype, device)
        targets = target_modules(m.name, m.lora) if m.lora is not None else None  # before the weights
        train_dtype = torch.float32 if dtype == torch.bfloat16 and m.lora is None else dtype
        model = load_model(generator_source(m), dtype=train_dtype,
                           attn_implementation=resolve_attn(m.attn_implementation, device, strided=self.strided_rows),
                           vocab_size=len(self.tokenizer), quantization=m.quantization, device=device)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        # Not a submodule: its weights are the generator's, which owns (and checkpoints) them.
        object.__setattr__(self, "adapters",
                           add_adapters(model, m.lora, targets, m.init_from) if m.lora is not None else None)
        return model

    def on_train_start(self) -> None:
        """HF models load in eval mode and Lightning does not change it: train the generator, or its
        gradient checkpointing (and dropout, where a model has any) would be off during training."""
        self.generator.train()

    def hidden(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states of a plain causal forward (batch, T, H); with ``doc_ids`` (batch, T) within
        each example, positions restarting at each (document masking, ``ebft.core.documents``)."""
        if doc_ids is None:
            return self.generator.get_decoder()(input_ids=input_ids).last_hidden_state
        model = self.generator
        mask, positions = causal_chunk_mask(doc_ids, attn_implementation(model), param_dtype(model))
        return backbone_forward(model, input_ids, positions, mask)[0]

    def doc_ids(self, batch: dict) -> torch.Tensor | None:
        """The batch's document ids when ``data.document_mask`` is on, else None."""
        return batch["doc_ids"] if self.settings.data.document_mask else None

    def sampling_generator(self, batch_idx: int) -> torch.Generator:
        """A per-step RNG for rollouts: the same (seed, step, micro-batch, rank) always draws the same
        samples, so a resumed run samples exactly what an uninterrupted one would."""
        seed = hash((self.settings.seed, self.global_step, batch_idx, self.global_rank)) % (2 ** 62)
        return torch.Generator(device=self.device).manual_seed(seed)

    def chunk_ce(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None,
                 doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the target tokens that ``loss_mask`` marks (the model's own
        head: bias and final soft-cap included); within documents with ``doc_ids``."""
        head = lm_head(self.generator)
        return cross_entropy_term(self.hidden(input_ids, doc_ids), head.weight, input_ids, loss_mask,
                                  lm_head_bias=head.bias, softcap=head.softcap)

    # ----------------------------------------------------------- finiteness
    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._step_losses.append(loss.detach())

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a non-finite loss or gradient can change a weight: the losses of this optimizer
        step's micro-batches and the total gradient norm, checked with one host sync per step. Under
        fp16 mixed precision the loss scaler skips steps with non-finite gradients itself."""
        losses, self._step_losses = self._step_losses, []
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        values = [loss.float().reshape(()) for loss in losses]
        if grads and str(self.trainer.precision) not in ("16-mixed", "16", "16-true"):
            values.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        if values and not bool(torch.stack([v.to(values[0].device) for v in values]).isfinite().all()):
            shown = ", ".join(f"{float(v):.4g}" for v in values[:len(losses)])
            norm = f", gradient norm {float(values[-1]):.4g}" if len(values) > len(losses) else ""
            raise FloatingPointError(
                f"non-finite training loss or gradient at step {self.global_step} (loss {shown}{norm}) of "
                f"method={self.settings.method.name}: stopped before the optimizer step, no weight changed; lower "
                "method.lr, check the data, or use model.dtype=float32")

    # ------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        o = self.settings.optim
        params = [p for p in self.generator.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        total = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        warmup = max(1, math.ceil(o.warmup_ratio * total)) if o.warmup_ratio > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, o.schedule, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """With LoRA, checkpoints hold the adapters only (and the optimizer state, as always): the
        frozen base weights are loaded from their source again on resume."""
        if self.adapters is not None:
            checkpoint["state_dict"] = trainable_state(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.adapters is not None:
            complete_state(self, checkpoint["state_dict"])

    # ----------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx):
        """``val/ce`` over every target token and ``val/ce_answer`` over the answer tokens (0 when there are
        none), from one forward and one pass of the LM head."""
        ids, head = batch["input_ids"], lm_head(self.generator)
        nll = -token_logprobs(self.hidden(ids, self.doc_ids(batch))[:, :-1], head.weight, ids[:, 1:],
                              lm_head_bias=head.bias, softcap=head.softcap)
        answer = batch["answer_mask"][:, 1:].to(nll.dtype)
        self.log("val/ce", nll.mean(), prog_bar=True, sync_dist=True, batch_size=ids.shape[0])
        self.log("val/ce_answer", (nll * answer).sum() / answer.sum().clamp_min(1), sync_dist=True,
                 batch_size=ids.shape[0])

    # --------------------------------------------------------------- export
    def save_hf(self, directory: str | os.PathLike, module_state: dict | None = None) -> Path:
        """Write generator + tokenizer with ``save_pretrained`` atomically (tmp dir, rename), and the
        data settings they were trained on (``ebft.data.sources.DATA_RECORD``).

        ``module_state`` is this module's full state dict when the live weights are sharded
        (FSDP: ``trainer.strategy.lightning_module_state_dict()`` gathers it on rank 0). With LoRA
        the model written has the adapters merged into its weights, and the adapter alone goes to
        ``adapter/`` next to ``directory``; over a 4-bit base it is a plain model of the dequantised
        base weights plus the merged adapters.
        """
        model, state = self.generator, None
        if self.adapters is not None:
            _replace_dir(Path(directory).with_name(ADAPTER_SUBDIR), self.adapters.save_pretrained)
            state = merged_state_dict(self.adapters)
            if is_quantized(self.generator):
                model, state = plain_model(self.generator, state), None
        elif module_state is not None:
            prefix = "generator."
            state = {k[len(prefix):]: v for k, v in module_state.items() if k.startswith(prefix)}

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, state_dict=state)
            self.tokenizer.save_pretrained(tmp)
            write_data_record(self.settings.data, tmp)

        return _replace_dir(Path(directory), write)


def _replace_dir(target: Path, write) -> Path:
    """``write(tmp)`` into a fresh temporary directory, then put it in place of ``target``."""
    with atomic_path(target) as tmp:
        write(tmp)
    return target
