"""Fuse the old adapter's update with the base model's evolution into a rank-r LoRA.

Per adapted matrix:  dW0 = alpha * dW_task + beta * P(dW_evo),  dW_task = scale * B1 @ A1,
dW_evo = W_target - W_source, returned to rank r as B0 @ A0 (balanced square-root split of the
singular values, divided by the new LoRA scale).

P is either the projection onto the old adapter's column and row spaces,
``U_B U_B^T dW_evo V_A V_A^T`` (then dW0 lives in an r x r core and each trial costs one tiny
SVD), or the identity (the fused full matrix is truncated by a randomized SVD each trial).

A module the adapter trains whole (``modules_to_save``) fuses the same way in full, untruncated:
W_target + alpha * (W_saved - W_source) + beta * (W_target - W_source), so (1, 0), the anchor,
patches the old module's task delta onto the new base.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from relora_trainer.adapters import LoraFactors

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class ModuleTerms:
    """What a trial needs for one module, precomputed once."""

    basis_out: torch.Tensor | None  # (out, r) orthonormal: column space of B1
    basis_in: torch.Tensor | None  # (in, r) orthonormal: row space of A1
    task: torch.Tensor  # core (r, r) or full (out, in) update of the old adapter
    evolution: torch.Tensor | None  # same shape, the (projected) base evolution; None: unused
    # DoRA: the old magnitude over ||W_source + old update|| per output feature (the rescaled
    # magnitude of a start is this times its own norm on the target base); None: not DoRA
    ratio: torch.Tensor | None = None


@dataclass
class SavedTerms:
    """A parameter of a module the old adapter trained whole, in full."""

    target: torch.Tensor  # its value in the target base
    task: torch.Tensor  # W_saved - W_source: what the task training changed
    evolution: torch.Tensor  # W_target - W_source


@dataclass
class Terms:
    """Everything a trial fuses: the adapted modules, and the saved parameters by name."""

    modules: dict[str, ModuleTerms]
    saved: dict[str, SavedTerms] = field(default_factory=dict)

    def groups(self, granularity: str) -> list[str]:
        """The coefficient groups that cover every module and saved parameter."""
        owners = [name.rsplit(".", 1)[0] for name in self.saved]
        return sorted({group_of(m, granularity) for m in [*self.modules, *owners]})


@dataclass
class Start:
    """A fused starting adapter: LoRA factors by module, saved parameters by name."""

    factors: dict[str, LoraFactors]
    saved: dict[str, torch.Tensor]


def group_of(module: str, granularity: str) -> str:
    """The coefficient group of a module: 'all', its type ('q_proj') or its layer ('layer3')."""
    if granularity == "global":
        return "all"
    if granularity == "module-type":
        return module.rsplit(".", 1)[-1]
    match = _LAYER_INDEX.search(f".{module}.")
    return f"layer{match.group(1)}" if match else "other"


def prepare(
    factors: LoraFactors,
    evolution: torch.Tensor | None,
    *,
    scale: float,
    projection: str,
    device: torch.device | None = None,
) -> ModuleTerms:
    """Precompute a module's fusion terms in float32, on ``evolution``'s device (or ``device``).
    Without an evolution (strategies that keep beta at 0) only the old update's terms."""
    where = evolution.device if evolution is not None else device
    a = factors.a.to(where, torch.float32)
    b = factors.b.to(where, torch.float32)
    evolution = evolution.float() if evolution is not None else None
    if projection == "none":
        return ModuleTerms(None, None, scale * (b @ a), evolution)
    basis_out = torch.linalg.qr(b).Q  # (out, r)
    basis_in = torch.linalg.qr(a.T).Q  # (in, r)
    task = scale * (basis_out.T @ b) @ (a @ basis_in)
    evo = basis_out.T @ evolution @ basis_in if evolution is not None else None
    return ModuleTerms(basis_out, basis_in, task, evo)


def fuse(
    terms: ModuleTerms,
    *,
    alpha: float,
    beta: float,
    rank: int,
    scale: float,
    generator_seed: int = 0,
) -> LoraFactors:
    """The rank-``rank`` factors (A0, B0) with ``scale * B0 @ A0`` closest to the fused update."""
    if terms.evolution is None:
        if beta != 0:
            raise ValueError("beta needs the base evolution: prepare the terms with it")
        fused = alpha * terms.task  # bit for bit alpha * task + 0 * evolution
    else:
        fused = alpha * terms.task + beta * terms.evolution
    if terms.basis_out is not None and terms.basis_in is not None:
        u, s, vh = torch.linalg.svd(fused)
        u, vh = terms.basis_out @ u, vh @ terms.basis_in.T
    else:
        q = min(rank + 8, *fused.shape)
        with torch.random.fork_rng(devices=[fused.device] if fused.is_cuda else []):
            torch.manual_seed(generator_seed)
            u, s, v = torch.svd_lowrank(fused, q=q, niter=4)
        vh = v.T
    keep = min(rank, s.shape[0])
    root = torch.sqrt(s[:keep].clamp(min=0) / scale)
    b0 = u[:, :keep] * root
    a0 = root[:, None] * vh[:keep]
    if keep < rank:  # a wider output than the old adapter
        b0 = torch.cat([b0, b0.new_zeros(b0.shape[0], rank - keep)], dim=1)
        a0 = torch.cat([a0, a0.new_zeros(rank - keep, a0.shape[1])], dim=0)
    # Directions with no update would be a saddle (A and B both zero get no gradient): start them
    # like PEFT does, A random and B zero, so that B0 @ A0 is unchanged and all of it can train.
    dead = torch.ones(rank, dtype=torch.bool, device=a0.device)
    dead[:keep] = root <= 1e-8 * max(float(root.max()) if keep else 0.0, 1e-30)
    if bool(dead.any()):
        generator = torch.Generator().manual_seed(generator_seed)
        noise = torch.randn(int(dead.sum()), a0.shape[1], generator=generator) / a0.shape[1] ** 0.5
        a0[dead] = noise.to(a0)
        b0[:, dead] = 0
    return LoraFactors(a=a0.contiguous(), b=b0.contiguous())


def fuse_all(
    terms: Terms,
    coefficients: Mapping[str, tuple[float, float]],
    *,
    granularity: str,
    layout: Mapping[str, tuple[int, float]],
) -> Start:
    """Fuse every module with its group's (alpha, beta), at the module's (rank, scale) in the
    new adapter's ``layout``; and every saved parameter in full."""
    fused = {}
    for index, (module, module_terms) in enumerate(sorted(terms.modules.items())):
        alpha, beta = coefficients[group_of(module, granularity)]
        rank, scale = layout[module]
        fused[module] = fuse(
            module_terms, alpha=alpha, beta=beta, rank=rank, scale=scale, generator_seed=index
        )
    saved = {}
    for name, parameter in sorted(terms.saved.items()):
        alpha, beta = coefficients[group_of(name.rsplit(".", 1)[0], granularity)]
        saved[name] = parameter.target + alpha * parameter.task + beta * parameter.evolution
    return Start(factors=fused, saved=saved)
