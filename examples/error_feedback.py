"""python examples/error_feedback.py

DiceSGD (clipping error feedback) vs plain DP-SGD at the same (eps, delta), each under the accounting dptrain
implements for it, on mean estimation where 5% of the points lie far away, so per-sample clipping at a small C1
pins DP-SGD to the inliers. One flag turns it on:
``make_private(..., error_feedback=True, error_max_grad_norm=C2)`` (C2: the feedback per logical batch, on the
sum scale; default C1 * batch size). The engine keeps the error buffer (never released; it is in
``engine.state_dict()``, so protect checkpoints like the data) and uses the worst-case bound proven in
``dptrain.error_feedback``: every step is accounted as a full-batch Gaussian (no subsampling amplification) and
the noise std on the sum is z * (C1 + 2 C2). That price is large: DiceSGD wins here only at a large epsilon.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain

DELTA = 1e-5


def make_data(n=1000, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, d, generator=g)  # inliers around 0
    x[: n // 20, 0] += 25.0  # 5% far away
    return x


def train(x, *, error_feedback, epsilon, steps=10, lr=1.0, c1=0.1):
    """Full-batch training (Poisson sampling at rate 1) of w = argmin mean_i ||w - x_i||^2 / 2."""
    n, d = x.shape
    torch.manual_seed(0)
    model = nn.Linear(1, d, bias=False)  # w = model(1)
    nn.init.zeros_(model.weight)
    extra = dict(error_feedback=True, error_max_grad_norm=1.5 * c1 * n) if error_feedback else {}
    engine = dptrain.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(torch.ones(n, 1), x), batch_size=n),
        max_grad_norm=c1,  # C1: small, so clipping is active for every sample
        target_epsilon=epsilon,
        target_delta=DELTA,
        epochs=steps,  # one step per epoch at full batch
        **extra,
    )
    for _ in range(steps):
        for inp, target in loader:
            if len(inp):  # Poisson batches can be empty: still step
                (0.5 * (model(inp) - target).pow(2).sum(1)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    distance = float((model.weight.detach()[:, 0] - x.mean(0)).norm())
    return distance, engine.get_epsilon(DELTA), optimizer.noise_std()


def main() -> None:
    torch.set_num_threads(1)
    x = make_data()
    for epsilon in (2.0, 32.0):
        for name, flag in (("DP-SGD", False), ("DiceSGD", True)):
            distance, eps, std = train(x, error_feedback=flag, epsilon=epsilon)
            print(f"target eps {epsilon:4g}  {name:8s} distance to the mean {distance:.3f}  epsilon {eps:.3f}  "
                  f"noise std on the sum {std:.4g}")


if __name__ == "__main__":
    main()
