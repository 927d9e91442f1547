"""``bench/step_cost.py`` times the code that trains: its EBFT step is ``EBFTModule.training_step``'s
(same sampler, feature network, ``ebft_update`` and settings), so on the same batch and random numbers
both give the same loss."""

import torch

from bench.step_cost import ebft_method, ebft_step
from ebft.config import train_settings
from ebft.methods.ebft import EBFTModule
from tests.test_train import make_cfg


def test_the_benchmark_step_is_the_training_step(tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, "method=ebft", "method.num_samples=3", "method.whitening=none",
                   "method.baseline=rloo")   # non-default settings reach both through module.method
    module = EBFTModule(train_settings(cfg), tokenizer)
    ids = torch.randint(0, 200, (2, module.layout.seq_len), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "answer_mask": torch.rand(ids.shape, generator=torch.Generator().manual_seed(6)) < 0.5}

    trained = module.training_step(batch, 0)
    _, stats = ebft_step(module.generator, module.feature_network, module.layout, ids, batch["answer_mask"],
                         module.method, module.sampling_generator(0))
    assert stats.loss.item() == trained.item() and torch.isfinite(trained)

    # the same step with another rollout seed is another loss: the comparison is not vacuous
    _, other = ebft_step(module.generator, module.feature_network, module.layout, ids, batch["answer_mask"],
                         module.method, torch.Generator().manual_seed(123))
    assert other.loss.item() != trained.item()


def test_the_benchmark_takes_the_methods_settings():
    method = ebft_method(4)
    assert (method.alpha, method.gamma, method.whitening, method.baseline, method.rl_coef, method.loss_reduction,
            method.ce_on, method.sampling.temperature) == (1.0, 0.03, "reference", "rloo_corrected", 1.0,
                                                           "token_mean", "all", 0.6)
    assert ebft_method(2, temperature=1.0, whitening="none").whitening == "none"
