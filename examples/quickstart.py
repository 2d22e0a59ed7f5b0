"""python examples/quickstart.py

DP-SGD on a small synthetic classification task with dptrain: Poisson sampling, flat clipping,
noise calibrated to a target epsilon, micro-batches of at most 16 rows.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptrain
from dptrain.losses import cross_entropy


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(2000, 20)
    y = (x[:, :5].sum(1) > 0).long()  # a linearly separable label
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 2))
    engine = dptrain.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=64),
        max_grad_norm=1.0,
        target_epsilon=2.0,
        target_delta=1e-5,
        epochs=3,
        max_physical_batch_size=16,
    )
    for epoch in range(3):
        for xb, yb in loader:
            if len(xb):  # Poisson batches can be empty: still step (noise only)
                cross_entropy(model(xb), yb).sum().backward()  # the sum of per-sample losses
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        print(f"epoch {epoch + 1}: accuracy {accuracy:.3f}, epsilon {engine.get_epsilon(1e-5):.3f}")
    print(f"noise multiplier {optimizer.noise_multiplier:.3f}")


if __name__ == "__main__":
    main()
