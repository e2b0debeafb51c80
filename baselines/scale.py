"""SCALE: Stochastic Column-normAlized Last-layer momEntum.

Glentis, Li, Han, Hong, "A Minimalist Optimizer Design for LLM Pretraining" (published as
"Memory-Efficient LLM Pretraining via Minimalist Optimizer Design"), arXiv 2506.16659;
authors' code: github.com/OptimAI-Lab/Minimalist_LLM_Pretraining
(``mem_eff_pt/pt_scale/scale_optimizer.py``, ``mem_eff_pt/utils/train_utils.py``).
No library ships it; this is a from-scratch implementation of the update below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ddc.param_groups import param_groups

from ._options import as_betas, as_choice, as_float, builder, check_role_group
from .muon import adamw_group_step

NORMALIZATIONS = ("l2", "rms")


class SCALE(torch.optim.Optimizer):
    r"""SCALE (arXiv 2506.16659): per-output-unit normalised SGD, momentum on the readout only.

    No second-moment statistics. Every param group must carry the ``role`` key written by
    :func:`ddc.param_groups.param_groups`; the update of a parameter ``W`` with gradient
    ``G`` at learning rate ``lr`` and (decoupled) weight decay ``wd`` is:

    * ``role == "matrix"`` (hidden ``nn.Linear`` / ``nn.ConvNd`` weights, torch layout
      ``out x in`` or ``out x in x kernel...``): with ``G`` viewed as a matrix
      ``(out, -1)``, each row (one output unit's incoming weights) is divided by its norm::

          U[i, :] = G[i, :] / max(N(G[i, :]), eps)
          W <- W * (1 - lr * wd) - lr * U

      This is the paper's "column normalisation" (the paper writes weights as ``in x out``).
    * ``role == "readout"`` (the output layer ``model.readout``): the same, applied to a
      first-moment EMA of the gradient instead of the gradient::

          M <- momentum * M + (1 - momentum) * G          (M_0 = 0, state "momentum_buffer")
          U[i, :] = M[i, :] / max(N(M[i, :]), eps)
          W <- W * (1 - lr * wd) - lr * U

      This is the only momentum in SCALE ("last-layer momentum").
    * ``role == "embedding"`` (embedding tables, positional tables, class tokens, tied
      readouts): as in the authors' code, embeddings are normalised like hidden matrices
      and get no momentum. An embedding table is stored ``in x out`` (``vocab x dim``), so
      normalising per output unit means per *column*: with ``G`` viewed as
      ``(-1, G.shape[-1])``, ``U[:, j] = G[:, j] / max(N(G[:, j]), eps)`` (the authors
      normalise ``embed_tokens`` along dim 0 for the same reason). For a tensor with a
      single row (a class token) every entry is its own column: the step is
      ``-lr * sign(G)``.
    * ``role == "vector"`` (biases, norm gains): AdamW, exactly ``torch.optim.AdamW``'s update
      (``torch.optim.adamw.adamw``) with ``betas=adam_betas``, ``eps=adam_eps`` and learning
      rate ``adam_lr_ratio * lr``. The authors' code does the same: its AdamW part runs at
      ``(adam_lr / max_lr) * lr``, i.e. at a fixed ratio to the scheduled ``lr``.

    ``N`` is chosen by ``normalization``:

    * ``"rms"`` (default; the authors' released code): ``N(v) = ||v||_2 / sqrt(len(v))``;
      every row of the step has RMS ``lr``, i.e. norm ``lr * sqrt(fan_in)``. The authors'
      recipes (lr 1e-3 for their 60M-350M LLaMA runs) were tuned with this normalisation.
    * ``"l2"`` (the paper's definition): ``N(v) = ||v||_2``; every normalised row (column,
      for embeddings) of the step has Euclidean norm exactly ``lr``, so at equal ``lr`` the
      step is ``sqrt(fan_in)`` times smaller per entry than with ``"rms"``.

    **A readout is required.** SCALE's only momentum is on the untied output layer (the
    group with role ``readout``). A model whose readout is tied to its embedding (e.g.
    ``gpt_lm`` with ``task.model.tied=true``) has no such group and SCALE would silently
    run without any momentum, so the constructor refuses it with a ``ValueError``.

    Hyperparameters live in each group (``lr``, ``weight_decay``, ``momentum``, ``eps``,
    ``normalization``, ``adam_betas``, ``adam_eps``) so LR schedulers and per-group
    overrides work as for any ``torch.optim`` optimizer. State: ``momentum_buffer`` for the
    readout; ``step``, ``exp_avg``, ``exp_avg_sq`` for AdamW parameters; nothing otherwise.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        normalization: str = "rms",
        adam_lr_ratio: float = 20.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid eps value: {eps} (must be > 0)")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"Invalid normalization {normalization!r}; one of {NORMALIZATIONS}")
        if not 0.0 < adam_lr_ratio:
            raise ValueError(f"Invalid adam_lr_ratio: {adam_lr_ratio} (must be > 0)")
        if len(adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in adam_betas):
            raise ValueError(f"Invalid adam_betas: {adam_betas}")
        if not 0.0 <= adam_eps:
            raise ValueError(f"Invalid adam_eps value: {adam_eps}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eps": eps,
            "normalization": normalization,
            "adam_betas": tuple(adam_betas),
            "adam_eps": adam_eps,
        }
        groups = list(params)
        # The AdamW groups start from adam_lr_ratio * lr; a scheduler then scales them like
        # the others (the authors scale adam_lr by the same schedule factor as lr).
        groups = [
            {**g, "lr": g.get("lr", lr * adam_lr_ratio)}
            if isinstance(g, dict) and g.get("role") == "vector" else g
            for g in groups
        ]
        super().__init__(groups, defaults)  # checks every group's role
        if not any(g["role"] == "readout" for g in self.param_groups):
            raise ValueError(
                "SCALE needs an untied readout layer (model.readout, an nn.Linear not shared "
                "with an embedding): its only momentum is on that layer; this model has none "
                "(for gpt_lm set task.model.tied=false)"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it must carry a ``role`` (see :func:`ddc.param_groups.param_groups`)."""
        check_role_group("SCALE", param_group, matrix_roles=("matrix", "embedding", "readout"))
        super().add_param_group(param_group)
        if param_group["normalization"] not in NORMALIZATIONS:
            self.param_groups.pop()
            raise ValueError(f"Invalid normalization {param_group['normalization']!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (``closure`` re-evaluates the loss, optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["role"] == "vector":
                adamw_group_step(self.state, group)
            else:
                self._normalized_group_step(group)
        return loss

    def _normalized_group_step(self, group: dict[str, Any]) -> None:
        role = group["role"]
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SCALE does not support sparse gradients")
            direction = p.grad
            if role == "readout":
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                direction = state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
            update = normalize_per_output(
                direction, role, group["normalization"], group["eps"]
            )
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr)


def normalize_per_output(g: Tensor, role: str, normalization: str, eps: float) -> Tensor:
    """SCALE's normalisation of ``g`` (a new tensor of ``g``'s shape).

    ``matrix`` / ``readout``: each slice ``g[i]`` (one output unit) divided by its norm;
    ``embedding``: each column of ``g.reshape(-1, g.shape[-1])`` divided by its norm. The
    norm is L2 (``"l2"``) or root-mean-square (``"rms"``), clamped below at ``eps``.
    """
    if role == "embedding":
        mat, dim = g.reshape(-1, g.shape[-1]), 0
    else:
        mat, dim = g.reshape(g.shape[0], -1), 1
    if normalization == "l2":
        scale = torch.linalg.vector_norm(mat, dim=dim, keepdim=True)
    else:
        scale = mat.square().mean(dim=dim, keepdim=True).sqrt_()
    return (mat / scale.clamp_min_(eps)).view(g.shape)


@builder("scale")
def build_scale(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    normalization: str = "rms",
    adam_lr_ratio: float = 20.0,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
) -> SCALE:
    """:class:`SCALE` on ``param_groups(model, weight_decay)``."""
    name = "scale"
    return SCALE(
        param_groups(model, as_float(name, "weight_decay", weight_decay)),
        lr=as_float(name, "lr", lr),
        momentum=as_float(name, "momentum", momentum, high=1.0, high_open=True),
        weight_decay=as_float(name, "weight_decay", weight_decay),
        eps=as_float(name, "eps", eps, low_open=True),
        normalization=as_choice(name, "normalization", normalization, NORMALIZATIONS),
        adam_lr_ratio=as_float(name, "adam_lr_ratio", adam_lr_ratio, low_open=True),
        adam_betas=as_betas(name, "adam_betas", adam_betas),
        adam_eps=as_float(name, "adam_eps", adam_eps),
    )
