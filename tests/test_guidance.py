"""Three-branch text / expression guidance (SPEC.md section 4, "Guidance")."""

from __future__ import annotations

import pytest
import torch

from flashportrait.guidance import batch_branch_inputs, combine_branches, plan_guidance


def _released(U, E, P, text, emo):
    if text != 1:
        return U + text * (E - U) + emo * (P - E)
    return E + emo * (P - E)


@pytest.mark.parametrize(
    "text, emo, branches",
    [
        (1.0, 1.0, ("P",)),
        (1.0, 4.0, ("E", "P")),
        (1.0, 0.0, ("E",)),
        (5.0, 4.0, ("U", "E", "P")),
        (5.0, 1.0, ("U", "E", "P")),
        (3.0, 3.0, ("U", "P")),
    ],
)
def test_plan_and_combination(text, emo, branches):
    g = torch.Generator().manual_seed(1)
    U, E, P = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    plan = plan_guidance(text, emo)
    assert plan.branches == branches
    assert sum(plan.coefficients) == pytest.approx(1.0)
    by_name = {"U": U, "E": E, "P": P}
    outputs = torch.cat([by_name[b] for b in plan.branches])
    torch.testing.assert_close(combine_branches(plan, outputs), _released(U, E, P, text, emo))


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
