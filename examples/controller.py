"""Adaptive clip thresholds and noise with the SAC controller, at the same privacy budget as fixed DP-SGD.

    python examples/controller.py

Trains a small MLP on a synthetic classification task twice under (epsilon, delta) = (2, 1e-5): once with the
noise calibrated up front and fixed thresholds, once with ``SACController`` choosing per-layer thresholds and
sigma every 8 steps. The controller's observations of private data (the fraction of clipped samples per
layer) are released with Gaussian noise and composed into the same accountant, and its budget guard keeps
the run's epsilon at or under the target whatever the policy asks for. The held-out "public" split stands in
for public validation data (its loss is the controller's reward signal and is not accounted).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.control import SACController

EPSILON, DELTA, EPOCHS = 2.0, 1e-5, 6


def data(n, g):
    means = 2.5 * F.normalize(torch.randn(10, 20, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.randint(0, 10, (n,), generator=g)
    return means[y] + torch.randn(n, 20, generator=g), y


def train(use_controller: bool):
    g = torch.Generator().manual_seed(1)
    (x, y), (x_pub, y_pub), (x_test, y_test) = data(3000, g), data(500, g), data(2000, g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    controller = None
    if use_controller:
        def public_loss():  # called by the controller under no_grad
            return float(F.cross_entropy(model(x_pub), y_pub))

        controller = SACController(interval=8, seed=0, validation_loss=public_loss)
    engine = dptrain.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=100), max_grad_norm=1.0, clipping="per_layer",
        target_epsilon=EPSILON, target_delta=DELTA, epochs=EPOCHS, controller=controller,
    )
    for _ in range(EPOCHS):
        for xb, yb in loader:
            F.cross_entropy(model(xb), yb, reduction="sum").backward()  # the sum of per-sample losses
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return engine.get_epsilon(DELTA), accuracy, controller


if __name__ == "__main__":
    eps, acc, _ = train(use_controller=False)
    print(f"fixed sigma:    epsilon {eps:.3f}, test accuracy {acc:.3f}")
    eps, acc, ctrl = train(use_controller=True)
    print(f"SAC controller: epsilon {eps:.3f}, test accuracy {acc:.3f}")
    print("step  sigma   floor   thresholds        reward")
    for h in ctrl.history:
        reward = "" if h["reward"] is None else f"{h['reward']:+.3f}"
        print(f"{h['step']:4d}  {h['noise_multiplier']:.3f}  {h['sigma_floor']:.3f}  "
              f"{', '.join(f'{c:.3f}' for c in h['max_grad_norm']):16s}  {reward}")
