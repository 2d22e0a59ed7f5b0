"""Attacks on the per-sample capture: modules that mix samples or write buffers from the data, and parameters
whose gradient could be lost. Each is tried against make_private and must be refused with an error naming the
module or parameter, or give exactly the batch-size-1 oracle's clipped sum."""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.grad_sample import registry
from dptrain.grad_sample.contributions import Instantiated
from dptrain.grad_sample.rules_base import HookRule
from dptrain.grad_sample.tracker import GradSampleTracker
from tests.helpers.models import CASES
from tests.helpers.oracle import clipped_sum, per_sample_grads, relative_error

B = 6


def _data(d=5, n=24):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randn(n, 1, generator=g))


def _private(model, data=None, **kwargs):
    engine = dptrain.PrivacyEngine()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params or [nn.Parameter(torch.zeros(1))], lr=0.1)
    kwargs.setdefault("max_grad_norm", 0.5)
    kwargs.setdefault("noise_multiplier", 0.0)
    model, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=DataLoader(
        data or _data(), batch_size=B), poisson_sampling=False, **kwargs)
    return engine, model, optimizer


def _mse(model, x, y):
    return (model(x) - y).pow(2).flatten(1).mean(1)  # (B,)


def _assert_exact(model, clipping="flat"):
    """One noise-free step through make_private equals the oracle's clipped mean, for every trainable parameter."""
    x, y = _data().tensors[0][:B], _data().tensors[1][:B]
    oracle = per_sample_grads(model, lambda m, i: _mse(m, x[i : i + 1], y[i : i + 1]).sum(), B)
    c = 0.5 * float(torch.stack([sum(g.pow(2).sum() for g in g_i.values()) for g_i in oracle]).sqrt().median())
    engine, model, optimizer = _private(model, clipping=clipping, max_grad_norm=c)
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    _mse(model, x, y).sum().backward()
    optimizer.step()
    groups = [[names[p] for p in g.params] for g in engine.tracker.groups]
    expected = clipped_sum(oracle, groups, [g.max_norm for g in engine.tracker.groups])
    assert set(expected) == set(names.values())
    for p, n in names.items():
        assert relative_error(p.grad, expected[n] / B) < 1e-5, n
    return engine, model


# ------------------------------------------------------------------ modules that mix samples / write buffers
def _frozen(module):
    return module.requires_grad_(False)


@pytest.mark.parametrize("make, x_shape", [
    (lambda: nn.BatchNorm1d(4, affine=False), (4,)),
    (lambda: _frozen(nn.BatchNorm1d(4)), (4,)),
    (lambda: nn.BatchNorm1d(4, track_running_stats=False), (4,)),
    (lambda: _frozen(nn.BatchNorm2d(4)), (4, 3, 3)),
    (lambda: nn.SyncBatchNorm(4), (4,)),
    (lambda: nn.LazyBatchNorm1d(affine=False), (4,)),
    (lambda: nn.InstanceNorm1d(4, track_running_stats=True), (4, 3)),
], ids=["bn_no_affine", "bn_frozen_affine", "bn_no_running_stats", "bn2d_frozen_affine", "sync_bn", "lazy_bn",
        "instance_norm_running_stats"])
def test_sample_mixing_module_in_train_mode_is_refused_by_name(make, x_shape):
    norm = make()
    numel = torch.Size(x_shape).numel()
    model = nn.Sequential(nn.Linear(5, numel), nn.Unflatten(1, x_shape), norm, nn.Flatten(), nn.Linear(numel, 1))
    with pytest.raises(ValueError, match=rf"module '2' \({type(norm).__name__}\).*(GroupNorm|eval)"):
        _private(model)


def test_batchnorm_without_running_statistics_is_refused_even_in_eval_mode():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False).eval(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\).*batch statistics even in eval mode"):
        _private(model)


@pytest.mark.parametrize("kind", ["batch_norm", "batch_norm_frozen", "instance_norm"])
def test_norm_in_eval_mode_is_exact_until_put_back_in_train_mode(kind):
    torch.manual_seed(0)
    if kind == "instance_norm":
        norm, shape = nn.InstanceNorm1d(2, affine=True, track_running_stats=True), (2, 2)
    else:
        norm, shape = nn.BatchNorm1d(4), (4,)
    with torch.no_grad():
        norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2.0), norm.weight.normal_(), norm.bias.normal_()
    if kind == "batch_norm_frozen":
        norm.requires_grad_(False)
    model = nn.Sequential(nn.Linear(5, 4), nn.Unflatten(1, shape), norm.eval(), nn.Tanh(), nn.Flatten(), nn.Linear(4, 1))
    _assert_exact(model)
    stats = [b.clone() for b in norm.buffers()]
    model.train()  # e.g. the training loop's usual model.train(): the layer would update its statistics
    with pytest.raises(ValueError, match=rf"module '2' \({type(norm).__name__}\): .*train mode.*call \.eval\(\) on it"):
        model(_data().tensors[0][:B])
    assert all(torch.equal(a, b) for a, b in zip(stats, norm.buffers())), "refused before the statistics changed"
    norm.eval()
    model(_data().tensors[0][:B]).sum().backward()  # back in eval mode: accepted


def test_instance_norm_without_running_statistics_is_accepted_and_exact():
    model = nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (2, 3)), nn.InstanceNorm1d(2, affine=True), nn.Tanh(),
                          nn.Flatten(), nn.Linear(6, 1))
    _assert_exact(model)


class Counter(nn.Module):
    """No parameters; counts what it sees in a buffer (released in state_dict)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += x.detach().abs().sum()  # in place
        return x


class RunningMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)  # reassigns the buffer
        return x


class LateCache(nn.Module):
    def forward(self, x):
        self.register_buffer("cache", x.detach().clone())  # a new buffer
        return x


@pytest.mark.parametrize("writer, buffer", [(Counter, "seen"), (RunningMean, "mean"), (LateCache, "cache")])
def test_module_writing_a_buffer_in_a_training_forward_is_refused_by_name(writer, buffer):
    model = nn.Sequential(nn.Linear(5, 4), writer(), nn.Linear(4, 1))
    engine, model, _ = _private(model)
    x = _data().tensors[0][:B]
    with torch.no_grad():  # evaluation and generation are not checked (no gradient is captured)
        model(x)
    model.eval()
    with torch.no_grad():
        model(x)
    with pytest.raises(ValueError, match=rf"module '1' changed its buffer '{buffer}' during a training forward"):
        model(x)


def test_language_models_buffers_pass_the_check():
    for name in ("gpt2_tied", "llama"):
        case = CASES[name]()
        tracker = GradSampleTracker(case.model, clipping="flat", loss_reduction="mean", max_grad_norm=1.0)
        case.per_sample_loss(case.model, case.inputs).sum().backward()
        tracker.flush()
        assert tracker.clipped_sum
        with torch.no_grad():
            case.model.generate(case.inputs["input_ids"][:1, :3], max_new_tokens=2, do_sample=False)


# ------------------------------------------------------------------ gradients that could be lost
class Pair(nn.Module):
    """Own parameters, output a tuple / list / dict holding a pass-through input and None."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.unused_out = nn.Parameter(torch.randn(4, 3) * 0.5)  # feeds an output the loss ignores

    def forward(self, x):
        h, other = x @ self.w, x @ self.unused_out
        if self.kind == "tuple":
            return h, x, None, other
        if self.kind == "list":
            return [h, x]
        return {"h": h, "skip": x, "mask": None}


class PairNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.inp, self.pair, self.head = nn.Linear(5, 4), Pair(kind), nn.Linear(7, 1)

    def forward(self, x):
        out = self.pair(torch.tanh(self.inp(x)))
        h, skip = (out["h"], out["skip"]) if isinstance(out, dict) else out[:2]
        return self.head(torch.cat([torch.tanh(h), skip * skip], -1))


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_module_with_tuple_output_is_exact(kind, clipping):
    torch.manual_seed(0)
    _assert_exact(PairNet(kind), clipping=clipping)


def test_rule_that_needs_one_output_tensor_refuses_a_tuple_at_forward(monkeypatch):
    class PairScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight, x

    class PairScaleRule(HookRule):
        def contributions(self, module, x, g):
            return {module.weight: Instantiated(g * x)}

    monkeypatch.setitem(registry.RULES, PairScale, PairScaleRule())
    model = nn.Sequential(nn.Linear(5, 4), PairScale())
    engine, model, _ = _private(model)
    with pytest.raises(ValueError, match=r"module '1' \(PairScale\) returned a tuple, .* needs one output tensor"):
        model(_data().tensors[0][:B])


class ReusedNorm(nn.Module):
    """A norm layer whose weight is also used outside the layer."""

    def __init__(self, norm, how):
        super().__init__()
        self.inp, self.norm, self.head, self.how = nn.Linear(5, 6), norm, nn.Linear(6, 1), how

    def forward(self, x):
        h = self.norm(self.inp(x))
        if self.how == "functional":
            h = F.layer_norm(torch.tanh(h), (6,), weight=self.norm.weight, bias=self.norm.bias)
        else:
            h = h * self.norm.weight
        return self.head(h)


@pytest.mark.parametrize("norm, how", [
    (lambda: nn.LayerNorm(6), "functional"),
    (lambda: nn.LayerNorm(6), "multiply"),
    (lambda: nn.RMSNorm(6), "multiply"),
], ids=["layernorm_functional", "layernorm_multiply", "rmsnorm_multiply"])
def test_norm_weight_used_outside_its_module_is_refused_by_name(norm, how):
    engine, model, _ = _private(ReusedNorm(norm(), how))
    x, y = _data().tensors[0][:B], _data().tensors[1][:B]
    with pytest.raises(ValueError, match=r"parameter norm\.(weight|bias) received an ordinary gradient"):
        _mse(model, x, y).sum().backward()


class Stash(nn.Module):
    """A fallback module whose parameter also reaches the loss through a tensor stored on the module."""

    def __init__(self, returns_input):
        super().__init__()
        self.w, self.returns_input = nn.Parameter(torch.randn(4, 4) * 0.5), returns_input

    def forward(self, x):
        h = x @ self.w
        self.penalty = h.pow(2).mean(-1, keepdim=True)  # (B, 1), added to the loss by the parent
        return x if self.returns_input else torch.tanh(h)


@pytest.mark.parametrize("returns_input", [False, True])
def test_parameter_reaching_the_loss_around_the_outputs_is_refused_by_name(returns_input):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.stash, self.head = nn.Linear(5, 4), Stash(returns_input), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.stash(self.inp(x))) + 0.1 * self.stash.penalty

    engine, model, _ = _private(Net())
    x, y = _data().tensors[0][:B], _data().tensors[1][:B]
    with pytest.raises(ValueError, match=r"parameter 'w' of module 'stash' \(Stash\) reaches the loss other than"):
        _mse(model, x, y).sum().backward()


def test_parameters_not_used_in_a_forward_get_a_zero_sum():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.spare, self.head = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 1)
            self.scale, self.spare_scale = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.head(torch.tanh(self.inp(x)) * self.scale)

    engine, model = _assert_exact(Net())
    assert torch.count_nonzero(model.spare.weight.grad) == 0 and torch.count_nonzero(model.spare_scale.grad) == 0


@pytest.mark.parametrize("model", [
    lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 1)),
    lambda: nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (3, 2)), nn.GroupNorm(1, 3), nn.Flatten(), nn.Tanh(),
                          nn.Linear(6, 1)),
    lambda: nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.ReLU(), nn.Linear(6, 1)),
    lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)),
], ids=["layernorm", "groupnorm", "rmsnorm", "plain"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_ordinary_models_are_still_accepted_and_exact(model, clipping):
    torch.manual_seed(0)
    _assert_exact(model(), clipping=clipping)


def test_parametrized_weight_is_refused_by_name():
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"module '0\.parametrizations\.weight'.*remove the parametrization"):
        _private(model)


@pytest.mark.parametrize("hooked", ["weight_norm", "spectral_norm"])
def test_weight_computed_by_a_hook_is_refused_by_name(hooked):
    """The hook sets the weight as a plain attribute at every forward: an evaluation forward under no_grad between
    the training forward and backward left a weight without a graph, and weight_g / weight_v got no gradient."""
    with warnings.catch_warnings():  # weight_norm is deprecated in favour of parametrizations (refused above)
        warnings.simplefilter("ignore")
        layer = getattr(torch.nn.utils, hooked)(nn.Linear(5, 4))
    model = nn.Sequential(layer.eval(), nn.Tanh(), nn.Linear(4, 1))  # eval: spectral_norm's buffers stay put
    with pytest.raises(ValueError, match=rf"module '0' \(Linear\): its weight is computed by torch.nn.utils.{hooked}"):
        _private(model)
    layer.requires_grad_(False)  # frozen: nothing to lose
    _private(model)


@pytest.fixture
def one_rank_group():
    """A single-process gloo group, enough for FSDP2's fully_shard on CPU."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no group already initialised")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_norm_weight_used_outside_its_module_is_refused_by_name(one_rank_group):
    """FSDP2 runs the model on unsharded stand-ins of the parameters: their foreign uses are refused too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = ReusedNorm(nn.LayerNorm(6), "multiply")
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model.inp, mesh=mesh)
    engine, model, optimizer = _private(fully_shard(model, mesh=mesh))
    x, y = _data().tensors[0][:B], _data().tensors[1][:B]
    with pytest.raises(ValueError, match=r"parameter module\.norm\.weight received an ordinary gradient"):
        _mse(model, x, y).sum().backward()


class TokenModel(nn.Module):
    def __init__(self, embedding):
        super().__init__()
        self.embedding, self.head = embedding, nn.Linear(4, 1)

    def forward(self, tokens):  # (B, T) -> (B, 1)
        return self.head(self.embedding(tokens).mean(1))


def _tokens(n=24, t=3, vocab=50):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, vocab, (n, t), generator=g), torch.randn(n, 1, generator=g))


@pytest.mark.parametrize("frozen", [False, True])
def test_embedding_with_max_norm_is_refused_trainable_or_frozen(frozen):
    """The attack: nn.Embedding(max_norm=1) renormalises every row it looks up, in place, in every mode; with
    lr = 0 the released weight showed exactly which rows the data used (the canary token of ONE record among
    them), and a trainable one crashed with a raw autograd error."""
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 4, max_norm=1.0)
    with torch.no_grad():
        embedding.weight.mul_(10)  # every row above max_norm
    embedding.weight.requires_grad_(not frozen)
    before = embedding.weight.detach().clone()
    with pytest.raises(ValueError, match=r"module 'embedding' \(Embedding\): max_norm=1 renormalises the rows it "
                                         r"looks up in place.*set max_norm=None"):
        _private(TokenModel(embedding), data=_tokens())
    assert torch.equal(embedding.weight, before)
    bag = TokenModel(nn.EmbeddingBag(50, 4, max_norm=2.0))
    with pytest.raises(ValueError, match=r"\(EmbeddingBag\): max_norm=2 renormalises"):
        _private(bag, data=_tokens())


class RenormalisingLookup(nn.Module):
    """The same leak through the functional API: a frozen table renormalised by F.embedding(max_norm=...)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(10 * torch.randn(50, 4), requires_grad=False)
        self.head = nn.Linear(4, 1)

    def forward(self, tokens):
        return self.head(F.embedding(tokens, self.table, max_norm=1.0).mean(1))


def test_a_parameter_written_in_place_by_a_training_forward_is_refused_by_name():
    engine, model, _ = _private(RenormalisingLookup(), data=_tokens())
    tokens = _tokens().tensors[0][:B]
    before = model.table.detach().clone()
    with pytest.raises(ValueError, match=r"module 'RenormalisingLookup' changed its parameter 'table' during a "
                                         r"training forward pass"):
        model(tokens)
    assert not torch.equal(model.table, before)  # the check runs after the forward: the oracle that it wrote


def test_a_model_running_hugging_face_hub_kernels_is_refused(monkeypatch):
    """transformers >= 5.25 kernelizes from_pretrained models by default when the `kernels` package is installed;
    a kernelized RMSNorm's weight then got an ordinary gradient (full fine-tuning of a GGUF Llama failed in a fresh
    venv). The engine refuses a kernelized model by name, and dptrain's loaders ask for the torch layers."""
    transformers = pytest.importorskip("transformers")
    from dptrain.finetune import modeling

    case = CASES["llama"]()
    case.model._use_kernels = True  # what set_use_kernels(True) records (the kernels package is not needed here)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM runs Hugging Face hub kernels \(use_kernels=True.*"
                                         r"from_pretrained\(\.\.\., use_kernels=False\)"):
        GradSampleTracker(case.model, clipping="flat", loss_reduction="mean", max_grad_norm=1.0)
    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="stop here"):
        modeling.load_pretrained(os.path.dirname(__file__))  # a local folder: the fake loader stops there
    assert seen.get("use_kernels") is False or not hasattr(transformers.PreTrainedModel, "set_use_kernels")
