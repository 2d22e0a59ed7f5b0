"""The engine on a CUDA device: the same batch-size-1 oracle as on CPU, with the Triton kernels in the routes, bf16,
and the noise from a secret CUDA generator. Skipped without a GPU (CI has none); run where one is lent."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.grad_sample.routes import RoutePlanner
from dptrain.grad_sample.tracker import GradSampleTracker
from tests.helpers.models import CASES
from tests.helpers.oracle import clipped_sum, per_sample_grads, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_BOUND = 5e-2  # as tests/engine/test_bf16.py


@pytest.fixture(autouse=True)
def no_tf32_convolutions():
    """cuDNN convolutions default to TF32 (10 mantissa bits): the conv case's own backward would then be off."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _on_cuda(case):
    case.model.cuda()
    case.inputs = {k: v.cuda() for k, v in case.inputs.items()}
    return case


def _oracle_and_threshold(case):
    """The fp64 batch-size-1 oracle of the case (on CUDA) and a threshold that clips about half the samples."""
    oracle = per_sample_grads(case.model, lambda m, i: case.per_sample_loss(m, case.sample(i)).sum(), case.batch_size)
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in g_i.values())) for g_i in oracle])
    return oracle, 0.7 * float(norms.median())


def _compare(case, tracker, oracle):
    names = {p: n for n, p in case.model.named_parameters()}
    groups = [[names[p] for p in g.params] for g in tracker.groups]
    expected = clipped_sum(oracle, groups, [g.max_norm for g in tracker.groups])
    assert set(names[p] for p in tracker.clipped_sum) == set(expected), "every trainable parameter is handled"
    worst = 0.0
    for p, actual in tracker.clipped_sum.items():
        assert actual.is_cuda and actual.dtype == torch.float32, names[p]
        worst = max(worst, relative_error(actual, expected[names[p]]))
    return worst


@pytest.mark.parametrize("dense", [False, True], ids=["factored", "densified"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_clipped_sum_on_cuda_matches_the_oracle(case_name, clipping, dense):
    case = _on_cuda(CASES[case_name]())
    oracle, c = _oracle_and_threshold(case)
    planner = RoutePlanner(dense_pass_cost=-1e9) if dense else RoutePlanner(dense_budget_bytes=0)
    tracker = GradSampleTracker(case.model, clipping=clipping, loss_reduction="mean", max_grad_norm=c, planner=planner)
    case.per_sample_loss(case.model, case.inputs).mean().backward()  # loss_reduction="mean"
    tracker.flush()
    assert _compare(case, tracker, oracle) < 1e-4  # fp32 kernels multiply in IEEE fp32, not TF32


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("case_name", ["gpt2_tied", "llama", "lora"])
def test_bf16_autocast_on_cuda_is_within_bf16_rounding_of_the_fp32_oracle(case_name, clipping):
    case = _on_cuda(CASES[case_name]())
    oracle, c = _oracle_and_threshold(case)
    tracker = GradSampleTracker(case.model, clipping=clipping, loss_reduction="mean", max_grad_norm=c)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = case.per_sample_loss(case.model, case.inputs)
    losses.float().mean().backward()
    tracker.flush()
    assert _compare(case, tracker, oracle) < BF16_BOUND


def test_noise_on_cuda_has_the_calibrated_std_and_differs_between_engines():
    torch.manual_seed(0)
    model = nn.Linear(512, 512).cuda()
    data = TensorDataset(torch.randn(16, 512), torch.randn(16, 512))
    updates = []
    for _ in range(2):
        replica = copy.deepcopy(model)
        optimizer = torch.optim.SGD(replica.parameters(), lr=1.0)
        engine = dptrain.PrivacyEngine()
        replica, optimizer, loader = engine.make_private(
            module=replica, optimizer=optimizer, data_loader=DataLoader(data, batch_size=16), max_grad_norm=1e-6,
            noise_multiplier=2.0, poisson_sampling=False)
        x, y = (t.cuda() for t in next(iter(loader)))
        (replica(x) - y).pow(2).mean(1).mean().backward()
        optimizer.step()
        assert replica.weight.grad.is_cuda
        updates.append(replica.weight.grad.detach().clone())  # noise / 16, the clipped sum is ~1e-6
    std = 2.0 * 1e-6 / 16
    for u in updates:
        assert float(u.std()) == pytest.approx(std, rel=0.02)
    corr = float(torch.corrcoef(torch.stack([updates[0].flatten(), updates[1].flatten()]))[0, 1])
    assert abs(corr) < 0.02, "two engines drew the same noise: the CUDA generator is not secret"
