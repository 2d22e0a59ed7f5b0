"""python examples/error_feedback.py

DiceSGD (clipping error feedback) vs plain DP-SGD at the same (eps, delta) on logistic regression whose
informative feature is heavy-tailed, so per-sample clipping at a small C1 biases DP-SGD. One flag turns it on:
``make_private(..., error_feedback=True, error_max_grad_norm=C2)`` (C2 >= C1, default C2 = C1). The engine
keeps the error buffer (never released; it is in ``engine.state_dict()``, so protect checkpoints like the data)
and adds noise std sigma * C1 * sqrt(1 + 2 C2/C1) on the clipped sum, with sigma calibrated as for DP-SGD.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain


def make_data(n=2000, d=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x[:, 0] = rng.standard_t(1.5, n)  # heavy-tailed feature carrying most of the signal
    w = np.r_[2.0, 0.5, 0.5, 0.5, np.zeros(d - 4)]
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def train(x, y, *, error_feedback, epochs=10):
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1)
    engine = dptrain.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=100),
        max_grad_norm=0.1,  # C1: small, so clipping is active for most samples
        target_epsilon=2.0,
        target_delta=1e-5,
        epochs=epochs,
        error_feedback=error_feedback,  # DiceSGD; error_max_grad_norm (C2) defaults to C1
    )
    for _ in range(epochs):
        for xb, yb in loader:
            if len(xb):  # Poisson batches can be empty: still step
                F.binary_cross_entropy_with_logits(model(xb).squeeze(1), yb).backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y).item()
    return loss, engine.get_epsilon(1e-5), optimizer.noise_std()


def main() -> None:
    torch.set_num_threads(1)
    x, y = make_data()
    for name, flag in (("DP-SGD", False), ("DiceSGD", True)):
        loss, eps, std = train(x, y, error_feedback=flag)
        print(f"{name:8s} training loss {loss:.4f}  epsilon {eps:.3f}  noise std on the sum {std:.4f}")


if __name__ == "__main__":
    main()
