"""Fusion math: the old update is reproduced, ranks are respected, no dead directions."""

from __future__ import annotations

import pytest
import torch

from relora_trainer.adapters import LoraFactors
from relora_trainer.method import fusion


def _old(out: int = 24, inp: int = 16, rank: int = 4, seed: int = 0) -> LoraFactors:
    generator = torch.Generator().manual_seed(seed)
    return LoraFactors(
        a=torch.randn(rank, inp, generator=generator), b=torch.randn(out, rank, generator=generator)
    )


def _evolution(out: int = 24, inp: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _delta(f: LoraFactors, scale: float) -> torch.Tensor:
    return scale * f.b @ f.a


@pytest.mark.parametrize("projection", ["adapter-subspace", "none"])
def test_alpha_one_beta_zero_reproduces_the_old_update(projection: str) -> None:
    old, scale = _old(), 2.0
    terms = fusion.prepare(old, _evolution(), scale=scale, projection=projection)
    fused = fusion.fuse(terms, alpha=1.0, beta=0.0, rank=4, scale=scale)
    assert torch.allclose(_delta(fused, scale), _delta(old, scale), atol=1e-4)


def test_a_new_scale_is_compensated() -> None:
    old = _old()
    terms = fusion.prepare(old, _evolution(), scale=2.0, projection="adapter-subspace")
    fused = fusion.fuse(terms, alpha=1.0, beta=0.0, rank=4, scale=0.5)
    assert torch.allclose(_delta(fused, 0.5), _delta(old, 2.0), atol=1e-4)


def test_projected_evolution_lives_in_the_adapter_subspace() -> None:
    old, evolution = _old(), _evolution()
    terms = fusion.prepare(old, evolution, scale=1.0, projection="adapter-subspace")
    fused = fusion.fuse(terms, alpha=0.0, beta=1.0, rank=4, scale=1.0)
    q_out = torch.linalg.qr(old.b).Q
    q_in = torch.linalg.qr(old.a.T).Q
    expected = q_out @ q_out.T @ evolution @ q_in @ q_in.T
    assert torch.allclose(_delta(fused, 1.0), expected, atol=1e-4)


def test_unprojected_fusion_is_the_best_rank_r_approximation() -> None:
    old, evolution = _old(), _evolution()
    terms = fusion.prepare(old, evolution, scale=1.0, projection="none")
    fused = fusion.fuse(terms, alpha=0.5, beta=0.7, rank=3, scale=1.0)
    target = 0.5 * _delta(old, 1.0) + 0.7 * evolution
    u, s, vh = torch.linalg.svd(target)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    assert fused.a.shape == (3, 16) and fused.b.shape == (24, 3)
    assert torch.allclose(_delta(fused, 1.0), best, atol=1e-3)


@pytest.mark.parametrize("rank", [2, 4, 7])
def test_rank_is_respected(rank: int) -> None:
    old = _old()
    terms = fusion.prepare(old, _evolution(), scale=1.0, projection="adapter-subspace")
    fused = fusion.fuse(terms, alpha=0.8, beta=-0.3, rank=rank, scale=1.0)
    assert fused.a.shape == (rank, 16) and fused.b.shape == (24, rank)
    assert int(torch.linalg.matrix_rank(_delta(fused, 1.0))) <= min(rank, 4)


def test_a_wider_rank_keeps_the_update_and_can_train() -> None:
    old = _old()
    terms = fusion.prepare(old, _evolution(), scale=1.0, projection="adapter-subspace")
    fused = fusion.fuse(terms, alpha=1.0, beta=0.0, rank=6, scale=1.0)
    assert torch.allclose(_delta(fused, 1.0), _delta(old, 1.0), atol=1e-4)
    assert torch.all(fused.b[:, 4:] == 0) and torch.all(fused.a[4:].abs().sum(dim=1) > 0)


def test_zero_coefficients_give_a_zero_update_that_is_not_a_saddle() -> None:
    terms = fusion.prepare(_old(), _evolution(), scale=1.0, projection="adapter-subspace")
    fused = fusion.fuse(terms, alpha=0.0, beta=0.0, rank=4, scale=1.0)
    assert torch.count_nonzero(_delta(fused, 1.0)) == 0
    assert torch.all(fused.a.abs().sum(dim=1) > 0), "A must not be zero where B is"


def test_groups() -> None:
    name = "model.layers.3.self_attn.q_proj"
    assert fusion.group_of(name, "global") == "all"
    assert fusion.group_of(name, "module-type") == "q_proj"
    assert fusion.group_of(name, "layer") == "layer3"
    assert fusion.group_of("lm_head", "layer") == "other"


def test_fuse_all_uses_each_groups_coefficients() -> None:
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    terms = fusion.Terms(
        modules={
            n: fusion.prepare(_old(seed=i), _evolution(), scale=1.0, projection="adapter-subspace")
            for i, n in enumerate(names)
        }
    )
    fused = fusion.fuse_all(
        terms,
        {"layer0": (1.0, 0.0), "layer1": (0.0, 0.0)},
        granularity="layer",
        layout={n: (4, 1.0) for n in names},
    ).factors
    assert torch.allclose(_delta(fused[names[0]], 1.0), _delta(_old(seed=0), 1.0), atol=1e-4)
    assert torch.count_nonzero(_delta(fused[names[1]], 1.0)) == 0
