"""Private federated LoRA: FedSVD, FFA-LoRA and DP-LoRA with sample-level DP on every client.

The algorithm is plain library code (``algorithm``, ``svd``, ``lora``); ``dptrain.federated.flower`` runs it on
Flower (``pip install flwr``; imported only when used). See ``algorithm`` for the privacy guarantee.
"""

from dptrain.federated.algorithm import (ClientUpdate, FedConfig, FederatedClient, FederatedResult, aggregate,
                                         lm_losses, run_in_process, server_update, svd_due)
from dptrain.federated.app import AppSettings, run_local
from dptrain.federated.data import demo_federation, demo_label, dirichlet_split
from dptrain.federated.lora import METHODS, get_factors, lora_layers, set_factors, set_trainable, trained_factors
from dptrain.federated.model import load_lora_model, save_demo_base
from dptrain.federated.svd import svd_refactorize

__all__ = [
    "METHODS",
    "AppSettings",
    "ClientUpdate",
    "FedConfig",
    "FederatedClient",
    "FederatedResult",
    "aggregate",
    "demo_federation",
    "demo_label",
    "dirichlet_split",
    "get_factors",
    "lm_losses",
    "load_lora_model",
    "lora_layers",
    "run_in_process",
    "run_local",
    "save_demo_base",
    "server_update",
    "set_factors",
    "set_trainable",
    "svd_due",
    "svd_refactorize",
    "trained_factors",
]
