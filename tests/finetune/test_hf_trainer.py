"""DPTrainer against the installed transformers: a few private steps of a tiny model through Trainer.train()."""

import math

import pytest
import torch
from transformers import TrainingArguments

from dptrain.finetune.loss import PadCollator, TokenizedTexts, per_sample_lm_loss
from dptrain.integrations.hf import DPTrainer, causal_lm_per_sample_loss
from tests.finetune.helpers import tiny_model_and_tokenizer

TEXTS = [f"Patient {i} reports headache, prescribed {i % 5 + 1}00 mg." for i in range(40)]


def test_labels_loss_equals_mask_loss():
    model, tok = tiny_model_and_tokenizer()
    batch = PadCollator(tok.pad_token_id)([TokenizedTexts(TEXTS[:4], tok, 48)[i] for i in range(4)])
    with torch.no_grad():
        logits = model(**batch).logits
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    assert torch.allclose(causal_lm_per_sample_loss(logits, labels),
                          per_sample_lm_loss(logits, batch["input_ids"], batch["attention_mask"]), atol=1e-6)


def test_dp_trainer_trains_privately(tmp_path):
    model, tok = tiny_model_and_tokenizer(seed=1)
    data = TokenizedTexts(TEXTS, tok, 48)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = DPTrainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(tok.pad_token_id),
                        target_epsilon=2.0, insecure_noise_seed=0, insecure_sampler_seed=0)
    trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.engine.optimizer.steps_taken == 3  # three noised logical steps
    eps = trainer.get_epsilon()
    assert 0 < eps <= 2.0 + 1e-9
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert len(logged) == 3 and logged == sorted(logged) and math.isclose(logged[-1], eps)
    assert trainer.engine.optimizer.noise_multiplier > 0
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())


def test_dp_trainer_rejects_gradient_accumulation(tmp_path):
    model, tok = tiny_model_and_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        DPTrainer(model=model, args=args, train_dataset=TokenizedTexts(TEXTS, tok, 48), target_epsilon=1.0)


def test_empty_poisson_batches_still_step(tmp_path):
    model, tok = tiny_model_and_tokenizer(seed=1)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=6, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = DPTrainer(model=model, args=args, train_dataset=TokenizedTexts(TEXTS, tok, 48),
                        data_collator=PadCollator(tok.pad_token_id), target_epsilon=2.0, insecure_noise_seed=0,
                        insecure_sampler_seed=4)  # batches of 0, 1, 2, 1, 0, 1 rows
    rows = []
    step = trainer.training_step
    trainer.training_step = lambda m, inputs, n=None: rows.append(len(inputs["input_ids"])) or step(m, inputs, n)
    trainer.train()
    assert 0 in rows and len(rows) == 6  # expected batch 1 of 40: some batches are empty
    assert trainer.engine.optimizer.steps_taken == 6  # ... and each still took a (noise-only) step


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, **kw)


def test_secure_mode_trains_and_refuses_seeds(tmp_path):
    model, tok = tiny_model_and_tokenizer(seed=1)
    data, collate = TokenizedTexts(TEXTS, tok, 48), PadCollator(tok.pad_token_id)
    with pytest.raises(ValueError, match="secure_mode.*insecure_noise_seed"):
        DPTrainer(model=model, args=_args(tmp_path), train_dataset=data, noise_multiplier=1.0, secure_mode=True,
                  insecure_noise_seed=0)
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=data, data_collator=collate,
                        noise_multiplier=1.0, secure_mode=True, max_physical_batch_size=3)
    trainer.train()
    assert trainer.engine.secure_mode and trainer.engine.trust_model()["private"]
    assert trainer.engine.optimizer.steps_taken == 2


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)])
def test_rejects_bad_max_physical_batch_size(tmp_path, bad, error):
    model, tok = tiny_model_and_tokenizer()
    with pytest.raises(error, match=f"max_physical_batch_size must be an integer >= 1, found {bad!r}"):
        DPTrainer(model=model, args=_args(tmp_path), train_dataset=TokenizedTexts(TEXTS, tok, 48),
                  noise_multiplier=1.0, max_physical_batch_size=bad)


def test_refuses_resume_from_checkpoint(tmp_path):
    model, tok = tiny_model_and_tokenizer()
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=TokenizedTexts(TEXTS, tok, 48),
                        noise_multiplier=1.0)
    with pytest.raises(ValueError, match="cannot resume from a checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.engine.optimizer is None  # refused before anything was made private
