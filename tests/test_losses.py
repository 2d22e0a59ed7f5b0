"""dptrain.losses: one loss per sample (oracle: each sample alone), and a warning for Hugging Face's batch-token-mean
loss, which is not the mean of per-sample losses when records differ in length."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from dptrain.losses import BATCH_LOSS_WARNING, causal_lm, check_model_call, cross_entropy


def test_cross_entropy_is_per_sample():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 1, 0])
    expected = torch.stack([F.cross_entropy(logits[i : i + 1], y[i : i + 1]) for i in range(5)])
    assert torch.allclose(cross_entropy(logits, y), expected)
    tokens, labels = torch.randn(2, 4, 3, generator=g), torch.tensor([[0, 1, -100, -100], [2, 2, 1, 0]])
    one = F.cross_entropy(tokens[0, :2], labels[0, :2])  # sample 0: its two labelled tokens only
    assert torch.allclose(cross_entropy(tokens, labels)[0], one)
    with pytest.raises(ValueError, match=r"expected logits \(B, C\) with targets \(B,\)"):
        cross_entropy(tokens, y)


def _tiny_lm():
    from tests.finetune.helpers import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    batch = tok(["a short note", "a much longer clinical note about a patient"], padding=True, return_tensors="pt")
    return model, batch


def test_causal_lm_is_each_samples_own_mean_and_hf_labels_loss_is_not():
    model, batch = _tiny_lm()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        per_sample = causal_lm(model(input_ids=ids, attention_mask=mask).logits, ids, mask)  # (2,)
        unpadded = [ids[i : i + 1, : int(mask[i].sum())] for i in range(2)]  # each sample alone, (1, T_i)
        alone = [causal_lm(model(input_ids=x).logits, x) for x in unpadded]
        hf = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert torch.allclose(per_sample, torch.cat(alone), atol=1e-5)
    assert abs(float(hf) - float(per_sample.mean())) > 1e-3  # token mean over the batch: the long record weighs more


def test_check_model_call_warns_once_on_labels():
    model, batch = _tiny_lm()
    handle = check_model_call(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**batch)  # logits only: fine
        assert not caught
        model(**batch, labels=batch["input_ids"])
        model(**batch, labels=batch["input_ids"])
    assert [str(w.message) for w in caught] == [BATCH_LOSS_WARNING]
    handle.remove()
