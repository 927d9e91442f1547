"""Training with answer anchors: the learning test on a fixed micro-batch of prompt/answer chunks (CFM of
the answer blocks falls), and the clear errors before any model loads."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from bench.step_cost import ebft_step, synthetic_examples
from ebft.config import ConfigError, train_settings
from ebft.core.anchors import anchored_blocks
from ebft.methods.ebft import EBFTModule
from ebft.models.features import FeatureNetwork
from ebft.models.loading import build_tiny_model, load_tokenizer
from ebft.objectives.rewards import cfm_estimate
from ebft.rollout.sampler import sample_strided
from tests.test_learning import FEATURES, LEARN, VOCAB, periodic_chunks
from tests.test_train import make_cfg, train


def answer_chunks(count: int) -> dict[str, torch.Tensor]:
    """Periodic chunks of T=32 tokens read as two examples each: prompt 6 + answer 10, prompt 6 + answer
    10. With C=s=G=4 the answer blocks are k = 1, 2, 5, 6 of the 7."""
    ids = periodic_chunks(count)
    answer = torch.tensor(([False] * 6 + [True] * 10) * 2).expand(count, -1)
    docs = torch.tensor([0] * 16 + [1] * 16).expand(count, -1)
    pos = torch.arange(32).remainder(16).expand(count, -1)
    return {"input_ids": ids, "answer_mask": answer, "doc_ids": docs, "doc_pos": pos, "last_answer_mask": answer}


class FixedAnswerBatch(torch.utils.data.Dataset):
    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        return self.batch


@torch.no_grad()
def fresh_answer_cfm(module: EBFTModule, batch: dict, seeds=range(1000, 1008)) -> float:
    """Mean CFM of fresh samples over the answer blocks of the fixed micro-batch (sampler seeds training
    never uses)."""
    layout, m = module.layout, module.method
    used = anchored_blocks(layout, batch, m.anchors, m.min_answer_prefix, m.answer_turns)
    values = []
    for seed in seeds:
        tokens = sample_strided(module.generator, batch["input_ids"], layout, temperature=m.sampling.temperature,
                                generator=torch.Generator().manual_seed(seed))
        gen, gt = module.feature_network.strided_features(layout.scatter_generated(batch["input_ids"], tokens), layout)
        values.append(cfm_estimate(gen, gt)[used].mean())
    return torch.stack(values).mean().item()


def train_answer_steps(sign: float, steps: int = 16) -> tuple[float, float]:
    cfg = make_cfg(Path("unused"), *LEARN, "method.anchors=answer", f"method.rl_coef={sign}")
    batch = answer_chunks(8)
    torch.manual_seed(0)
    module = EBFTModule(train_settings(cfg), load_tokenizer(str(cfg.model.name)))
    module.generator = build_tiny_model(vocab_size=VOCAB, num_layers=2, hidden=32, seed=0)
    module.feature_network = FeatureNetwork(module.generator, **FEATURES)
    assert anchored_blocks(module.layout, batch, "answer")[0].int().tolist() == [0, 1, 1, 0, 0, 1, 1]
    before = fresh_answer_cfm(module, batch)
    loader = torch.utils.data.DataLoader(FixedAnswerBatch(batch, steps), batch_size=None)
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1).fit(module, loader)
    module.generator.eval()
    return before, fresh_answer_cfm(module, batch)


def test_answer_anchors_lower_the_cfm_of_answer_blocks():
    """As tests/test_learning.py for all blocks: the update lowers the fresh-sample CFM of the blocks it
    trains on, and raises it with the advantages' sign flipped."""
    before, down = train_answer_steps(1.0)
    _, up = train_answer_steps(-1.0)
    assert down < before - 0.02, (before, down)
    assert up > before + 0.02, (before, up)


def _rows_file(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_answer_anchors_on_plain_text_are_refused_before_any_model(tmp_path, monkeypatch):
    files = _rows_file(tmp_path, [{"text": f"x = {i}\nprint(x * {i})\n"} for i in range(200)])
    monkeypatch.setattr(EBFTModule, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match="every training row is plain text.*use method.anchors=all"):
        train(make_cfg(tmp_path / "run", "method=ebft", "method.anchors=answer", "data=local", f"data.files={files}"))


def test_answer_anchors_with_no_answer_block_are_refused_before_any_model(tmp_path, monkeypatch):
    # answers of 2-3 tokens with their EOS: no G=8 ground truth fits in one
    files = _rows_file(tmp_path, [{"prompt": f"Say {i}:", "completion": f" {i}"} for i in range(200)])
    monkeypatch.setattr(EBFTModule, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match="leaves no block in any of the .* training chunks"):
        train(make_cfg(tmp_path / "run", "method=ebft", "method.anchors=answer", "task.gen_len=8", "data=local",
                       f"data.files={files}"))


def test_the_benchmark_step_is_the_training_step_with_answer_anchors_and_document_masks(tmp_path, tokenizer):
    """``bench/step_cost.py --anchors answer --document-mask`` times the code that trains: the same loss as
    ``training_step`` on the same batch (synthetic examples) and random numbers."""
    cfg = make_cfg(tmp_path, "method=ebft", "method.num_samples=3", "method.anchors=answer", "data.document_mask=true")
    module = EBFTModule(train_settings(cfg), tokenizer)
    T = module.layout.seq_len
    ids = torch.randint(0, 200, (2, T), generator=torch.Generator().manual_seed(5))
    fields = synthetic_examples(2, T, 5, 14)
    trained = module.training_step({"input_ids": ids, **fields}, 0)
    _, stats = ebft_step(module.generator, module.feature_network, module.layout, ids, fields["answer_mask"],
                         module.method, module.sampling_generator(0), fields=fields, document_mask=True)
    assert stats.loss.item() == trained.item() and torch.isfinite(trained)
    assert 0 < stats.metrics()["train/blocks_used"] < 1
    _, plain = ebft_step(module.generator, module.feature_network, module.layout, ids, fields["answer_mask"],
                         module.method, module.sampling_generator(0), fields=fields)
    assert plain.loss.item() != trained.item()                     # document masking is not a no-op
