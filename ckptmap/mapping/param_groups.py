"""The optimizer param groups a target rank's Megatron builds, in its order, as indices into a saved
rank's groups — shared by resharding (``reshard.py``) and torch_dist -> legacy (``torch_dist_legacy.py``).

A legacy ``model_optim_rng.pt`` keeps the groups' settings (``optimizer.param_groups`` without their
``params``), one dict per group. Which group a parameter belongs to is not saved; Megatron derives it
from the parameter (``_get_param_groups``): no weight decay for the rules' ``no_weight_decay`` names
and shapes, a decoupled learning rate for the embedding / output layer (the rules' ``shared_embedding``
parameters) when the run has one. How a version orders the groups and whether its load applies them
by position is the rules' ``param_groups megatron for …`` block (versions differ: 0.6 - 0.13 order by
first use on the rank and load by position, so a group list copied from another stage swaps the
weight decay of whole groups on load).
"""

from __future__ import annotations

import attrs

from ckptmap.errors import CkptmapError


@attrs.frozen
class GroupParam:
    """A parameter of one optimizer of the target rank, in the rank's named_parameters order."""

    name: str
    shape: tuple
    embedding_or_output: bool = False


def _override(group: dict) -> tuple:
    """0.16's sort key of a group: its settings that differ from the default (ParamGroupOverride as a
    sorted tuple), None (no override) first."""
    items = []
    if group.get("is_decoupled_lr"):
        items += [("max_lr", group.get("max_lr")), ("min_lr", group.get("min_lr"))]
    if group.get("wd_mult", 1.0) != 1.0:
        items.append(("wd_mult", group.get("wd_mult")))
    return (bool(items), tuple(sorted(items, key=lambda kv: kv[0])))


def _first_use(policy, saved: list, params: list, where: str) -> tuple[list | None, str | None]:
    decoupled = any(g.get("is_decoupled_lr") for g in saved)
    order = []
    for p in params:
        wd = 0.0 if policy.no_weight_decay(p.name, p.shape) else 1.0
        dec = decoupled and p.embedding_or_output
        hits = [i for i, g in enumerate(saved)
                if g.get("wd_mult", 1.0) == wd and bool(g.get("is_decoupled_lr", False)) == dec]
        if len(hits) > 1:
            return None, (f"{where}: {len(hits)} saved optimizer param groups fit {p.name} (wd_mult {wd}; they differ "
                          f"in lr_mult, which ckptmap cannot derive): kept in the saved order")
        if not hits:
            raise CkptmapError(
                f"{where}: no saved optimizer param group fits {p.name} (wd_mult {wd}"
                f"{', decoupled lr' if dec else ''}); the saved groups are "
                f"{[{k: g.get(k) for k in ('wd_mult', 'lr_mult', 'is_decoupled_lr')} for g in saved]}. A rank of the "
                f"target holds parameters of a kind the source rank it takes its optimizer settings from does not; "
                f"reshard to a layout whose ranks keep such parameters together, or with --convert-param-only")
        if hits[0] not in order:
            order.append(hits[0])
    return order, None


def group_order(policies: list, saved: list | None, params: list[GroupParam], where: str
                ) -> tuple[list[int] | None, str | None]:
    """(indices into ``saved`` in the order the target rank's optimizer builds its groups, or None to
    keep ``saved`` as it is; a note when the order cannot be derived). ``policies``: the
    ``param_groups`` blocks of every version that may load the target. A version that loads by
    position needs its exact order; versions that match groups by key load any order, so the order
    of one that loads by position (if any may load it) serves them all."""
    if not saved or not policies:
        return None, None
    by_index = [p for p in policies if p.load == "by_index"]
    policy = by_index[0] if by_index else policies[0] if len(policies) == 1 else None
    if policy is None:    # only key-matching loaders, which disagree on the order: any order loads right
        return None, None
    if policy.order == "sorted":
        return sorted(range(len(saved)), key=lambda i: _override(saved[i])), None
    order, note = _first_use(policy, saved, params, where)
    if order is None:
        return None, note
    if policy.order == "first_use_then_gathered":   # groups only other ranks need come after, as gathered
        order += [i for i in range(len(saved)) if i not in order]
    return order, None
