"""Similarity diagnostics (do experts and slots diverge?) and Soft MoE's scale_init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moebench.moe import (
    DenseMLP, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, collect_diagnostics, collect_metrics, track_routing,
)
from moebench.moe.metrics import mean_pairwise_cosine


def brute_force_similarity(vectors: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of the (N, N) cosine-similarity matrix."""
    unit = F.normalize(vectors.double(), dim=-1)
    sim = unit @ unit.T
    n = len(vectors)
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


def test_mean_pairwise_cosine_matches_the_similarity_matrix():
    torch.manual_seed(0)
    vectors = torch.randn(7, 5) + torch.tensor([2.0, 0, 0, 0, 0])  # correlated: mean well above 0
    assert mean_pairwise_cosine(vectors).item() == pytest.approx(brute_force_similarity(vectors), abs=1e-6)
    batch = torch.randn(3, 4, 6)
    expected = sum(brute_force_similarity(b) for b in batch) / 3
    assert mean_pairwise_cosine(batch).item() == pytest.approx(expected, abs=1e-6)
    assert mean_pairwise_cosine(torch.ones(5, 3)).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(-1.0)
    assert math.isnan(mean_pairwise_cosine(torch.randn(1, 3)).item())


def test_expert_similarity_is_one_for_identical_experts_and_matches_brute_force():
    torch.manual_seed(0)
    same = SoftMoE(8, 16, 6, identical_init=True).experts
    assert same.weight_similarity().item() == pytest.approx(1.0, abs=1e-6)
    independent = SoftMoE(8, 16, 6, identical_init=False).experts
    flat = torch.cat([independent.w1.reshape(6, -1), independent.w2.reshape(6, -1)], dim=1)
    value = independent.weight_similarity().item()
    assert value == pytest.approx(brute_force_similarity(flat.detach()), abs=1e-6)
    assert abs(value) < 0.1  # independent draws are nearly orthogonal


def test_soft_moe_scale_init_sets_the_logit_scale():
    torch.manual_seed(0)
    default = SoftMoE(8, 16, 4)
    assert default.scale.item() == 1.0  # the paper's init
    torch.manual_seed(0)
    sharp = SoftMoE(8, 16, 4, scale_init=8.0)
    assert sharp.scale.item() == 8.0 and sharp.scale.requires_grad
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(sharp.logits(x), 8.0 * default.logits(x))
    assert sharp.state_dict().keys() == default.state_dict().keys()


def test_soft_moe_dispatch_normalized_mixes_rms_normalised_tokens_as_the_port_does():
    torch.manual_seed(0)
    paper = SoftMoE(8, 16, 4)
    port = SoftMoE(8, 16, 4, dispatch_normalized=True)
    port.load_state_dict(paper.state_dict())  # the same weights: only the dispatched content differs
    x = torch.randn(2, 5, 8) * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5]).view(1, 5, 1)
    rms = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # unit L2 norm times sqrt(d)
    # The logits ignore token norms (normalize=True), so the port's layer is the paper's on RMS-normalised tokens.
    torch.testing.assert_close(port(x), paper(rms), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(port(3.0 * x), port(x), rtol=1e-4, atol=1e-5)  # token magnitudes are lost
    assert not torch.allclose(paper(3.0 * x), paper(x), rtol=1e-2)  # the paper's raw dispatch keeps them
    assert SoftMoE(8, 16, 4, dispatch_normalized=None).dispatch_normalized is False  # a config's null: off


def test_soft_moe_slot_similarity_from_the_forward():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    uniform = track_routing(SoftMoE(8, 16, 4, dispatch="uniform").train())
    uniform(x)
    assert uniform.metrics["slot_similarity"].item() == pytest.approx(1.0, abs=1e-6)  # every slot the mean token
    identity = track_routing(SoftMoE(8, 16, 4, dispatch="identity", combine="identity").train())
    identity(x)  # slot i = token i: the similarity of one image's tokens, averaged over images
    expected = sum(brute_force_similarity(image) for image in x) / 3
    assert identity.metrics["slot_similarity"].item() == pytest.approx(expected, abs=1e-6)
    soft = track_routing(SoftMoE(8, 16, 4).train())
    soft(x)
    slots = soft.logits(x).softmax(1).transpose(1, 2) @ x
    expected = sum(brute_force_similarity(image) for image in slots) / 3
    assert collect_metrics(soft)["slot_similarity"] == pytest.approx(expected, abs=1e-5)


def test_collect_diagnostics_names_every_moe_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        DenseMLP(8, 16), SoftMoE(8, 16, 4, scale_init=2.0), TokensChoiceMoE(8, 16, 4), ExpertsChoiceMoE(8, 16, 4),
    )
    diagnostics = collect_diagnostics(model)
    assert set(diagnostics) == {
        "1/expert_similarity", "1/phi_similarity", "1/scale",
        "2/expert_similarity", "2/gate_similarity", "3/expert_similarity", "3/gate_similarity",
    }
    assert diagnostics["1/scale"] == 2.0
    assert diagnostics["1/expert_similarity"] == pytest.approx(1.0, abs=1e-6)  # Soft MoE: one draw for all
    phi = model[1].phi.detach().reshape(8, -1).T
    assert diagnostics["1/phi_similarity"] == pytest.approx(brute_force_similarity(phi), abs=1e-6)
    assert diagnostics["2/gate_similarity"] == pytest.approx(brute_force_similarity(model[2].gate.weight.detach()),
                                                              abs=1e-6)
    assert all("similarity" in key or key.endswith("/scale") for key in diagnostics)
