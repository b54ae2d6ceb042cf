"""Parse `.rules` files (grammar.lark) into a small attrs AST, with `file:line:col` errors.

A rules file is the only place that knows parameter names. The AST is plain data: patterns can
match a tensor name (binding placeholders) and format a name from bindings; everything about
ranks and layer numbering is left to the compiler and `layout.py`.
"""

from __future__ import annotations

import math
import operator
from importlib import resources
from pathlib import Path

import attrs

from ckptmap.errors import CkptmapError

LAYER = "layer"
EXPERT = "expert"
PART = "part"   # in a MindSpore pattern: the name of one of the rule's `parts`
STACKABLE = (EXPERT,)        # what `stack:` may stack (a placeholder of the Megatron pattern)
STACK_COUNT = "num_experts"  # the config value the number of stacked experts comes from (/ ep)
KNOWN_OPS = {"transpose": 2, "reshape": None, "cast": 1, "chunk_interleave": 2}
KNOWN_BUCKET_ORDERS = ("reverse_registration", "registration")
KNOWN_SHARED_EMBEDDING = ("own_bucket", "in_order")
# Where a shared embedding that opens its own bucket starts: at that bucket's start (the previous
# bucket's padded end), or where the previous parameters end (Megatron 0.6 - 0.12, consistent only
# when that is a multiple of the bucket padding already)
KNOWN_SHARED_START = ("bucket_start", "previous_end")
KNOWN_BUCKET_STORAGE = ("per_bucket", "coalesced")
# Which pipeline stages may hold a number of layers of their own: none (num_layers / PP each), or the
# first and the last (the rest split evenly)
KNOWN_UNEVEN_STAGES = ("none", "first_last")


@attrs.frozen
class Loc:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@attrs.frozen
class Segment:
    """One dot-separated piece of a name pattern.

    kind: ``literal`` (text), ``layer``/``expert`` (integer index), ``choice`` (one of ``choices``,
    bound to ``name``), ``int`` (any integer, bound to ``name``), ``ref`` (a binding from the
    other side: placeholder ``{name}`` that is not layer/expert)."""

    kind: str
    text: str = ""
    name: str = ""
    choices: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.kind == "literal":
            return self.text
        if self.kind in (LAYER, EXPERT, "ref"):
            return "{" + (self.name or self.kind) + "}"
        if self.kind == "choice":
            return "{" + self.name + ": " + "|".join(self.choices) + "}"
        return "{" + self.name + ": int}"


@attrs.frozen
class Pattern:
    segments: tuple[Segment, ...]

    def __str__(self) -> str:
        return ".".join(str(s) for s in self.segments)

    def bound_names(self) -> set[str]:
        out = set()
        for s in self.segments:
            if s.kind in (LAYER, EXPERT):
                out.add(s.kind)
            elif s.kind in ("choice", "int"):
                out.add(s.name)
        return out

    def used_names(self) -> set[str]:
        out = set()
        for s in self.segments:
            if s.kind in (LAYER, EXPERT):
                out.add(s.kind)
            elif s.kind in ("choice", "int", "ref"):
                out.add(s.name)
        return out

    def match(self, name: str) -> dict[str, object] | None:
        """Bindings if ``name`` matches (integers for layer/expert/int, strings for choices)."""
        parts = name.split(".")
        if len(parts) != len(self.segments):
            return None
        bindings: dict[str, object] = {}
        for part, seg in zip(parts, self.segments):
            if seg.kind == "literal":
                if part != seg.text:
                    return None
            elif seg.kind in (LAYER, EXPERT, "int"):
                if not part.isdigit() or (len(part) > 1 and part[0] == "0"):
                    return None
                bindings[seg.name or seg.kind] = int(part)
            elif seg.kind == "choice":
                if part not in seg.choices:
                    return None
                bindings[seg.name] = part
            else:  # a reference is only meaningful when formatting
                return None
        return bindings

    def format(self, bindings: dict[str, object]) -> str:
        parts = []
        for seg in self.segments:
            if seg.kind == "literal":
                parts.append(seg.text)
            else:
                parts.append(str(bindings[seg.name or seg.kind]))
        return ".".join(parts)


@attrs.frozen
class Split:
    """How a tensor is cut across tensor-parallel ranks.

    ``halves``: each TP shard is itself ``halves`` stacked blocks along ``dim`` (SwiGLU
    ``[gate; up]``), only when the flag ``halves_when`` is set, if one is named; ``groups``: rows are grouped by the model-config value named here (QKV per
    query group) and a TP shard holds whole groups; ``vocab_padded``: the full size is the padded
    vocabulary."""

    dim: int | None = None  # None = replicated
    vocab_padded: bool = False
    halves: int | None = None
    groups: str | None = None
    halves_when: str | None = None   # halves only when this model-config flag is set (swiglu)

    @property
    def replicated(self) -> bool:
        return self.dim is None

    def __str__(self) -> str:
        if self.dim is None:
            return "replicated"
        args = [f"dim={self.dim}"]
        if self.vocab_padded:
            args.append("vocab_padded")
        if self.halves:
            args.append(f"halves={self.halves}" + (f" when {self.halves_when}" if self.halves_when else ""))
        if self.groups:
            args.append(f"groups={self.groups}")
        return "split(" + ", ".join(args) + ")"


@attrs.frozen
class OpSpec:
    name: str
    args: tuple[object, ...]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(str(a) for a in self.args)})"


@attrs.frozen
class Parts:
    """``parts(groups=G): a = E1, b = E2``: the TP-local tensor's dim 0 is G / tp blocks (one block
    when no groups are named), each block the parts' rows in order (E1 rows of ``a``, then E2 of
    ``b``); part ``a`` of every block, concatenated, is the MindSpore tensor with ``{part}`` = a."""

    entries: tuple[tuple[str, "Expr"], ...]
    groups: "Expr | None" = None
    loc: Loc | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.entries)

    def symbols(self) -> set[str]:
        out = set(self.groups.symbols()) if self.groups is not None else set()
        for _, e in self.entries:
            out |= e.symbols()
        return out

    def __str__(self) -> str:
        head = f"parts(groups={self.groups})" if self.groups is not None else "parts"
        return head + ": " + ", ".join(f"{n} = {e}" for n, e in self.entries)


@attrs.frozen
class ParamRule:
    megatron: Pattern
    mindspore: Pattern
    ddp: Pattern | None
    tp: Split
    ops: tuple[OpSpec, ...]
    optional: bool
    loc: Loc
    shared_embedding: bool = False
    parts: Parts | None = None
    # ``stack: expert``: the rank's local experts, in order, stacked on a new leading axis of one
    # MindSpore tensor (the MindSpore pattern leaves {expert} out)
    stack: str | None = None
    stack_loc: Loc | None = None

    def config_symbols(self) -> set[str]:
        """The model-config values the rule's ops and parts are resolved with (stored with the
        conversion, so that the way back resolves the same values)."""
        out = self.parts.symbols() if self.parts is not None else set()
        if self.stack is not None:
            out.add(STACK_COUNT)   # how many experts a stacked tensor holds: num_experts / ep
        for op in self.ops:
            out |= {a for a in op.args if isinstance(a, str)} if op.name == "reshape" else set()
        return out

    def ddp_pattern(self, prefix: str = "module.") -> Pattern:
        """The name in Megatron's DDP buffer / param_map: declared, or the DDP wrapper prefix
        in front of the state-dict name."""
        if self.ddp is not None:
            return self.ddp
        head = tuple(Segment("literal", text=t) for t in prefix.rstrip(".").split("."))
        return Pattern(head + self.megatron.segments)


@attrs.frozen
class StateRule:
    state: str
    pattern: Pattern
    loc: Loc


@attrs.frozen
class Expr:
    """A tiny arithmetic expression over named layout/args values (``dp * cp``)."""

    op: str  # const | symbol | mul | add | mod | div | lcm | max
    value: object = None
    left: "Expr | None" = None
    right: "Expr | None" = None
    args: tuple = ()  # lcm / max

    def evaluate(self, env: dict[str, int]) -> int:
        if self.op == "const":
            return int(self.value)
        if self.op == "symbol":
            if self.value not in env:
                raise CkptmapError(
                    f"rule expression uses {self.value!r}, which is not known here; known values: "
                    f"{', '.join(sorted(env))}")
            return int(env[self.value])
        if self.op in ("lcm", "max"):
            values = [a.evaluate(env) for a in self.args]
            return math.lcm(*values) if self.op == "lcm" else max(values)
        a, b = self.left.evaluate(env), self.right.evaluate(env)
        if self.op in ("mod", "div"):
            if b == 0:
                raise CkptmapError(f"rule expression {self}: division by zero")
            if self.op == "div" and a % b:
                # sizes are whole rows: an inexact quotient means the config is not what the rule assumes
                raise CkptmapError(f"rule expression {self}: {a} / {b} is not a whole number")
            return a % b if self.op == "mod" else a // b
        return a * b if self.op == "mul" else a + b

    def symbols(self) -> set[str]:
        if self.op == "symbol":
            return {self.value}
        if self.op == "const":
            return set()
        parts = list(self.args) + [e for e in (self.left, self.right) if e is not None]
        return set().union(*(p.symbols() for p in parts))

    def __str__(self) -> str:
        if self.op in ("const", "symbol"):
            return str(self.value)
        if self.op in ("lcm", "max"):
            return f"{self.op}({', '.join(map(str, self.args))})"
        return f"({self.left} {dict(mul='*', add='+', mod='%', div='/')[self.op]} {self.right})"


_COMPARE = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
            ">=": operator.ge, "<=": operator.le}


@attrs.frozen
class Condition:
    """``flag`` / ``not flag`` (truthiness of a value) or ``expr <op> expr``."""

    name: str | None = None
    negated: bool = False
    op: str | None = None
    value: Expr | None = None
    left: Expr | None = None

    def holds(self, env: dict) -> bool:
        if self.op is not None:
            return _COMPARE[self.op](self.left.evaluate(env), self.value.evaluate(env))
        if self.name not in env:
            raise CkptmapError(f"bucket rule condition uses {self.name!r}, which is not known here; known "
                               f"values: {', '.join(sorted(env))}")
        return bool(env[self.name]) != self.negated

    def symbols(self) -> set[str]:
        if self.op is not None:
            return self.left.symbols() | self.value.symbols()
        return {self.name}

    def __str__(self) -> str:
        if self.op is not None:
            return f"{self.left} {self.op} {self.value}"
        return ("not " if self.negated else "") + self.name


@attrs.frozen
class BucketPad:
    amount: Expr
    unit: str                              # "elements" | "bytes"
    when: tuple[Condition, ...] = ()       # all must hold; the first pad whose conditions hold applies


def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def version_in_range(version: str, versions: tuple[str, str] | None) -> bool:
    """Whether ``version`` ("0.12.1", "0.8") falls in ``versions`` (None: any), to the precision the range gives."""
    if versions is None:
        return True
    lo, hi = (version_key(v) for v in versions)
    v = version_key(version)
    return lo <= v[:len(lo)] and v[:len(hi)] <= hi


@attrs.frozen
class BucketLayout:
    """A ``buckets NAME [for A - B] { ... }`` block: how a framework version lays parameters out in
    the distributed optimizer's bucketed buffer and how its checkpoint stores the buckets.

    ``param_align``: every parameter is *followed* by padding to a multiple (MindSpeed);
    ``param_start_align``: every parameter *starts* at a multiple (Megatron >= 0.8), so a bucket's
    unpadded size ends at its last parameter; ``bucket_pads``: the first whose conditions hold pads
    each bucket's end; ``storage``: ``per_bucket`` (a padded tensor per bucket, Megatron 0.6) or
    ``coalesced`` (one tensor per buffer with every bucket's end padding cut away, Megatron >= 0.7)."""

    name: str
    order: str = "reverse_registration"
    param_align: tuple[Expr, str] | None = None  # (amount, "elements"|"bytes")
    param_start_align: tuple[Expr, str] | None = None
    bucket_pads: tuple[BucketPad, ...] = ()
    storage: str = "per_bucket"
    versions: tuple[str, str] | None = None
    expert_params: str = "with_dense"            # or "separate": own buffers and optimizer (MoE, EP > 1)
    expert_when: tuple[Condition, ...] = ()
    bucket_close: Expr | None = None
    close_when: tuple[Condition, ...] = ()  # all must hold for bucket_close to apply
    shared_embedding: str = "in_order"
    shared_when: tuple[Condition, ...] = ()  # when params marked shared_embedding are shared
    shared_start: str = "bucket_start"       # KNOWN_SHARED_START
    # before a shared embedding closes the open bucket, that bucket's content is padded to the bucket
    # padding when these hold (``start``: where the embedding would start); None = never
    shared_prepad: tuple[Condition, ...] | None = None
    defaults: tuple[tuple[str, Expr], ...] = ()  # values used when the checkpoint's args lack them
    uneven_stages: str = "none"                  # KNOWN_UNEVEN_STAGES
    loc: Loc | None = None

    def separate_experts(self, env: dict) -> bool:
        """Whether expert parameters live in buffers of their own (and a second, chained optimizer)."""
        return self.expert_params == "separate" and all(c.holds(env) for c in self.expert_when)

    def covers(self, version: str) -> bool:
        """Whether ``version`` ("0.12.1", "0.8") falls in the block's range (to the precision given)."""
        return version_in_range(version, self.versions)

    @property
    def label(self) -> str:
        return self.name + (f" for {self.versions[0]}" + (f" - {self.versions[1]}" if self.versions[1] !=
                                                          self.versions[0] else "") if self.versions else "")


KNOWN_GROUP_ORDERS = ("first_use", "first_use_then_gathered", "sorted")
KNOWN_GROUP_LOADS = ("by_index", "by_key")


@attrs.frozen
class ParamGroupPolicy:
    """A ``param_groups NAME [for A - B] { ... }`` block: how a framework version builds a rank's
    optimizer param groups and how its legacy load applies the saved ones.

    ``order``: ``first_use`` (the order the rank's parameters first need them), ``first_use_then_gathered``
    (that, then groups only other ranks have), ``sorted`` (the same on every rank, default settings first);
    ``load``: ``by_index`` (a saved group's settings go to the group at the same position) or ``by_key``
    (matched by wd_mult / lr_mult / is_expert_parallel / is_decoupled_lr); ``no_wd_suffixes`` /
    ``no_wd_ndims``: parameters without weight decay (name ending, TP-local dimensionality)."""

    name: str
    order: str = "first_use"
    load: str = "by_index"
    no_wd_suffixes: tuple[str, ...] = ()
    no_wd_ndims: tuple[int, ...] = ()
    versions: tuple[str, str] | None = None
    loc: Loc | None = None

    covers = BucketLayout.covers
    label = BucketLayout.label

    def overlaps(self, versions: tuple[str, str] | None) -> bool:
        """Whether some version of the range ``versions`` (None: any) is one of this block's."""
        if versions is None or self.versions is None:
            return True
        lo, hi = (version_key(v) for v in self.versions)
        a, b = (version_key(v) for v in versions)
        n = max(len(lo), len(hi), len(a), len(b))
        pad = (lambda v, fill: v + (fill,) * (n - len(v)))
        return pad(a, 0) <= pad(hi, 1 << 30) and pad(lo, 0) <= pad(b, 1 << 30)

    def no_weight_decay(self, name: str, shape) -> bool:
        return any(name.endswith(s) for s in self.no_wd_suffixes) or len(tuple(shape)) in self.no_wd_ndims


@attrs.frozen
class LayersSpec:
    count_arg: str
    noop_arg: str | None


@attrs.frozen
class RuleSet:
    name: str
    description: str
    path: str
    params: tuple[ParamRule, ...]
    states: tuple[StateRule, ...]
    buckets: tuple[BucketLayout, ...]
    layers: LayersSpec | None
    param_groups: tuple[ParamGroupPolicy, ...] = ()
    torch_dist: tuple = ()   # torch_dist_rules.TorchDistLayout blocks

    def torch_dist_layout(self, name: str = "megatron"):
        """The ``torch_dist name { … }`` block: how that framework's distributed checkpoints spell keys."""
        for t in self.torch_dist:
            if t.name == name:
                return t
        raise CkptmapError(f"rules {self.path} have no `torch_dist {name} {{...}}` block (the bundled "
                           f"megatron_layouts rules have one: add `include megatron_layouts`)")

    def state_pattern(self, state: str) -> Pattern:
        for s in self.states:
            if s.state == state:
                return s.pattern
        raise CkptmapError(f"rules {self.path} do not name optimizer state {state!r}; add it to the "
                           f"optimizer_state block")

    def bucket_layout(self, name: str, version: str | None = None) -> BucketLayout:
        """The ``buckets name`` block (for ``version`` when blocks are per version)."""
        blocks = self.bucket_layouts(name)
        if not blocks:
            raise CkptmapError(f"rules {self.path} have no `buckets {name} {{...}}` block")
        if version is not None:
            blocks = [b for b in blocks if b.covers(version)]
            if not blocks:
                known = ", ".join(b.label for b in self.bucket_layouts(name))
                raise CkptmapError(f"rules {self.path} have no `buckets {name}` block for version {version} (they "
                                   f"have: {known}); use a version they describe, or add a block for it")
        return blocks[0]

    def bucket_layouts(self, name: str) -> list[BucketLayout]:
        """Every ``buckets name`` block, in file order."""
        return [b for b in self.buckets if b.name == name]

    def param_group_policies(self, name: str, versions: tuple[str, str] | None = None) -> list[ParamGroupPolicy]:
        """The ``param_groups name`` blocks of any version in ``versions`` (None: all), in file order."""
        return [p for p in self.param_groups if p.name == name and p.overlaps(versions)]


# -------------------------------------------------------------------------------------------------
# Parsing

def parse_rules(text: str, path: str = "<rules>", _including: tuple = ()) -> RuleSet:
    from ckptmap.mapping import rules_cache

    items = rules_cache.load(text, path)
    if items is None:   # lark is imported only here: a cache hit skips it and the parse (~0.1 s)
        from ckptmap.mapping.rules_grammar import parse_items

        items = parse_items(text, path)
        rules_cache.store(text, path, items)
    return _assemble(items, path, _including + (str(Path(path).resolve()),))


def _included(name: str, loc: Loc, path: str, chain: tuple) -> RuleSet:
    here = Path(path).parent / f"{name}.rules"
    common = Path(str(resources.files("ckptmap.rules").joinpath("common", f"{name}.rules")))
    target = here if here.is_file() else common if common.is_file() else None
    if target is None:
        raise CkptmapError(f"{loc}: include {name}: no {here} and no bundled common/{name}.rules")
    if str(target.resolve()) in chain:
        raise CkptmapError(f"{loc}: include {name} includes itself ({' -> '.join(chain)})")
    try:
        text = target.read_text()
    except OSError as e:
        raise CkptmapError(f"{loc}: include {name}: cannot read {target}: {e.strerror}") from None
    return parse_rules(text, str(target), chain)


def _assemble(items, path: str, chain: tuple = ()) -> RuleSet:
    _, name, description = items[0]
    from ckptmap.mapping.torch_dist_rules import TorchDistLayout

    params, states, buckets, layers, groups, dist = [], [], [], None, [], []
    for item in items[1:]:
        if isinstance(item, tuple) and item[0] == "include":
            inc = _included(item[1], item[2], path, chain)
            params.extend(inc.params)
            buckets.extend(inc.buckets)
            groups.extend(inc.param_groups)
            dist.extend(inc.torch_dist)
            if inc.states:
                if states:
                    raise CkptmapError(f"{item[2]}: include {item[1]} names optimizer states, and so does {path}; keep one")
                states = list(inc.states)
            layers = layers or inc.layers
        elif isinstance(item, ParamRule):
            params.append(item)
        elif isinstance(item, tuple) and item[0] == "states":
            if states:
                raise CkptmapError(f"{item[1][0].loc}: a second optimizer_state block; keep one")
            states = list(item[1])
        elif isinstance(item, BucketLayout):
            buckets.append(item)
        elif isinstance(item, LayersSpec):
            layers = item
        elif isinstance(item, ParamGroupPolicy):
            groups.append(item)
        elif isinstance(item, TorchDistLayout):
            dist.append(item)
    rules = RuleSet(name, description, path, tuple(params), tuple(states), tuple(buckets), layers, tuple(groups),
                    tuple(dist))
    _validate(rules)
    return rules


def _validate(rules: RuleSet) -> None:
    from ckptmap.mapping import torch_dist_rules

    seen_dist: dict[str, object] = {}
    for t in rules.torch_dist:
        if t.name in seen_dist:
            raise CkptmapError(f"{t.loc}: a second `torch_dist {t.name}` block (the first: {seen_dist[t.name]}); keep one")
        seen_dist[t.name] = t.loc
        torch_dist_rules.validate(t)
    seen_left: dict[str, Loc] = {}
    for rule in rules.params:
        where = rule.loc
        left = str(rule.megatron)
        if left in seen_left:
            raise CkptmapError(f"{where}: the Megatron pattern {left} is already mapped at {seen_left[left]}")
        seen_left[left] = where
        for pattern, side in ((rule.megatron, "Megatron"), (rule.mindspore, "MindSpore")):
            kinds = [s.kind for s in pattern.segments]
            for special in (LAYER, EXPERT):
                if kinds.count(special) > 1:
                    raise CkptmapError(f"{where}: {{{special}}} appears twice in the {side} pattern {pattern}")
        if any(s.kind == "ref" for s in rule.megatron.segments):
            bad = [str(s) for s in rule.megatron.segments if s.kind == "ref"]
            raise CkptmapError(
                f"{where}: placeholder {bad[0]} in the Megatron pattern is not defined; write "
                f"{{name: a|b}} for a choice, {{name: int}} for a number, or {{layer}} / {{expert}}")
        bound = rule.megatron.bound_names()
        _validate_parts(rule)
        _validate_stack(rule)
        for pattern in (rule.mindspore,) + ((rule.ddp,) if rule.ddp else ()):
            for seg in pattern.segments:
                if seg.kind in ("choice", "int"):
                    raise CkptmapError(
                        f"{where}: {seg} may only be declared in the Megatron pattern; refer to it "
                        f"as {{{seg.name}}} on this side")
            missing = pattern.used_names() - bound - ({PART} if pattern is rule.mindspore and rule.parts else set())
            if PART in missing:
                raise CkptmapError(
                    f"{where}: {pattern} uses {{{PART}}}, the name of a part, but the rule has no parts: clause "
                    f"(parts: a = ROWS, b = ROWS); add one, or write the name out")
            if missing:
                raise CkptmapError(
                    f"{where}: {pattern} uses {{{sorted(missing)[0]}}}, which the Megatron pattern "
                    f"{rule.megatron} does not bind")
        lost = bound - rule.mindspore.used_names() - ({rule.stack} if rule.stack else set())
        if lost:
            raise CkptmapError(
                f"{where}: the MindSpore pattern {rule.mindspore} drops {{{sorted(lost)[0]}}}, so two "
                f"Megatron tensors would get the same name; use it on the MindSpore side too"
                + (f" (or add `stack: {EXPERT}` to stack the local experts into one tensor)" if EXPERT in lost else ""))
        for op in rule.ops:
            if op.name not in KNOWN_OPS:
                raise CkptmapError(f"{where}: unknown op {op.name}(); known ops: {', '.join(KNOWN_OPS)}")
            arity = KNOWN_OPS[op.name]
            if arity is not None and len(op.args) != arity:
                raise CkptmapError(f"{where}: {op.name}() takes {arity} arguments, got {len(op.args)}")
        if rule.tp.halves is not None and rule.tp.halves < 2:
            raise CkptmapError(f"{where}: halves={rule.tp.halves} must be at least 2")
    names = [s.state for s in rules.states]
    for s in rules.states:   # which states a checkpoint holds is checked against its files when planning
        if names.count(s.state) > 1:
            raise CkptmapError(f"{s.loc}: optimizer state {s.state!r} named twice")
        if s.pattern.used_names() - {"name"} or not any(
                seg.kind == "ref" and seg.name == "name" for seg in s.pattern.segments):
            raise CkptmapError(f"{s.loc}: an optimizer state pattern must contain {{name}} and nothing "
                               f"else in braces, e.g. exp_avg.{{name}}")
    seen_buckets: dict[str, list] = {}
    for b in rules.buckets:
        others = seen_buckets.setdefault(b.name, [])
        for o in others:
            if b.versions is None or o.versions is None or _ranges_overlap(b.versions, o.versions):
                raise CkptmapError(f"{b.loc}: a second `buckets {b.name}` block for the same versions as {o.loc}; "
                                   f"give each block its own version range (`buckets {b.name} for 0.8 - 0.16`)")
        others.append(b)
        if b.versions and version_key(b.versions[0]) > version_key(b.versions[1]):
            raise CkptmapError(f"{b.loc}: version range {b.versions[0]} - {b.versions[1]} is empty")
        if b.expert_params not in ("with_dense", "separate"):
            raise CkptmapError(f"{b.loc}: expert_params: {b.expert_params} is unknown; use separate or with_dense")
        if b.storage not in KNOWN_BUCKET_STORAGE:
            raise CkptmapError(f"{b.loc}: storage: {b.storage} is unknown; use one of {', '.join(KNOWN_BUCKET_STORAGE)}")
        if len(b.bucket_pads) > 1 and any(not p.when for p in b.bucket_pads[:-1]):
            raise CkptmapError(f"{b.loc}: an unconditional bucket_pad must come last (the first pad whose "
                               f"conditions hold applies)")
        if b.order not in KNOWN_BUCKET_ORDERS:
            raise CkptmapError(f"{b.loc}: order: {b.order} is unknown; use one of {', '.join(KNOWN_BUCKET_ORDERS)}")
        if b.shared_embedding not in KNOWN_SHARED_EMBEDDING:
            raise CkptmapError(f"{b.loc}: shared_embedding: {b.shared_embedding} is unknown; use one of "
                               f"{', '.join(KNOWN_SHARED_EMBEDDING)}")
        if b.shared_start not in KNOWN_SHARED_START:
            raise CkptmapError(f"{b.loc}: shared_embedding_start: {b.shared_start} is unknown; use one of "
                               f"{', '.join(KNOWN_SHARED_START)}")
        if (b.shared_start != "bucket_start" or b.shared_prepad is not None) and b.shared_embedding != "own_bucket":
            raise CkptmapError(f"{b.loc}: shared_embedding_start / shared_embedding_prepad only apply with "
                               f"`shared_embedding: own_bucket`")


# ops that only change the dtype keep every element where it is, so a part's rows stay contiguous ranges
# of the MindSpore tensor and the way back can put them into the fused tensor's rows directly
ELEMENTWISE_OPS = ("cast",)


def _validate_parts(rule: ParamRule) -> None:
    where, parts = rule.loc, rule.parts
    if parts is None:
        return
    names = parts.names
    if len(names) < 2:
        raise CkptmapError(f"{where}: parts: lists one part ({names[0]}); a tensor that maps to one tensor needs "
                           f"no parts: clause — drop it and write the name in the MindSpore pattern")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CkptmapError(f"{where}: part {dup[0]} is listed twice; each part names one MindSpore tensor")
    if PART in rule.megatron.bound_names():
        raise CkptmapError(f"{where}: the Megatron pattern {rule.megatron} binds {{{PART}}}, which names the rule's "
                           f"parts on the MindSpore side; rename the placeholder")
    uses = [s for s in rule.mindspore.segments if s.kind == "ref" and s.name == PART]
    if len(uses) != 1:
        raise CkptmapError(f"{where}: the MindSpore pattern {rule.mindspore} must name each part with {{{PART}}} "
                           f"exactly once (found {len(uses)}), e.g. ….self_attn.{{{PART}}}.weight")
    moving = [str(op) for op in rule.ops if op.name not in ELEMENTWISE_OPS]
    if moving:
        raise CkptmapError(f"{where}: ops {', '.join(moving)} move elements, which rules with parts: do not support "
                           f"(each part must stay a set of whole rows); only {', '.join(ELEMENTWISE_OPS)} may be "
                           f"combined with parts")
    if rule.shared_embedding:
        raise CkptmapError(f"{where}: a shared_embedding cannot be split into parts")
    if rule.tp.dim not in (None, 0) and rule.tp.halves:
        raise CkptmapError(f"{where}: parts cut dim 0; halves along dim {rule.tp.dim} would interleave with them")


def _validate_stack(rule: ParamRule) -> None:
    """``stack: expert`` needs {expert} bound on the Megatron side and absent on the MindSpore side, and
    ops that keep the stacking axis 0 where it is (so that ms2pt can undo them one expert at a time)."""
    if rule.stack is None:
        return
    where = rule.stack_loc or rule.loc
    if rule.stack not in STACKABLE:
        raise CkptmapError(f"{where}: stack: {rule.stack} — only {', '.join(STACKABLE)} can be stacked (write "
                           f"stack: expert, with {{expert}} in the Megatron pattern)")
    if rule.stack not in rule.megatron.bound_names():
        raise CkptmapError(f"{where}: stack: {rule.stack} stacks the tensors of every {{{rule.stack}}}, but the "
                           f"Megatron pattern {rule.megatron} has no {{{rule.stack}}}; add it where the expert number "
                           f"is (….local_experts.{{{rule.stack}}}.…)")
    if rule.stack in rule.mindspore.used_names():
        raise CkptmapError(f"{where}: stack: {rule.stack} makes one MindSpore tensor of all local experts (a new "
                           f"leading axis), but the MindSpore pattern {rule.mindspore} still names {{{rule.stack}}}; "
                           f"drop it from the MindSpore pattern, or drop stack: to keep one tensor per expert")
    if rule.parts is not None:
        raise CkptmapError(f"{where}: stack: and parts: in one rule are not supported; write one rule per fused "
                           f"tensor or leave the experts unstacked")
    if rule.shared_embedding:
        raise CkptmapError(f"{where}: a shared_embedding cannot be stacked")
    for op in rule.ops:
        if op.name in ELEMENTWISE_OPS:
            continue
        if op.name == "transpose" and all(isinstance(a, int) and a >= 1 for a in op.args):
            continue
        raise CkptmapError(f"{where}: op {op} with stack: {rule.stack} — ops act on the stacked tensor (experts on "
                           f"axis 0) and must leave axis 0 alone: use cast() or transpose(a, b) with a, b >= 1 "
                           f"(e.g. transpose(1, 2) for [experts, in, out])")


def _ranges_overlap(a, b) -> bool:
    return not (version_key(a[1]) < version_key(b[0]) or version_key(b[1]) < version_key(a[0]))


def load_rules(path: str | Path) -> RuleSet:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CkptmapError(f"cannot read rules file {path}: {e.strerror}") from None
    return parse_rules(text, str(path))


def bundled_rules() -> dict[str, Path]:
    root = resources.files("ckptmap.rules")
    return {p.name[:-len(".rules")]: Path(str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".rules")}


def resolve_rules(name_or_path: str) -> RuleSet:
    """``--rules NAME|PATH``: a bundled name, or a path to a user's file."""
    bundled = bundled_rules()
    if name_or_path in bundled:
        return load_rules(bundled[name_or_path])
    path = Path(name_or_path)
    if path.exists():
        return load_rules(path)
    raise CkptmapError(f"--rules {name_or_path}: no such file and no bundled rules of that name; bundled: "
                       f"{', '.join(bundled)} (see `ckptmap rules list`)")
