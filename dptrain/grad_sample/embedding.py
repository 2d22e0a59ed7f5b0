"""``nn.Embedding``: per-sample gradient G_i = onehot(ids_i)^T g_i, kept in index form (never (B, V, d)).

Position embeddings looked up with ids of batch size 1 and broadcast over the batch (HF GPT-2 ``wpe``) are
expanded to the batch first, so each sample's share of the gradient stays separate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad_sample.contributions import Factored
from dptrain.grad_sample.registry import register_rule
from dptrain.grad_sample.rules_base import FunctionRule

__all__ = ["EmbeddingRule"]


class _TrackedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, report):
        ctx.save_for_backward(ids)
        ctx.report = report
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        ctx.report(ids, g)
        return None, None, None, None


@register_rule(nn.Embedding)
class EmbeddingRule(FunctionRule):
    def supports(self, module):
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse

    def dp_forward(self, module, tracker, ids):
        batch = tracker.batch_size
        if ids.dim() >= 1 and ids.shape[0] == 1 and batch is not None and batch > 1:
            ids = ids.expand(batch, *ids.shape[1:])  # broadcast lookups (position ids) become per-sample
        call = tracker.record_call(module)
        report = lambda saved, g: tracker.arrive(module, call, saved, g)  # noqa: E731
        return _TrackedEmbedding.apply(ids, module.weight, module.padding_idx, report)

    def contributions(self, module, ids, g):
        ids = ids.reshape(ids.shape[0], -1)  # (B, T)
        g = g.reshape(ids.shape[0], ids.shape[1], -1)  # (B, T, d)
        if module.padding_idx is not None:  # torch gives the padding row no gradient
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        if not module.weight.requires_grad:
            return {}
        return {module.weight: Factored(ids, g, module.num_embeddings, module.weight.shape)}
