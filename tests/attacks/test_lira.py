"""LiRA: separation on synthetic IN/OUT Gaussians, chance on null data, closed-form score, shadow helper."""

import numpy as np
import pytest
from scipy import stats

from dptrain.attacks import inclusion_masks, lira_offline, lira_online, roc_auc, train_shadow_models


def _synthetic(rng, n_shadow, n, gap, noise=0.5):
    """Per-example OUT mean mu_j ~ N(0, 1); IN adds ``gap``. Shadows and one target model draw around them."""
    mu = rng.normal(0, 1, n)
    mask = inclusion_masks(n_shadow, n, seed=int(rng.integers(2**31)))
    shadow = mu + gap * mask + rng.normal(0, noise, (n_shadow, n))
    target_in = rng.random(n) < 0.5
    target = mu + gap * target_in + rng.normal(0, noise, n)
    return target, shadow, mask, target_in


@pytest.mark.parametrize("fix_variance", [False, True])
def test_lira_separates_in_out_gaussians(fix_variance):
    rng = np.random.default_rng(0)
    target, shadow, mask, target_in = _synthetic(rng, 64, 2000, gap=1.0)
    online = lira_online(target, shadow, mask, fix_variance=fix_variance)
    offline = lira_offline(target, shadow, mask, fix_variance=fix_variance)
    # an oracle knowing mu_j exactly reaches AUC Phi(gap / (noise sqrt 2)) = Phi(1.414) = 0.92
    oracle = stats.norm.cdf(1.0 / (0.5 * np.sqrt(2)))
    assert roc_auc(online[target_in], online[~target_in]) == pytest.approx(oracle, abs=0.03)
    assert roc_auc(offline[target_in], offline[~target_in]) == pytest.approx(oracle, abs=0.03)
    # a global threshold on the raw statistic ignores per-example difficulty and does much worse
    raw = roc_auc(target[target_in], target[~target_in])
    assert raw < oracle - 0.1


def test_lira_null_data_is_chance():
    rng = np.random.default_rng(1)
    target, shadow, mask, target_in = _synthetic(rng, 16, 4000, gap=0.0)
    for scores in (lira_online(target, shadow, mask), lira_offline(target, shadow, mask, fix_variance=True)):
        assert roc_auc(scores[target_in], scores[~target_in]) == pytest.approx(0.5, abs=0.03)


def test_lira_scores_match_gaussian_formulas():
    shadow = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 5.0], [4.0, 7.0]])
    mask = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool)
    target = np.array([[2.5, 3.0], [0.0, 6.0]])  # two target models
    online = lira_online(target, shadow, mask)
    s = np.sqrt(0.5)  # unbiased std of {1, 2}, {3, 4}, {0, 1}
    expected0 = stats.norm.logpdf(2.5, 1.5, s) - stats.norm.logpdf(2.5, 3.5, s)
    expected1 = stats.norm.logpdf(3.0, 6.0, np.sqrt(2.0)) - stats.norm.logpdf(3.0, 0.5, s)
    np.testing.assert_allclose(online[0], [expected0, expected1])
    offline = lira_offline(target, shadow, mask)
    np.testing.assert_allclose(offline[1, 0], -stats.norm.logsf(0.0, 3.5, s))
    # far in the upper tail the offline score keeps growing (no saturation at log 1 = 0)
    far = lira_offline(np.array([40.0, 40.0]), shadow, mask)
    assert np.all(np.isfinite(far)) and far[0] > 100


def test_inclusion_masks_balanced():
    mask = inclusion_masks(8, 50, seed=3)
    assert mask.shape == (8, 50)
    np.testing.assert_array_equal(mask.sum(axis=0), 4)


def test_lira_bad_inputs():
    shadow = np.zeros((4, 3))
    mask = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0]], bool)
    with pytest.raises(ValueError, match="needs >= 2 IN shadow"):
        lira_online(np.zeros(3), shadow, mask)
    with pytest.raises(ValueError, match="in_mask must have shape"):
        lira_online(np.zeros(3), shadow, mask[:, :2])
    with pytest.raises(ValueError, match="target_stats must end with the number of examples"):
        lira_offline(np.zeros(5), shadow, mask)
    with pytest.raises(ValueError, match="shadow_stats must be finite"):
        lira_offline(np.zeros(3), np.full((4, 3), np.nan), mask)
    with pytest.raises(ValueError, match="pkeep"):
        inclusion_masks(2, 5, pkeep=0.1)


def test_train_shadow_models_memorising_classifier(one_torch_thread):
    torch = pytest.importorskip("torch")
    n, d = 40, 200  # d >> n: a linear model memorises random labels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)

    def train(model, subset):
        xs = torch.stack([subset[i][0] for i in range(len(subset))])
        ys = torch.stack([subset[i][1] for i in range(len(subset))])
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(60):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs), ys).backward()
            opt.step()

    result = train_shadow_models(
        model_fn=lambda s: torch.nn.Linear(d, 2), train_fn=train, dataset=dataset, num_shadow=8, seed=0, keep_models=True
    )
    assert result.in_mask.shape == result.stats.shape == (8, n)
    np.testing.assert_array_equal(result.in_mask.sum(axis=0), 4)
    # the statistic is phi of each shadow's logits
    with torch.no_grad():
        logits = result.models[0](x).double()
    phi = (logits[torch.arange(n), y] - logits[torch.arange(n), 1 - y]).numpy()
    np.testing.assert_allclose(result.stats[0], phi, atol=1e-10)
    # leave-one-out: each shadow in turn is the target, LiRA on the other 7 (global variance: 3-4 per side)
    aucs = []
    for t in range(8):
        others = np.arange(8) != t
        scores = lira_online(result.stats[t], result.stats[others], result.in_mask[others], fix_variance=True)
        aucs.append(roc_auc(scores[result.in_mask[t]], scores[~result.in_mask[t]]))
    assert np.mean(aucs) > 0.9
