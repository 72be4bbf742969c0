"""Text and expression classifier-free guidance (SPEC.md section 4, "Guidance").

Branches (each one model call on the same noisy window):

* ``P``: prompt, expression tokens, expression scale 1 (fully conditioned);
* ``E``: prompt, expression tokens, expression scale 0 (no expression term in the NFEB);
* ``U``: negative prompt, expression scale 0;
* ``N``: negative prompt, expression tokens, expression scale 1 (only for ``emo_cfg <= 1``, below).

Released rule with ``emo_cfg > 1`` (the released pipeline branches on it): ``v = U + text_cfg (E - U) +
emo_cfg (P - E)`` when ``text_cfg != 1`` and ``v = E + emo_cfg (P - E)`` otherwise. Both are the same
linear form

    v = (1 - text_cfg) U + (text_cfg - emo_cfg) E + emo_cfg P,

(at ``text_cfg = 1`` the ``U`` coefficient is 0), so a branch is needed exactly when its coefficient
is non-zero: released defaults (``text_cfg = 1``, ``emo_cfg = 4``) need ``E`` and ``P`` (two passes),
``text_cfg = emo_cfg != 1`` needs ``U`` and ``P``.

Released rule with ``emo_cfg <= 1`` (no expression-free branch; ``emo_cfg`` itself is not used): with
``text_cfg != 1``, ``v = N + text_cfg (P - N)``; else ``v = P`` (one pass).

The needed branches run as **one batch** (the transformer takes a per-sample ``expression_scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BRANCHES", "GuidancePlan", "plan_guidance", "batch_branch_inputs", "combine_branches"]

#: branch names in batch order
BRANCHES = ("U", "N", "E", "P")
#: branches whose text is the negative prompt
NEGATIVE_BRANCHES = ("U", "N")


@dataclass(frozen=True)
class GuidancePlan:
    """Which branches to evaluate and how to combine them.

    Attributes:
        branches: names of the needed branches, in batch order (a subsequence of ``("U", "E", "P")``).
        coefficients: weight of each needed branch in ``v = sum_b c_b * out_b`` (sums to 1).
        text_cfg_scale, emo_cfg_scale: the scales the plan was made for.
    """

    branches: tuple[str, ...]
    coefficients: tuple[float, ...]
    text_cfg_scale: float
    emo_cfg_scale: float

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def expression_scales(self) -> tuple[float, ...]:
        """Per-branch NFEB scale (1 for ``P`` and ``N``, 0 for ``E`` and ``U``)."""
        return tuple(1.0 if b in ("P", "N") else 0.0 for b in self.branches)

    @property
    def needs_negative_prompt(self) -> bool:
        """True when a branch runs on the negative prompt (``text_cfg != 1``)."""
        return any(b in NEGATIVE_BRANCHES for b in self.branches)


def plan_guidance(text_cfg_scale: float, emo_cfg_scale: float) -> GuidancePlan:
    """Decide which of ``U``, ``N``, ``E``, ``P`` are needed for the given scales (see the module docstring).

    Args:
        text_cfg_scale: text guidance scale (released default 1: off). Finite, ``>= 0``.
        emo_cfg_scale: expression guidance scale (released default 4). Finite, ``>= 0``.

    Returns:
        The plan; at least one branch is always needed (the coefficients sum to 1).

    Raises:
        ValueError: a scale is not a finite number ``>= 0`` (a negative scale pushes away from the condition).
    """
    for name, value in (("text_cfg_scale", text_cfg_scale), ("emo_cfg_scale", emo_cfg_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    text, emo = float(text_cfg_scale), float(emo_cfg_scale)
    if emo > 1.0:
        coeff = {"U": 1.0 - text, "E": text - emo, "P": emo}
    else:  # released rule without the expression-free branch
        coeff = {"N": 1.0 - text, "P": text}
    needed = tuple(b for b in BRANCHES if coeff.get(b, 0.0) != 0.0)
    return GuidancePlan(needed, tuple(coeff[b] for b in needed), text, emo)


def batch_branch_inputs(
    plan: GuidancePlan,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    expression_tokens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Stack the per-branch text and expression inputs into one batch (branch-major).

    Args:
        plan: from :func:`plan_guidance`.
        prompt_embeds: ``[B, Lt, D]`` umT5 embeddings of the prompt.
        negative_prompt_embeds: ``[B, Lt, D]`` of the negative prompt; required iff ``plan.needs_negative_prompt``.
        expression_tokens: ``[B, F, 97, 2048]`` window tokens (same for every branch; the ``U`` and ``E``
            branches switch the expression term off through a 0 scale), or ``None``.

    Returns:
        ``(text [nB, Lt, D], tokens [nB, F, 97, 2048] | None, expression_scale [nB] float32)`` with
        ``n = plan.num_branches``; sample ``i * B + b`` is branch ``plan.branches[i]`` of sample ``b``.

    Raises:
        ValueError: the negative prompt is needed but missing, or shapes disagree.
    """
    batch = prompt_embeds.shape[0]
    texts = []
    for b in plan.branches:
        if b in NEGATIVE_BRANCHES:
            if negative_prompt_embeds is None:
                raise ValueError(
                    f"negative_prompt_embeds are needed for text_cfg_scale={plan.text_cfg_scale} (!= 1), got None"
                )
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of "
                    f"prompt_embeds {tuple(prompt_embeds.shape)} (both padded to the same length)"
                )
            texts.append(negative_prompt_embeds)
        else:
            texts.append(prompt_embeds)
    text = torch.cat(texts, dim=0)
    tokens = None
    if expression_tokens is not None:
        if expression_tokens.shape[0] != batch:
            raise ValueError(f"expression_tokens batch {expression_tokens.shape[0]} != prompt_embeds batch {batch}")
        tokens = expression_tokens.repeat(plan.num_branches, *([1] * (expression_tokens.ndim - 1)))
    scale = torch.tensor(plan.expression_scales, dtype=torch.float32, device=prompt_embeds.device)
    scale = scale.repeat_interleave(batch)
    return text, tokens, scale


def combine_branches(plan: GuidancePlan, outputs: torch.Tensor) -> torch.Tensor:
    """Guided velocity ``sum_b c_b * out_b`` from the batched model output (SPEC.md section 4).

    Equals ``U + text_cfg (E - U) + emo_cfg (P - E)`` (or ``E + emo_cfg (P - E)`` at ``text_cfg = 1``).

    Args:
        plan: the plan the batch was built with.
        outputs: ``[nB, ...]`` model outputs in :func:`batch_branch_inputs` order.

    Returns:
        ``[B, ...]`` float32.
    """
    if outputs.shape[0] % plan.num_branches != 0:
        raise ValueError(f"outputs batch {outputs.shape[0]} is not a multiple of {plan.num_branches} branches")
    chunks = outputs.float().chunk(plan.num_branches, dim=0)
    result = chunks[0] * plan.coefficients[0] if plan.coefficients[0] != 1.0 else chunks[0].clone()
    for c, out in zip(plan.coefficients[1:], chunks[1:]):
        result = result + c * out
    return result
