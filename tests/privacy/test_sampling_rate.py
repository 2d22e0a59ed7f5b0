"""The sampler includes each example with the rate the ledger charges, not the rate an fp32 uniform realises.

`torch.rand(N) < q` in fp32 compares k 2^-24 with q: it includes an example with probability ceil(q 2^24) / 2^24,
above q by up to 2^-24 (1.3% at q = 1e-6; 21x at q = 3 * 2^-30). Oracle: the count of inclusions over many draws
against the Poisson law at the charged rate.
"""

import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.sampling import PoissonBatchSampler
from dptrain.sampling_rate import realizable_rate

N, BATCHES = 1 << 23, 32
TINY_RATE = 3 * 2.0**-30  # on the fp64 grid, far below fp32's: an fp32 sampler realises 2^-24 (21x)


def test_the_sampler_realises_the_charged_rate_where_fp32_uniforms_cannot():
    sampler = PoissonBatchSampler(N, TINY_RATE, steps=BATCHES, insecure_seed=0)
    assert sampler.sample_rate == TINY_RATE
    included = sum(len(batch) for batch in sampler)
    expected, fp32_expected = BATCHES * N * TINY_RATE, BATCHES * N * 2.0**-24  # 0.75 against 16
    assert stats.poisson.sf(included - 1, expected) > 1e-4, f"{included} inclusions, {expected:.2f} expected"
    assert stats.poisson.cdf(included, fp32_expected) < 1e-4, "the test tells the two rates apart"


def test_the_ledger_charges_the_rate_the_sampler_realises():
    n, batch = 9800, 100
    data = TensorDataset(torch.zeros(n, 2), torch.zeros(n, 1))
    model, engine = torch.nn.Linear(2, 1), dptrain.PrivacyEngine()
    _, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=batch), max_grad_norm=1.0, noise_multiplier=1.0)
    assert engine.sample_rate == loader.sampler.sample_rate == optimizer.sample_rate == realizable_rate(batch / n)
    assert 0 <= engine.sample_rate - batch / n < 2.0**-53
    assert (engine.sample_rate * 2.0**53).is_integer()
