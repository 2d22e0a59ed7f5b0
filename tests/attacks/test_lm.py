"""LM scores on a tiny GPT-2 built from config: padded batches match unpadded one-at-a-time hand computation."""

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dptrain.attacks import lm  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    lengths = [12, 5, 9, 2]
    ids = torch.full((4, 12), 63, dtype=torch.long)  # pad id 63 (also a real vocab id: padding must be masked)
    att = torch.zeros((4, 12), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, 63, (n,), generator=g)
        att[i, :n] = 1
    return ids, att, lengths


def _hand_token_logprobs(model, ids, n):
    """Log p of tokens 1..n-1 of one unpadded sequence, by an explicit softmax in float64."""
    with torch.no_grad():
        logits = model(input_ids=ids[None, :n]).logits[0].double()  # (n, V)
    out = []
    for t in range(n - 1):
        z = logits[t]
        out.append(float(z[ids[t + 1]] - torch.log(torch.exp(z - z.max()).sum()) - z.max()))
    return np.array(out)


def test_token_log_probs_mask_padding(tiny_gpt2, batch):
    ids, att, lengths = batch
    lp, mask = lm.token_log_probs(tiny_gpt2, ids, att, batch_size=3)  # batches of 3 and 1
    assert lp.shape == mask.shape == (4, 11)
    for i, n in enumerate(lengths):
        assert mask[i].sum() == n - 1 and mask[i, : n - 1].all()
        np.testing.assert_allclose(lp[i, : n - 1], _hand_token_logprobs(tiny_gpt2, ids[i], n), atol=2e-5)
        assert (lp[i, n - 1 :] == 0).all()


def test_loss_min_k_zlib_match_hand_computation(tiny_gpt2, batch):
    ids, att, lengths = batch
    texts = ["alpha beta", "gamma gamma gamma gamma", "x", "delta"]
    hand = [_hand_token_logprobs(tiny_gpt2, ids[i], n) for i, n in enumerate(lengths)]
    nll = np.array([-h.mean() for h in hand])
    scores = lm.lm_scores(tiny_gpt2, ids, att, texts=texts, reference_model=tiny_gpt2, batch_size=2)
    np.testing.assert_allclose(scores["nll"], nll, atol=2e-5)
    np.testing.assert_allclose(scores["loss"], -nll, atol=2e-5)
    np.testing.assert_allclose(lm.loss_scores(tiny_gpt2, ids, att), -nll, atol=2e-5)
    zl = np.array([len(zlib.compress(t.encode())) for t in texts])
    np.testing.assert_allclose(scores["zlib"], -nll / zl, atol=2e-6)
    np.testing.assert_allclose(lm.zlib_scores(tiny_gpt2, ids, att, texts), -nll / zl, atol=2e-6)
    min_k = [np.sort(h)[: max(1, int(0.2 * h.size))].mean() for h in hand]
    np.testing.assert_allclose(scores["min_k"], min_k, atol=2e-5)
    np.testing.assert_allclose(lm.min_k_scores(tiny_gpt2, ids, att), min_k, atol=2e-5)
    np.testing.assert_allclose(scores["reference"], 0.0, atol=1e-12)  # same model as its own reference
    total = lm.sequence_nll(tiny_gpt2, ids, att, reduction="sum")
    np.testing.assert_allclose(total, [-h.sum() for h in hand], atol=1e-4)


def test_matches_hf_loss_with_ignored_labels(tiny_gpt2, batch):
    ids, att, lengths = batch
    for i, n in enumerate(lengths):
        labels = ids[i : i + 1].clone()
        labels[att[i : i + 1] == 0] = -100
        with torch.no_grad():
            hf = tiny_gpt2(input_ids=ids[i : i + 1], attention_mask=att[i : i + 1], labels=labels).loss
        assert lm.sequence_nll(tiny_gpt2, ids[i : i + 1], att[i : i + 1])[0] == pytest.approx(float(hf), abs=2e-5)


def test_training_flag_restored_and_plain_module_supported(batch):
    ids, att, _ = batch

    class Bigram(torch.nn.Module):  # returns a bare logits tensor, ignores the attention mask
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(64, 64)

        def forward(self, input_ids, attention_mask=None):
            return self.table(input_ids)  # (B, T, V)

    model = Bigram().train()
    lp, mask = lm.token_log_probs(model, ids, att)
    assert model.training
    logp = torch.log_softmax(model.table.weight.detach().double(), -1)
    expected = logp[ids[0, :-1], ids[0, 1:]].numpy()
    np.testing.assert_allclose(lp[0], expected, atol=1e-6)


def test_bad_inputs(tiny_gpt2, batch):
    ids, att, _ = batch
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        lm.token_log_probs(tiny_gpt2, ids.float(), att)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        lm.token_log_probs(tiny_gpt2, ids, att[:, :5])
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        bad = att.clone()
        bad[3, 1] = 0
        lm.sequence_nll(tiny_gpt2, ids, bad)
    with pytest.raises(ValueError, match="reduction must be"):
        lm.sequence_nll(tiny_gpt2, ids, att, reduction="max")
    with pytest.raises(ValueError, match="one text per nll"):
        lm.zlib_scores(tiny_gpt2, ids, att, ["a"])

