"""Muon on the hidden matrices, AdamW on everything else, as ONE optimizer.

The per-tensor math is torch's own: :func:`ddc.muon_kernels.muon` (torch.optim.Muon's kernel,
vendored) for the ``matrix`` groups and the functional
:func:`torch.optim.adamw.adamw` (the kernel behind ``torch.optim.AdamW``) for the rest.
This module only decides which tensors go to which kernel, keeps their state in
``self.state`` under torch's key names, and presents both parts as one
``torch.optim.Optimizer`` (one ``param_groups`` list, one ``state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as adamw_kernel

from ddc.muon_kernels import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS
from ddc.muon_kernels import muon as muon_kernel
from ddc.param_groups import input_layer, param_groups  # noqa: F401  (input_layer: re-exported by baselines)

from ._options import (
    as_betas,
    as_bool,
    as_choice,
    as_float,
    as_float_tuple,
    as_int,
    builder,
    check_role_group,
)

#: Learning-rate adjustments torch's Muon kernel knows (``None`` means "original").
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")


class MuonWithAdamW(torch.optim.Optimizer):
    r"""Muon for hidden matrices and AdamW for all other parameters, in one optimizer.

    **Which parameters go where.** Every param group must carry the ``role`` key that
    :func:`ddc.param_groups.param_groups` writes:

    * ``role == "matrix"`` (weights of hidden ``nn.Linear`` / ``nn.ConvNd`` layers): Muon,
      i.e. exactly ``torch.optim.Muon``'s per-tensor update (:func:`ddc.muon_kernels.muon`)::

          B      <- B.lerp(G, 1 - momentum)                    # momentum buffer
          U      <- G.lerp(B, momentum) if nesterov else B
          O      <- NewtonSchulz_{ns_coefficients, ns_steps, eps}(U)   # ~ orthogonalised U
          W      <- W * (1 - lr * weight_decay)
          W      <- W - adjusted_lr * O,   adjusted_lr = _adjust_lr(lr, adjust_lr_fn, W.shape)

      A convolution weight of shape ``(out, in, *kernel)`` is handled as the matrix
      ``(out, in * prod(kernel))``: the kernel gets ``p.view(p.shape[0], -1)`` views of the
      parameter, its gradient and its momentum buffer (Keller Jordan's Muon flattens conv
      filters the same way), so in-place updates through the view write the parameter and
      the shape that enters ``adjusted_lr`` is the flattened one.
    * ``role`` in ``("embedding", "readout", "vector")`` (embedding tables, the output
      layer, biases and norm gains): AdamW, exactly ``torch.optim.AdamW``'s update
      (``torch.optim.adamw.adamw``) with ``betas=adam_betas``, ``eps=adam_eps`` and
      learning rate ``adam_lr_ratio * lr``.

    :func:`build_muon` also hands the model's *input layer* (a ViT patch embedding, a
    ConvNet stem; see :func:`input_layer`) to AdamW, by giving its weight the role
    ``embedding``: Muon's authors keep embeddings, the first layer and the classifier head
    on AdamW (KellerJordan/Muon README: "for a ConvNet, you should use Muon to optimize all
    the convolutional filters except the first one, and AdamW to optimize everything
    else").

    **Learning rate.** One ``lr`` and one ``weight_decay`` (per group, as set by the
    grouping rule: 0 on vectors) serve both parts; the AdamW part runs at
    ``adam_lr_ratio * lr`` (default ratio 1). With the default
    ``adjust_lr_fn="match_rms_adamw"`` (Moonshot, "Muon is Scalable for LLM Training",
    arXiv 2502.16982) a Muon step on an ``A x B`` matrix uses
    ``adjusted_lr = 0.2 * sqrt(max(A, B)) * lr``, which matches the update RMS of AdamW, so
    the learning rate and weight decay tuned for AdamW carry over. ``"original"`` (Keller
    Jordan: ``sqrt(max(1, A / B)) * lr``) and ``"spectral_unclamped"`` (``sqrt(A / B) * lr``)
    are torch's other choices. Weight decay is decoupled in both parts and is *not* adjusted:
    ``W <- W * (1 - lr * weight_decay)`` (with the group's own lr).

    The two conventions of the literature:

    * torch / Moonshot (the default): ``adjust_lr_fn="match_rms_adamw"``, ``lr`` and
      ``weight_decay`` = AdamW's, ``adam_lr_ratio=1``.
    * Keller Jordan (Muon's author, KellerJordan/Muon README): ``adjust_lr_fn="original"``,
      ``lr=0.02``, ``weight_decay=0.01``, AdamW part at 3e-4, i.e. ``adam_lr_ratio=0.015``.

    An LR scheduler scales every group's ``lr`` (relative to its ``initial_lr``), so it
    drives the Muon and the AdamW groups alike.

    **State** (in ``self.state[p]``, torch's key names): ``momentum_buffer`` (shape of
    ``p``) for Muon parameters; ``step``, ``exp_avg``, ``exp_avg_sq`` for AdamW parameters.

    **Subclassing.** :meth:`step` calls :meth:`_muon_group_step` for each ``matrix`` group and
    :meth:`_adamw_group_step` for each other group, so a variant (DDC-Muon) can reuse one
    part unchanged.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = "match_rms_adamw",
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        adam_lr_ratio: float = 1.0,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps value: {eps}")
        if not 0 < ns_steps < 100:
            raise ValueError(f"Invalid ns_steps value: {ns_steps} (must be in 1..99)")
        if len(ns_coefficients) != 3:
            raise ValueError(f"ns_coefficients must hold 3 values, got {ns_coefficients}")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Invalid adjust_lr_fn: {adjust_lr_fn!r}; one of {ADJUST_LR_FNS}")
        if len(adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in adam_betas):
            raise ValueError(f"Invalid adam_betas: {adam_betas}")
        if not 0.0 <= adam_eps:
            raise ValueError(f"Invalid adam_eps value: {adam_eps}")
        if not 0.0 < adam_lr_ratio:
            raise ValueError(f"Invalid adam_lr_ratio value: {adam_lr_ratio} (must be > 0)")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "adam_betas": tuple(adam_betas),
            "adam_eps": adam_eps,
        }
        groups = list(params)
        if adam_lr_ratio != 1.0:
            # The AdamW groups start at adam_lr_ratio * lr; an LR scheduler then scales
            # every group by the same factor, so the ratio holds throughout training.
            groups = [
                {**g, "lr": g.get("lr", lr * adam_lr_ratio)}
                if isinstance(g, dict) and g.get("role") != "matrix" else g
                for g in groups
            ]
        super().__init__(groups, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it must carry a ``role`` (see :func:`ddc.param_groups.param_groups`)."""
        check_role_group(type(self).__name__, param_group, matrix_roles=("matrix",))
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (``closure`` re-evaluates the loss, optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["role"] == "matrix":
                self._muon_group_step(group)
            else:
                self._adamw_group_step(group)
        return loss

    def _muon_group_step(self, group: dict[str, Any]) -> None:
        """torch's Muon kernel on every parameter of ``group`` that has a gradient."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor] = []
        write_back: list[tuple[Tensor, Tensor]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                # Contiguous, so that a conv buffer always has a (out, -1) view.
                state["momentum_buffer"] = torch.zeros_like(
                    p.grad, memory_format=torch.contiguous_format
                )
            matrix = _matrix_view(p)
            if matrix is None:
                # A parameter whose memory layout has no (out, -1) view (channels_last):
                # update a contiguous copy and write it back after the kernel.
                matrix = p.reshape(p.shape[0], -1).clone()
                write_back.append((p, matrix))
            params.append(matrix)
            grad = _matrix_view(p.grad)
            grads.append(grad if grad is not None else p.grad.reshape(p.shape[0], -1))
            buf = _matrix_view(state["momentum_buffer"])
            if buf is None:  # only after loading a non-contiguous buffer
                state["momentum_buffer"] = state["momentum_buffer"].contiguous()
                buf = _matrix_view(state["momentum_buffer"])
            bufs.append(buf)
        if not params:
            return
        muon_kernel(
            params,
            grads,
            bufs,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_coefficients=group["ns_coefficients"],
            ns_steps=group["ns_steps"],
            eps=group["eps"],
            adjust_lr_fn=group["adjust_lr_fn"],
        )
        for p, matrix in write_back:
            p.copy_(matrix.view(p.shape))

    def _adamw_group_step(self, group: dict[str, Any]) -> None:
        """torch's functional AdamW on every parameter of ``group`` that has a gradient."""
        adamw_group_step(self.state, group)


def adamw_group_step(state: dict[Tensor, dict[str, Any]], group: dict[str, Any]) -> None:
    """One ``torch.optim.AdamW`` step (amsgrad off) on the parameters of ``group``.

    Lazy state exactly as ``torch.optim.Adam._init_group`` creates it (``step`` a CPU
    scalar tensor, ``exp_avg``/``exp_avg_sq`` zeros like the parameter); hyperparameters
    from the group keys ``lr``, ``weight_decay``, ``adam_betas``, ``adam_eps``.
    """
    params: list[Tensor] = []
    grads: list[Tensor] = []
    exp_avgs: list[Tensor] = []
    exp_avg_sqs: list[Tensor] = []
    steps: list[Tensor] = []
    has_complex = False
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        has_complex |= torch.is_complex(p)
        s = state[p]
        if len(s) == 0:
            # torch's private _get_scalar_dtype(), inlined: the step counter is float64
            # only when the default dtype is.
            step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            s["step"] = torch.tensor(0.0, dtype=step_dtype)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(s["exp_avg"])
        exp_avg_sqs.append(s["exp_avg_sq"])
        steps.append(s["step"])
    if not params:
        return
    beta1, beta2 = group["adam_betas"]
    adamw_kernel(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        has_complex=has_complex,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["adam_eps"],
        maximize=False,
    )


def _matrix_view(t: Tensor) -> Tensor | None:
    """``t`` itself if 2-D, else a ``(t.shape[0], -1)`` view of it; None if no view exists."""
    if t.ndim == 2:
        return t
    try:
        return t.view(t.shape[0], -1)
    except RuntimeError:
        return None


@builder("muon")
def build_muon(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
    eps: float = EPS,
    ns_steps: int = DEFAULT_NS_STEPS,
    adjust_lr_fn: str | None = "match_rms_adamw",
    adam_betas: tuple[float, float] = (0.9, 0.95),
    adam_eps: float = 1e-8,
    adam_lr_ratio: float = 1.0,
) -> MuonWithAdamW:
    """:class:`MuonWithAdamW` on :func:`muon_param_groups` of ``model`` (the grouping rule,
    with the input layer moved to AdamW)."""
    name = "muon"
    return MuonWithAdamW(
        muon_param_groups(model, as_float(name, "weight_decay", weight_decay)),
        lr=as_float(name, "lr", lr),
        weight_decay=as_float(name, "weight_decay", weight_decay),
        momentum=as_float(name, "momentum", momentum, high=1.0, high_open=True),
        nesterov=as_bool(name, "nesterov", nesterov),
        ns_coefficients=as_float_tuple(name, "ns_coefficients", ns_coefficients, 3, low=None),
        eps=as_float(name, "eps", eps),
        ns_steps=_ns_steps(name, ns_steps),
        adjust_lr_fn=as_choice(name, "adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS),
        adam_betas=as_betas(name, "adam_betas", adam_betas),
        adam_eps=as_float(name, "adam_eps", adam_eps),
        adam_lr_ratio=as_float(name, "adam_lr_ratio", adam_lr_ratio, low_open=True),
    )


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """:func:`ddc.param_groups.param_groups` with ``muon=True``: the weight of the model's
    :func:`input_layer` moved from ``matrix`` (Muon) to ``embedding`` (AdamW), as Muon's
    authors prescribe (the rule lives in ``ddc.param_groups``, which DDC-Muon uses too).
    Weight decay is unchanged (the input weight is 2-D either way)."""
    return param_groups(model, weight_decay, muon=True)


def _ns_steps(name: str, value: Any) -> int:
    steps = as_int(name, "ns_steps", value, low=1)
    if steps >= 100:
        raise ValueError(f"optimizer {name!r}: option 'ns_steps' must be < 100, got {steps}")
    return steps
