"""Text / expression guidance with the released rules (SPEC.md section 4, "Guidance")."""

from __future__ import annotations

import pytest
import torch

from flashportrait.guidance import batch_branch_inputs, combine_branches, plan_guidance


def _released(U, N, E, P, text, emo):
    """The released pipeline's formulas, written as it branches (SPEC.md section 4)."""
    if emo > 1:
        if text != 1:
            return U + text * (E - U) + emo * (P - E)
        return E + emo * (P - E)
    if text != 1:  # no expression-free branch: N = negative prompt with the expression term
        return N + text * (P - N)
    return P


@pytest.mark.parametrize(
    "text, emo, branches",
    [
        (1.0, 4.0, ("E", "P")),
        (5.0, 4.0, ("U", "E", "P")),
        (3.0, 3.0, ("U", "P")),
        (1.0, 1.0, ("P",)),  # emo <= 1: the released rule ignores emo_cfg
        (1.0, 0.0, ("P",)),
        (5.0, 1.0, ("N", "P")),
        (2.0, 0.5, ("N", "P")),
    ],
)
def test_plan_and_combination(text, emo, branches):
    g = torch.Generator().manual_seed(1)
    U, N, E, P = (torch.randn(2, 3, 4, generator=g) for _ in range(4))
    plan = plan_guidance(text, emo)
    assert plan.branches == branches
    assert sum(plan.coefficients) == pytest.approx(1.0)
    by_name = {"U": U, "N": N, "E": E, "P": P}
    outputs = torch.cat([by_name[b] for b in plan.branches])
    torch.testing.assert_close(combine_branches(plan, outputs), _released(U, N, E, P, text, emo))


def test_negative_branch_with_expression_for_small_emo_scale():
    plan = plan_guidance(2.0, 1.0)
    pos, neg = torch.ones(1, 5, 8), -torch.ones(1, 5, 8)
    text, tok, scale = batch_branch_inputs(plan, pos, neg, torch.zeros(1, 3, 97, 16))
    assert plan.needs_negative_prompt and text[0].eq(-1).all() and text[1].eq(1).all()  # N, P
    assert scale.tolist() == [1.0, 1.0]  # N keeps the expression term, as the released U'
    assert not plan_guidance(1.0, 4.0).needs_negative_prompt


def test_batch_inputs_layout():
    plan = plan_guidance(2.0, 4.0)
    pos, neg = torch.ones(2, 5, 8), -torch.ones(2, 5, 8)
    tokens = torch.randn(2, 3, 97, 16)
    text, tok, scale = batch_branch_inputs(plan, pos, neg, tokens)
    assert text.shape == (6, 5, 8) and tok.shape == (6, 3, 97, 16)
    assert text[:2].eq(-1).all() and text[2:].eq(1).all()  # U, E, P
    assert scale.tolist() == [0, 0, 0, 0, 1, 1]
    torch.testing.assert_close(tok[4:], tokens)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        batch_branch_inputs(plan, pos, None, tokens)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "4", None, -1.0])
def test_plan_rejects_bad_scales(bad):
    with pytest.raises(ValueError, match="emo_cfg_scale"):
        plan_guidance(1.0, bad)
