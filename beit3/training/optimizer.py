"""The optimizer of every training program: AdamW over timm's parameter groups."""

from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from .settings import TrainSettings


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Norms, biases, embeddings, position tables and special tokens: trained without weight decay."""
    exempt = ("_token", "position_embeddings", "position_embeddings.weight", "text_embeddings.weight", "logit_scale")
    return {name for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith(exempt)}


def build_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over timm's parameter groups: no weight decay on norms, biases and embeddings and, with
    ``layer_decay``, a learning rate that shrinks by that factor per layer from the top down; without
    it, ``head_lr_scale`` multiplies the learning rate of every parameter outside the backbone (``beit3.*``): the
    VQA ``pooler.*`` and ``head.*``, the NLVR2 and classification ``head.*`` (and ``fc_norm.*``), retrieval's
    ``vision_head``, ``language_head`` and ``logit_scale``, captioning's ``mlm_head``. That is unilm's
    task_head_lr_weight (VQA x20) with one difference: unilm boosts ``head*`` names only and leaves the freshly
    initialized VQA pooler at the backbone's rate."""
    exempt = no_weight_decay_names(model)
    if settings.layer_decay is None:
        groups = param_groups_weight_decay(model, settings.weight_decay, no_weight_decay_list=exempt)
        if settings.head_lr_scale != 1.0:
            backbone = {id(p) for p in getattr(model, "base_model", model).parameters()}
            head = {id(p) for p in model.parameters() if id(p) not in backbone}
            if not head:
                raise ValueError(
                    f"head_lr_scale {settings.head_lr_scale} but {type(model).__name__} has no task-specific parameters "
                    "(none outside beit3.*) to scale."
                )
            groups = [
                {**group, "params": params, "lr": settings.lr * scale}
                for group in groups
                for params, scale in (
                    ([p for p in group["params"] if id(p) not in head], 1.0),
                    ([p for p in group["params"] if id(p) in head], settings.head_lr_scale),
                )
                if params
            ]
    else:
        groups = param_groups_layer_decay(
            model, settings.weight_decay, no_weight_decay_list=exempt, layer_decay=settings.layer_decay
        )
        for group in groups:  # the schedule scales each group's initial lr, so the layer scale goes there
            group["lr"] = settings.lr * group.pop("lr_scale")
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)
