"""The ``torch_dist NAME { … }`` block of `.rules` files: how a framework's distributed checkpoints
spell their keys -- layers and experts stacked on leading axes, the sharded names that differ from a
legacy state dict, the per-rank objects, and the distributed optimizer's sharding types.

``formats/megatron_dist.py`` interprets a ``torch_dist`` folder with a :class:`TorchDistLayout` (the
bundled ``common/megatron_layouts.rules`` one unless the model's rules carry their own), and the
conversions spell the keys they write with it: no Megatron key name is written in Python.

Keys are written as strings with placeholders, ``"optimizer.state.{state: param|exp_avg}.{name}"``. A
placeholder's meaning is fixed here (:data:`PLACEHOLDERS`): what it matches and where it may appear;
``rules check`` refuses any other, so every block the grammar accepts can be used.
"""

from __future__ import annotations

import functools
import re

import attrs

from ckptmap.errors import CkptmapError
from ckptmap.mapping.rules import version_in_range, version_key

# placeholder -> what it matches: "int" (a decimal number), "text" (one or more characters)
PLACEHOLDERS = {
    "layer": "int", "expert": "int",                  # stacked axes (global numbers)
    "rest": "text",                                    # the rest of a stacked key, the same on both sides
    "optimizer": "int",                                # a ChainedOptimizer's index
    "state": "choice", "what": "choice",               # an optimizer state / a per-DP-group object, as spelled
    "name": "text",                                    # a parameter's sharded key
    "group": "int", "gbuf": "int", "bucket": "int",    # DP group (model-parallel rank), gradient buffer, bucket
    "dtypes": "text",                                  # a buffer's (param dtype, grad dtype) as the key spells it
}
STACK_AXES = ("layer", "expert")
CANONICAL_STATES = ("param", "exp_avg", "exp_avg_sq")
# what the optimizer tensors of a sharding type stand for: one per parameter and state ("model"), one per
# gradient-buffer bucket and state ("bucket"), or whole buffers inside per-DP-group objects ("coalesced")
SPACES = ("model", "bucket", "coalesced")
PARAM_GROUPS = ("common", "per_group")   # the optimizer's param groups: in common.pt, or per DP group objects
DIST_ONLY_WHERE = ("common", "optimizer")
# per space: (placeholders the tensors key must have, the objects key must have, objects every type reads)
_REQUIRED = {
    "model": ({"state", "name"}, None, ()),
    "bucket": ({"group", "gbuf", "dtypes", "bucket", "state"}, {"group", "what"},
               ("optimizer", "per_bucket_numel", "per_bucket_numel_unpadded")),
    "coalesced": (None, {"group", "what"}, ("optimizer", "param_state")),
}


@attrs.frozen
class KeyTemplate:
    """A key with placeholders. ``pieces`` alternate literal text and ``(name, choices)``."""

    text: str
    pieces: tuple = ()

    @classmethod
    def parse(cls, text: str, where) -> "KeyTemplate":
        pieces, pos = [], 0
        for m in re.finditer(r"\{([^{}]*)\}", text):
            literal = text[pos:m.start()]
            if "{" in literal or "}" in literal:
                raise CkptmapError(f"{where}: \"{text}\": unbalanced brace; write placeholders as {{name}} or "
                                   f"{{name: a|b}}")
            inner = m.group(1)
            name, _, choices = inner.partition(":")
            name = name.strip()
            opts = tuple(c.strip() for c in choices.split("|")) if choices else ()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or any(
                    not re.fullmatch(r"[A-Za-z0-9_]+", c) for c in opts):
                raise CkptmapError(f"{where}: \"{text}\": {{{inner}}} is not a placeholder; write {{name}} or "
                                   f"{{name: a|b}}")
            if name not in PLACEHOLDERS:
                raise CkptmapError(f"{where}: \"{text}\": unknown placeholder {{{name}}}; known: "
                                   f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
            if (PLACEHOLDERS[name] == "choice") != bool(opts):
                raise CkptmapError(f"{where}: \"{text}\": {{{name}}} " + (
                    f"lists the words it may be, e.g. {{{name}: a|b}}" if not opts else "takes no list of words"))
            if not literal and pieces and not isinstance(pieces[-1], str):
                raise CkptmapError(f"{where}: \"{text}\": two placeholders in a row cannot be told apart; put "
                                   f"text between them")
            if literal:
                pieces.append(literal)
            pieces.append((name, opts))
            pos = m.end()
        tail = text[pos:]
        if "{" in tail or "}" in tail:
            raise CkptmapError(f"{where}: \"{text}\": unbalanced brace; write placeholders as {{name}} or {{name: a|b}}")
        if tail:
            pieces.append(tail)
        names = [p[0] for p in pieces if not isinstance(p, str)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CkptmapError(f"{where}: \"{text}\": {{{dup[0]}}} appears twice")
        return cls(text, tuple(pieces))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p[0] for p in self.pieces if not isinstance(p, str))

    def choices(self, name: str) -> tuple[str, ...]:
        return next(p[1] for p in self.pieces if not isinstance(p, str) and p[0] == name)

    @property
    def literal_prefix(self) -> str:
        return self.pieces[0] if self.pieces and isinstance(self.pieces[0], str) else ""

    @functools.cached_property
    def _compiled(self) -> re.Pattern:
        return _regex(self)

    def match(self, key: str) -> dict | None:
        m = self._compiled.fullmatch(key)
        if m is None:
            return None
        return {k: int(v) if PLACEHOLDERS[k] == "int" else v for k, v in m.groupdict().items()}

    def format(self, **values) -> str:
        out = []
        for p in self.pieces:
            if isinstance(p, str):
                out.append(p)
                continue
            name, opts = p
            value = str(values[name])
            if opts and value not in opts:
                raise CkptmapError(f"\"{self.text}\": {{{name}}} = {value!r} is not one of {', '.join(opts)}")
            out.append(value)
        return "".join(out)

    def __str__(self) -> str:
        return f'"{self.text}"'


def _regex(t: KeyTemplate) -> re.Pattern:
    parts = []
    for p in t.pieces:
        if isinstance(p, str):
            parts.append(re.escape(p))
            continue
        name, opts = p
        body = {"int": r"\d+", "text": r".+"}.get(PLACEHOLDERS[name]) or "|".join(map(re.escape, opts))
        parts.append(f"(?P<{name}>{body})")
    return re.compile("".join(parts), re.S)


@attrs.frozen
class StackedKey:
    """``stacked "decoder.layers.{layer}.{rest}" => "decoder.layers.{rest}"``: items named like the left side
    (legacy names, global numbers) are one global tensor under the right side's key, stacked on leading
    axes in the order the left side names them."""

    item: KeyTemplate
    sharded: KeyTemplate
    loc: object = None

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(n for n in self.item.names if n != "rest")

    @property
    def prefix(self) -> str:
        return self.sharded.literal_prefix


@attrs.frozen
class ShardingSpec:
    """One distributed-optimizer sharding type (``sharding NAME "written by" { … }``)."""

    name: str
    written_by: str
    space: str
    tensors: KeyTemplate | None = None
    objects: KeyTemplate | None = None
    state_names: tuple[tuple[str, str], ...] = ()   # (as spelled in keys, canonical)
    nd_flattened: bool = False
    param_groups: str = "per_group"
    versions: tuple[str, str] | None = None   # the framework versions whose save of this type ckptmap writes
    loc: object = None

    def covers(self, version: str) -> bool:
        return version_in_range(version, self.versions)

    @property
    def param_groups_in_common(self) -> bool:
        return self.param_groups == "common"

    def state(self, spelled: str) -> str:
        return dict(self.state_names).get(spelled, spelled)

    def spelling(self, state: str) -> str:
        return {v: k for k, v in self.state_names}.get(state, state)

    def tensor_key(self, **values) -> str:
        """The key of one optimizer tensor (``state`` canonical), without a chained prefix."""
        if "state" in values:
            values["state"] = self.spelling(values["state"])
        return self.tensors.format(**values)

    def object_name(self, **values) -> str:
        return self.objects.format(**values)


@attrs.frozen
class RankObject:
    """``rank_object rng_state => "rng_state" over_dp for 0.15 - 0.16``: per-rank state saved as a ShardedObject
    over (pp, tp) -- and over DP as well, with expert parallelism, by the versions in the range -- whose value is
    at the dotted path of a legacy model file."""

    name: str
    path: tuple[str, ...]
    over_dp_versions: tuple[str, str] | None = None
    loc: object = None

    def over_dp(self, version: str) -> bool:
        return self.over_dp_versions is not None and version_in_range(version, self.over_dp_versions)


@attrs.frozen
class TorchDistLayout:
    name: str
    stacked: tuple[StackedKey, ...] = ()
    layer_names: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()   # transformer_impl -> (legacy, sharded)
    dropped_extra_states: tuple[str, ...] = ()
    rank_objects: tuple[RankObject, ...] = ()
    dist_only: tuple[tuple[str, str], ...] = ()        # (common | optimizer, key)
    chained: KeyTemplate | None = None
    shardings: tuple[ShardingSpec, ...] = ()
    unsupported: tuple[tuple[str, str], ...] = ()
    loc: object = None

    # --- sharding types ---
    @property
    def sharding_types(self) -> dict[str, ShardingSpec]:
        return {s.name: s for s in self.shardings}

    def sharding(self, name: str) -> ShardingSpec:
        st = self.sharding_types.get(name)
        if st is None:
            raise CkptmapError(f"sharding type {name!r} is not declared in the torch_dist {self.name} rules ({self.loc}); "
                               f"they declare {', '.join(self.sharding_types)}")
        return st

    @functools.cached_property
    def optimizer_prefix(self) -> str:
        """The literal text every optimizer key starts with (after a chained prefix)."""
        return _common_prefix([t.literal_prefix for s in self.shardings for t in (s.tensors, s.objects) if t])

    @functools.cached_property
    def _chained_regex(self) -> re.Pattern | None:
        return None if self.chained is None else _regex(self.chained)

    def split_chained(self, key: str) -> tuple[int | None, str]:
        """(chained optimizer index or None, the key without the prefix)."""
        rx = self._chained_regex
        if rx is not None:
            m = rx.match(key)
            if m is not None:
                return int(m["optimizer"]), key[m.end():]
        return None, key

    def chained_prefix(self, optimizer: int | None) -> str:
        return "" if optimizer is None else self.chained.format(optimizer=optimizer)

    def is_optimizer_key(self, key: str) -> bool:
        return self.split_chained(key)[1].startswith(self.optimizer_prefix)

    # --- stacked layers / experts ---
    def stacked_key(self, name: str) -> StackedKey | None:
        return next((s for s in self.stacked if name.startswith(s.prefix)), None)

    def renames(self, transformer_impl: str | None) -> tuple[tuple[str, str], ...]:
        impls = dict(self.layer_names)
        impl = transformer_impl or "transformer_engine"
        if impl not in impls:
            raise CkptmapError(f"args.transformer_impl {impl!r}: the torch_dist {self.name} rules ({self.loc}) know the "
                               f"sharded key names of {', '.join(impls)}; add a `layer_names {impl} {{ … }}` block")
        return impls[impl]

    def sharded_item(self, name: str, transformer_impl: str | None) -> tuple[str, tuple[int, ...]]:
        """(sharded key, stacked index) of a legacy state-dict name with global layer / expert numbers."""
        renames = self.renames(transformer_impl)
        for s in self.stacked:
            b = s.item.match(name)
            if b is not None:
                return s.sharded.format(rest=_renamed(b["rest"], renames)), tuple(b[a] for a in s.axes)
        return name, ()

    def item_name(self, name: str, index: dict, transformer_impl: str | None) -> str:
        """The legacy state-dict name of one item (``index``: axis -> global number) of stacked key ``name``:
        the inverse of :meth:`sharded_item`."""
        s = self.stacked_key(name)
        flipped = tuple((sharded, legacy) for legacy, sharded in self.renames(transformer_impl))
        return s.item.format(rest=_renamed(name[len(s.prefix):], flipped), **index)

    # --- per-rank objects ---
    def rank_objects_over_dp(self, version: str) -> set[str]:
        """The rank objects megatron-core ``version`` shards over DP as well (with expert parallelism)."""
        return {o.name for o in self.rank_objects if o.over_dp(version)}

    def dist_only_keys(self, where: str) -> tuple[str, ...]:
        return tuple(k for w, k in self.dist_only if w == where)


def _renamed(rest: str, renames) -> str:
    """``rest`` with the first matching ``(from, to)`` name part at its start replaced."""
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _common_prefix(texts: list[str]) -> str:
    if not texts:
        return ""
    out = texts[0]
    for t in texts[1:]:
        while not t.startswith(out):
            out = out[:-1]
    return out


def validate(layout: TorchDistLayout) -> None:
    """Everything a torch_dist block must hold for ckptmap to use it (`rules check`)."""
    where = layout.loc
    for s in layout.stacked:
        axes = s.axes
        if set(s.sharded.names) != {"rest"} or s.sharded.pieces[-1] != ("rest", ()) or not s.prefix:
            raise CkptmapError(f"{s.loc}: the stacked key {s.sharded} must be literal text followed by {{rest}} "
                               f"(e.g. \"decoder.layers.{{rest}}\")")
        if s.item.names[-1:] != ("rest",) or not axes or set(axes) - set(STACK_AXES):
            raise CkptmapError(f"{s.loc}: the item name {s.item} must name the stacked axes ({', '.join(STACK_AXES)}) "
                               f"and end with {{rest}} (e.g. \"decoder.layers.{{layer}}.{{rest}}\")")
        if axes[0] != "layer":
            raise CkptmapError(f"{s.loc}: {s.item}: layers are the first stacked axis; name {{layer}} first")
    prefixes = [s.prefix for s in layout.stacked]
    for i, p in enumerate(prefixes):
        hidden = [q for q in prefixes[:i] if p.startswith(q)]
        if hidden:
            raise CkptmapError(f"{layout.stacked[i].loc}: the stacked key \"{p}{{rest}}\" is never used: the earlier "
                               f"\"{hidden[0]}{{rest}}\" matches first; list the longer prefix first")
    impls = [i for i, _ in layout.layer_names]
    if len(set(impls)) != len(impls):
        raise CkptmapError(f"{where}: a layer_names block is given twice for one transformer_impl")
    for impl, renames in layout.layer_names:
        for legacy, sharded in renames:
            if not legacy or not sharded or "{" in legacy + sharded:
                raise CkptmapError(f"{where}: layer_names {impl}: \"{legacy}\" => \"{sharded}\" must be two plain, "
                                   f"non-empty name parts")
    if not layout.shardings:
        raise CkptmapError(f"{where}: torch_dist {layout.name} declares no sharding type")
    if layout.chained is None or set(layout.chained.names) != {"optimizer"} or \
            not isinstance(layout.chained.pieces[-1], str):
        raise CkptmapError(f"{where}: torch_dist {layout.name} needs `chained: \"…{{optimizer}}…\"`, the key prefix of "
                           f"a ChainedOptimizer's optimizers, with {{optimizer}} only and text after it")
    names = [s.name for s in layout.shardings] + [n for n, _ in layout.unsupported]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CkptmapError(f"{where}: sharding type {dup[0]} is declared twice")
    for s in layout.shardings:
        _validate_sharding(s)
    if not layout.optimizer_prefix:
        raise CkptmapError(f"{where}: the sharding types' keys share no leading text (e.g. \"optimizer.\"), so "
                           f"optimizer keys cannot be told from model weights")
    for o in layout.rank_objects:
        if o.over_dp_versions and version_key(o.over_dp_versions[0]) > version_key(o.over_dp_versions[1]):
            raise CkptmapError(f"{o.loc}: rank_object {o.name}: version range {' - '.join(o.over_dp_versions)} is empty")
    from ckptmap.formats.megatron_files import LEGACY_RANK_STATE_PATHS

    for o in layout.rank_objects:
        if ".".join(o.path) not in LEGACY_RANK_STATE_PATHS:
            raise CkptmapError(f"{o.loc}: rank_object {o.name} => \"{'.'.join(o.path)}\": a legacy model file keeps "
                               f"per-rank state at {', '.join(LEGACY_RANK_STATE_PATHS)} only")
    objs = [o.name for o in layout.rank_objects]
    if len(set(objs)) != len(objs):
        raise CkptmapError(f"{where}: a rank_object is declared twice")
    for w, _ in layout.dist_only:
        if w not in DIST_ONLY_WHERE:
            raise CkptmapError(f"{where}: dist_only {w}: use one of {', '.join(DIST_ONLY_WHERE)}")


def _validate_sharding(s: ShardingSpec) -> None:
    where = s.loc
    if s.versions and version_key(s.versions[0]) > version_key(s.versions[1]):
        raise CkptmapError(f"{where}: sharding {s.name}: version range {' - '.join(s.versions)} is empty")
    if s.space not in SPACES:
        raise CkptmapError(f"{where}: sharding {s.name}: space {s.space} is unknown; use one of {', '.join(SPACES)}")
    if s.param_groups not in PARAM_GROUPS:
        raise CkptmapError(f"{where}: sharding {s.name}: param_groups {s.param_groups} is unknown; use one of "
                           f"{', '.join(PARAM_GROUPS)}")
    need_tensors, need_objects, objects = _REQUIRED[s.space]
    for label, t, need in (("tensors", s.tensors, need_tensors), ("objects", s.objects, need_objects)):
        if need is None and t is not None:
            raise CkptmapError(f"{where}: sharding {s.name}: space {s.space} has no {label} key; drop it")
        if need is not None and t is None:
            raise CkptmapError(f"{where}: sharding {s.name}: space {s.space} needs `{label}: \"…\"` with "
                               f"{', '.join('{' + n + '}' for n in sorted(need))}")
        if t is not None and set(t.names) != need:
            raise CkptmapError(f"{where}: sharding {s.name}: the {label} key {t} must have exactly the placeholders "
                               f"{', '.join('{' + n + '}' for n in sorted(need))}")
    if s.objects is not None:
        missing = [w for w in objects + (("optimizer",) if s.param_groups == "per_group" else ())
                   if w not in s.objects.choices("what")]
        if missing:
            raise CkptmapError(f"{where}: sharding {s.name}: {{what}} of {s.objects} must include {missing[0]} (the "
                               f"objects a {s.space}-space type holds)")
    if s.param_groups == "per_group" and s.objects is None:
        raise CkptmapError(f"{where}: sharding {s.name}: param_groups per_group needs per-DP-group objects; use "
                           f"param_groups: common")
    if s.nd_flattened and s.space != "model":
        raise CkptmapError(f"{where}: sharding {s.name}: nd_flattened applies to model-space tensors only")
    spelled = s.tensors.choices("state") if s.tensors is not None else tuple(a for a, _ in s.state_names)
    stray = [a for a, _ in s.state_names if a not in spelled]
    if stray:
        raise CkptmapError(f"{where}: sharding {s.name}: states: {stray[0]} is not a word of {{state}} "
                           f"({', '.join(spelled)}); map the words the keys spell")
    canonical = sorted(s.state(w) for w in spelled)
    if s.tensors is not None and canonical != sorted(CANONICAL_STATES):
        raise CkptmapError(f"{where}: sharding {s.name}: the states must stand for {', '.join(CANONICAL_STATES)} (found "
                           f"{', '.join(canonical)}); map other spellings with `states: fp32_param = param`")
