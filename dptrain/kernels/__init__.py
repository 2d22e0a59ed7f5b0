"""Per-sample gradient kernels: Triton GPU kernels, each beside its pure-torch reference.

Every op takes ``backend``: "auto" (Triton for CUDA tensors when triton is installed, the torch reference
otherwise), "torch", or "triton" (on CPU tensors only under TRITON_INTERPRET=1, set before this import).
Norm ops of linear layers and embeddings also take ``strategy``: "auto", "ghost" or "instantiate".
"""

# From a checkout, the repository root is often on sys.path (``python -m ...``), which makes this folder
# importable as a top-level ``kernels`` too: the name of Hugging Face's kernel-hub package, which transformers
# probes for by importing it. Under that name stay an empty package, so the probe is cheap and finds nothing.
if __name__ == "dptrain.kernels":
    from ._common import gram_cost, row_sq_norms
    from .clip import CANCELLATION_RHO, clip_bounds_sq, clip_factors, ieee_fp32_matmul, row_norm_bounds, triangle_bounds
    from .embedding_norms import per_sample_embedding_grad_norms, per_sample_embedding_grad_sq_norms
    from .fused_clip import fused_clip_linear_grad
    from .linear_norms import (
        bound_terms,
        choose_linear_strategy,
        ghost_rounding_allowance,
        per_sample_linear_grad_norms,
        per_sample_linear_grad_sq_norms,
    )
    from .scaled_grad import scaled_linear_grad

__all__ = [
    "row_sq_norms",
    "gram_cost",
    "clip_factors",
    "triangle_bounds",
    "row_norm_bounds",
    "ghost_rounding_allowance",
    "bound_terms",
    "CANCELLATION_RHO",
    "clip_bounds_sq",
    "ieee_fp32_matmul",
    "choose_linear_strategy",
    "per_sample_linear_grad_norms",
    "per_sample_linear_grad_sq_norms",
    "scaled_linear_grad",
    "fused_clip_linear_grad",
    "per_sample_embedding_grad_norms",
    "per_sample_embedding_grad_sq_norms",
]
