"""Learning tests: EBFT's whole chain (sampler -> features -> rewards -> RLOO -> loss -> optimizer)
moves the objective the right way, and the opposite way with the advantages' sign flipped.

Paper §2: the update raises the feature-matching reward ``r_j = AT_j - alpha DT_j`` (eq. 7) of the
policy's samples, i.e. lowers the conditional feature-matching loss (CFM) of its rollouts. Fresh
samples (a seed never used in training) on the trained micro-batch measure it: in-sample, as a
diagnostic of the update's direction, not of generalisation.
"""

from pathlib import Path

import lightning as L
import pytest
import torch

from ebft.config import train_settings
from ebft.methods.ebft import EBFTModule
from ebft.models.features import FeatureNetwork
from ebft.models.loading import build_tiny_model, load_tokenizer
from ebft.objectives.rewards import cfm_estimate, feature_matching_rewards
from ebft.rollout.sampler import sample_strided
from tests.test_train import make_cfg


@torch.no_grad()
def fresh_reward_and_cfm(module: EBFTModule, ids: torch.Tensor, seeds=range(1000, 1008)) -> tuple[float, float]:
    """Mean reward and mean CFM of fresh samples of the fixed micro-batch, over fixed sampler seeds that
    training never uses (the same seeds before and after)."""
    layout, rewards, cfm = module.layout, [], []
    for seed in seeds:
        tokens = sample_strided(module.generator, ids, layout, temperature=module.method.sampling.temperature,
                                generator=torch.Generator().manual_seed(seed))
        gen, gt = module.feature_network.strided_features(layout.scatter_generated(ids, tokens), layout)
        rewards.append(feature_matching_rewards(gen, gt, module.method.alpha, module.method.whitening).reward.mean())
        cfm.append(cfm_estimate(gen, gt).mean())
    return torch.stack(rewards).mean().item(), torch.stack(cfm).mean().item()


class FixedBatch(torch.utils.data.Dataset):
    """The same micro-batch at every step."""

    def __init__(self, ids: torch.Tensor, steps: int):
        self.batch = {"input_ids": ids, "answer_mask": torch.ones_like(ids, dtype=torch.bool)}
        self.steps = steps

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        return self.batch


def train_steps(cfg, ids: torch.Tensor, steps: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """``steps`` optimizer steps of the real EBFT module under a Lightning Trainer on one fixed
    micro-batch; fresh-sample (reward, CFM) before and after."""
    torch.manual_seed(0)
    module = EBFTModule(train_settings(cfg), load_tokenizer(str(cfg.model.name)))
    # a small vocabulary, so that a few steps can find the text's tokens: the generator and its frozen
    # copy as the feature network, exactly as the module builds them from the base model
    module.generator = build_tiny_model(vocab_size=VOCAB, num_layers=2, hidden=32, seed=0)
    module.feature_network = FeatureNetwork(module.generator, **FEATURES)
    before = fresh_reward_and_cfm(module, ids)
    loader = torch.utils.data.DataLoader(FixedBatch(ids, steps), batch_size=None)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=loader)
    module.generator.eval()
    return before, fresh_reward_and_cfm(module, ids)


VOCAB = 32
FEATURES = {"layers": (0.25, 0.5, 0.75), "pooling": "last_token", "normalisation": "joint"}
LEARN = ["method=ebft", "method.whitening=none", "alpha=1.0", "gamma=0", "method.lr=1e-3", "method.warmup_ratio=0",
         "method.num_samples=4", "task.context_len=4", "task.stride=4", "task.gen_len=4", "trainer.max_steps=100",
         "method.batch_size=8"]


def periodic_chunks(count: int, period: int = 5, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Chunks that repeat a random pattern: text whose continuation a context determines."""
    pattern = torch.randint(0, VOCAB, (count, period), generator=torch.Generator().manual_seed(seed))
    return pattern.repeat(1, -(-length // period))[:, :length]


@pytest.fixture(scope="module")
def learned():
    """(before, after with the advantages as they are, after with their sign flipped) on one micro-batch."""
    ids = periodic_chunks(8)
    out = {}
    for sign in (1.0, -1.0):
        cfg = make_cfg(Path("unused"), *LEARN, f"method.rl_coef={sign}")
        out["before"], out[sign] = train_steps(cfg, ids, steps=16)
    return out


def test_ebft_steps_lower_the_cfm_of_fresh_samples(learned):
    """REINFORCE on ``r_j`` with the RLOO baseline follows ``-grad CFM`` (paper eq. 7: the diversity term's
    score-function gradient is half that of ``||E phi||^2``), so CFM falls, and rises with the sign flipped."""
    (_, c0), (_, c_up), (_, c_down) = learned["before"], learned[1.0], learned[-1.0]
    assert c_up < c0 - 0.02, (c0, c_up)
    assert c_down > c0 + 0.02, (c0, c_down)


def test_flipping_the_advantages_reverses_the_reward(learned):
    """The mean reward of fresh samples ends higher with the advantages than with their sign flipped, and
    the flipped run lowers it. (With alpha = 1 the mean reward ``2a - 2b`` is not itself the objective
    ``2a - b``, so it need not rise on every micro-batch; CFM is the objective.)"""
    (r0, _), (r_up, _), (r_down, _) = learned["before"], learned[1.0], learned[-1.0]
    assert r_up > r_down + 0.03, (r_up, r_down)
    assert r_down < r0 - 0.03, (r0, r_down)


@pytest.mark.slow
def test_ebft_lowers_in_sample_cfm_of_the_embedded_model(tmp_path):
    """SmolLM2-135M-Instruct on 2 fixed training chunks of the embedded Q&A data (T=128, C=s=G=8, n=4,
    reference whitening, alpha 1, gamma 0.03, lr 1e-4): in-sample CFM of fresh samples falls clearly
    within 10 steps and the mean reward rises."""
    cfg = make_cfg(tmp_path, "model=smollm2", "method=ebft", "method.lr=1e-4", "method.warmup_ratio=0",
                   "task.seq_len=128", "method.batch_size=2", "trainer.max_steps=100", base=[])
    settings = train_settings(cfg)
    datamodule = EBFTModule.make_datamodule(settings, load_tokenizer(settings.model.name))
    datamodule.setup("fit")
    ids = datamodule.first_trained(2).input_ids
    torch.manual_seed(0)
    module = EBFTModule(settings, datamodule.tokenizer)
    before = fresh_reward_and_cfm(module, ids, seeds=range(1000, 1004))
    loader = torch.utils.data.DataLoader(FixedBatch(ids, 10), batch_size=None)
    L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1).fit(module, loader)
    module.generator.eval()
    after = fresh_reward_and_cfm(module, ids, seeds=range(1000, 1004))
    print(f"reward {before[0]:.3f} -> {after[0]:.3f}, in-sample CFM {before[1]:.3f} -> {after[1]:.3f}")
    assert after[1] < before[1] - 0.05 and after[0] > before[0] + 0.03
