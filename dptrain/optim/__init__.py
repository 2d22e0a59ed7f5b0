"""Low-memory optimizers that run on the privatised gradient (post-processing).

Each class is a ``torch.optim.Optimizer`` that reads only ``p.grad``; under DP the engine writes the noised
gradient there, so using any of them costs no privacy. Matrices (>= 2-D parameters, >2-D flattened) get the
method's low-memory rule; other parameters get full-rank AdamW (SGD-SaI and MicroAdam: their own rule).

| class         | state per m x n matrix (m <= n) | paper |
|---------------|----------------------------------|-------|
| ``Apollo``      | 2 n r (+ seed)                 | Zhu et al. 2024 |
| ``ApolloMini``  | 2 n (+ seed)                   | Zhu et al. 2024 |
| ``GaLoreAdamW`` | m r + 2 n r                    | Zhao et al. 2024 |
| ``Frugal``      | 2 rho m n (+ seed)             | Zmushko et al. 2024 |
| ``Swan``        | 0                              | Ma et al. 2024 |
| ``SGDSaI``      | m n (+ one scalar)             | Xu et al. 2024 |
| ``MicroAdam``   | 4 m k + 0.5 bytes per entry (ring m, density k) | Modoranu et al. 2024 |
| ``LDAdam``      | m r + 2 n r (+ m n error feedback) | Robert et al. 2025 |
| ``DCTAdamW``    | 2 n r + r indices (+ shared m^2 basis) | Modoranu et al. 2025 |
"""

from .apollo import Apollo, ApolloMini
from .dct import DCTAdamW
from .frugal import Frugal
from .galore import GaLoreAdamW
from .ldadam import LDAdam
from .memory import optimizer_state_bytes, parameter_state_bytes
from .micro_adam import MicroAdam
from .sgd_sai import SGDSaI
from .swan import Swan

__all__ = ["Apollo", "ApolloMini", "DCTAdamW", "Frugal", "GaLoreAdamW", "LDAdam", "MicroAdam", "SGDSaI", "Swan",
           "optimizer_state_bytes", "parameter_state_bytes"]
