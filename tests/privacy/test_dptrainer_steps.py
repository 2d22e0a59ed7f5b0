"""DPTrainer under the HF Trainer: one Poisson batch is exactly one noised step, over epochs and micro-batches.

The attack these guard against: the HF Trainer pulls ``len(loader)`` items per epoch; if an item is a
micro-batch, an epoch ends inside a logical batch and its clipped sums merge into the next Poisson batch (one
noised step holding records of two batches, a record in both contributing 2C), and fewer steps are taken than
the calibration planned.
"""

import functools
import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import rdp as dpa_rdp
from transformers import TrainerCallback, TrainingArguments

from dptrain.accountants import compute_epsilon
from dptrain.accountants.rdp import DEFAULT_ORDERS
from dptrain.finetune.loss import PadCollator, TokenizedTexts
from dptrain.integrations.hf import DPTrainer
from tests.finetune.helpers import tiny_model_and_tokenizer

N, BATCH, EPOCHS, DELTA = 64, 16, 2, 1e-5
PLANNED = EPOCHS * math.ceil(N / BATCH)  # 8 logical steps
# sigma = 3 at q = 1/4, delta = 1e-5 puts RDP's optimal order at an integer (>= 13) for 1..9 steps: the
# reference may use only the integer orders, where dp_accounting's RDP is exact (its fractional-order series
# does not converge below order 1.7)
SIGMA = 3.0
TEXTS = [f"Record {i}: seen on day {i * 7 % 31}, dose {i % 5 + 1}00 mg." for i in range(N)]


def _trainer(tmp_path, physical, **kw):
    model, tok = tiny_model_and_tokenizer(seed=0)
    data = TokenizedTexts(TEXTS, tok, 48)
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
                learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                disable_tqdm=True)
    base.update(kw.pop("args", {}))
    trainer = DPTrainer(model=model, args=TrainingArguments(**base), train_dataset=data,
                        data_collator=PadCollator(tok.pad_token_id), max_physical_batch_size=physical,
                        insecure_noise_seed=0, insecure_sampler_seed=1,
                        **{"noise_multiplier": SIGMA, "target_delta": DELTA, **kw})
    return trainer, data


@functools.lru_cache(maxsize=None)
def _reference_epsilon(q, sigma, steps, delta, integer_orders=True):
    """Independent ledger: ``steps`` Poisson-subsampled Gaussian steps in dp_accounting's RDP accountant."""
    acc = dpa_rdp.RdpAccountant(orders=[a for a in DEFAULT_ORDERS if a == int(a) or not integer_orders])
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


class _Recorder:
    """Which dataset records each forward saw, which batches the sampler drew, and the rows of each noised step."""

    def __init__(self, trainer, data):
        trainer.get_train_dataloader()  # builds the engine, the private optimizer and the Poisson loader
        self.index_of = {tuple(data[i]["input_ids"].tolist()): i for i in range(len(data))}
        assert len(self.index_of) == len(data)  # every record is identifiable from its tokens
        self.drawn, self.forwards, self.pending, self.steps, self.epoch_rows = [], [], [], [], []
        sampler = trainer.engine.data_loader.sampler
        recorder = self

        class RecordingSampler(type(sampler)):
            def __iter__(self):
                for batch in super().__iter__():
                    recorder.drawn.append(sorted(batch))
                    yield batch

        sampler.__class__ = RecordingSampler
        trainer.model.register_forward_pre_hook(self._forward, with_kwargs=True)
        trainer.engine.optimizer.step_callbacks.append(self._noised_step)
        trainer.add_callback(self._EpochRows(self))

    def _forward(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        rows = [self.index_of[tuple(i[m.bool()].tolist())] for i, m in zip(ids, mask)]
        self.forwards.append(rows)
        self.pending += rows

    def _noised_step(self, optimizer, mechanism):
        self.steps.append(self.pending)
        self.pending = []

    class _EpochRows(TrainerCallback):
        def __init__(self, recorder):
            self.recorder = recorder

        def on_epoch_end(self, args, state, control, **kwargs):
            self.recorder.epoch_rows.append(sum(len(rows) for rows in self.recorder.forwards))


@pytest.mark.parametrize("physical", [None, 4, 3], ids=["whole", "micro4", "micro3"])
def test_steps_taken_and_epsilon_match_the_plan(tmp_path, physical):
    trainer, _ = _trainer(tmp_path, physical)
    trainer.train()
    optimizer = trainer.engine.optimizer
    assert optimizer.steps_taken == PLANNED == trainer.state.global_step
    q = trainer.engine.sample_rate
    assert q == BATCH / N and optimizer.plan_step().noise_multiplier == pytest.approx(SIGMA, rel=1e-12)
    eps = trainer.get_epsilon()
    assert eps == pytest.approx(_reference_epsilon(q, SIGMA, PLANNED, DELTA), rel=1e-6)
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert len(logged) == PLANNED and logged[-1] == eps
    for k, e in enumerate(logged, start=1):  # each logged epsilon is the ledger's after the steps taken then
        assert e == pytest.approx(compute_epsilon(sample_rate=q, noise_multiplier=SIGMA, steps=k, delta=DELTA),
                                  rel=1e-12)


@pytest.mark.parametrize("max_steps", [6, 9])
def test_max_steps_across_epochs(tmp_path, max_steps):
    trainer, _ = _trainer(tmp_path, 4, args={"max_steps": max_steps})
    trainer.train()
    assert trainer.engine.optimizer.steps_taken == trainer.state.global_step == max_steps
    assert trainer.get_epsilon(DELTA) == pytest.approx(_reference_epsilon(BATCH / N, SIGMA, max_steps, DELTA), rel=1e-6)


def test_target_epsilon_calibrates_for_the_steps_taken(tmp_path):
    trainer, _ = _trainer(tmp_path, 4, noise_multiplier=None, target_epsilon=3.0)
    trainer.train()
    optimizer = trainer.engine.optimizer
    assert optimizer.steps_taken == PLANNED
    eps = trainer.get_epsilon()
    assert 2.9 < eps <= 3.0 + 1e-9  # the budget is spent by the planned steps, not overrun nor left idle
    ref = _reference_epsilon(BATCH / N, optimizer.plan_step().noise_multiplier, PLANNED, DELTA, integer_orders=False)
    assert eps == pytest.approx(ref, rel=1e-3)  # the optimum is at a fractional order here (see SIGMA)


@pytest.mark.parametrize("physical", [None, 4, 3], ids=["whole", "micro4", "micro3"])
def test_each_noised_step_holds_exactly_one_poisson_batch(tmp_path, physical):
    trainer, data = _trainer(tmp_path, physical)
    rec = _Recorder(trainer, data)
    trainer.train()
    assert len(rec.steps) == len(rec.drawn) == PLANNED and rec.pending == []
    for rows, batch in zip(rec.steps, rec.drawn):
        assert len(set(rows)) == len(rows)  # no record twice in one noised step
        assert sorted(rows) == batch  # exactly the Poisson batch the sampler drew, nothing merged in
    if physical is not None:
        assert all(0 < len(rows) <= physical for rows in rec.forwards)


def test_epochs_after_the_first_train(tmp_path):
    trainer, data = _trainer(tmp_path, None, args={"num_train_epochs": 3})
    rec = _Recorder(trainer, data)
    trainer.train()
    per_epoch = [b - a for a, b in zip([0] + rec.epoch_rows, rec.epoch_rows)]
    assert len(per_epoch) == 3 and all(rows > 0 for rows in per_epoch)  # P(an epoch is empty) = (3/4)^256
    drawn_per_epoch = [sum(len(b) for b in rec.drawn[k * 4:(k + 1) * 4]) for k in range(3)]
    assert per_epoch == drawn_per_epoch


def test_micro_batches_give_the_same_steps_as_whole_batches(tmp_path):
    """Same seeds, no noise: splitting each Poisson batch into micro-batches leaves every clipped sum, hence every
    parameter, unchanged (up to float rounding)."""
    final = []
    for physical in (None, 3):
        trainer, _ = _trainer(tmp_path / str(physical), physical, noise_multiplier=0.0,
                              args={"optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant"})
        start = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
        trainer.train()
        final.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert (final[0] - start).abs().max() > 1e-3  # the steps moved the model
    assert torch.allclose(final[0], final[1], atol=1e-5, rtol=0)


def test_the_logged_loss_is_the_dp_noised_release_never_the_exact_batch_loss(tmp_path):
    """The attack: the HF Trainer logged each private batch's exact mean loss (stdout, report_to loggers,
    trainer_state.json of every checkpoint-N), even at sigma = 1e4. Now every logged loss is the release of
    dptrain.loss_release: (sum of per-sample losses clipped to [0, 10] + N(0, (4 sigma 10)^2)) / B, composed with
    the gradient of the same batch, epsilon unchanged. Oracle: the exact losses, recomputed by a spy."""
    from dptrain.finetune.loss import per_sample_lm_loss
    from dptrain.loss_release import LOSS_BOUND, LOSS_RELEASE_FACTOR

    trainer, data = _trainer(tmp_path, 4, args={"save_strategy": "steps", "save_steps": 4})
    trainer.get_train_dataloader()
    exact, pending = [], []
    trainer.model.register_forward_hook(
        lambda m, args, kwargs, out: pending.append(per_sample_lm_loss(out.logits, kwargs["input_ids"],
                                                                       kwargs["attention_mask"]).detach())
        if torch.is_grad_enabled() else None, with_kwargs=True)
    trainer.engine.optimizer.step_callbacks.append(lambda o, m: (exact.append(float(torch.cat(pending).clamp(
        0, LOSS_BOUND).sum()) / o.expected_batch_size if pending else 0.0), pending.clear()))
    output = trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == len(exact) == PLANNED
    noise = torch.tensor(logged, dtype=torch.float64) - torch.tensor(exact, dtype=torch.float64)
    std = LOSS_RELEASE_FACTOR * SIGMA * LOSS_BOUND / BATCH  # 7.5 nats
    assert noise.abs().min() > 1e-3 * std  # no logged loss is the exact one
    assert 0.3 * std < float(noise.pow(2).mean().sqrt()) < 2.5 * std  # chi^2_8: P(outside) < 1e-3
    assert output.training_loss == pytest.approx(sum(logged) / len(logged))
    checkpoint_state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["loss"] for h in checkpoint_state["log_history"] if "loss" in h] == logged[:4]
    assert trainer.get_epsilon() == pytest.approx(_reference_epsilon(BATCH / N, SIGMA, PLANNED, DELTA), rel=1e-6)
