"""The lark side of `.rules` files: grammar.lark, the parser, and the transformer that turns a parse
tree into the attrs AST of ``rules.py``. Imported only when a rules text is not in the parse cache
(``rules_cache``): lark's import and the parse are most of a rules load.
"""

from __future__ import annotations

import functools
import os
import sys
from importlib import resources

import lark

from ckptmap.errors import CkptmapError
from ckptmap.mapping.rules import (EXPERT, KNOWN_GROUP_LOADS, KNOWN_GROUP_ORDERS, KNOWN_UNEVEN_STAGES, LAYER,
                                   BucketLayout, BucketPad, Condition, Expr, LayersSpec, Loc, OpSpec, ParamGroupPolicy,
                                   ParamRule, Parts, Pattern, Segment, Split, StateRule)
from ckptmap.mapping.rules_cache import cache_dir
from ckptmap.mapping.torch_dist_rules import KeyTemplate, RankObject, ShardingSpec, StackedKey, TorchDistLayout

_TERMINAL_NAMES = {
    "NAME": "a name", "INT": "a number", "SIGNED_INT": "a number", "STRING": "a \"string\"",
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "DOT": "'.'", "COMMA": "','",
    "COLON": "':'", "EQUAL": "'='", "VBAR": "'|'", "STAR": "'*'", "PLUS": "'+'", "$END": "end of file",
    "OPTIONAL": "'optional'", "UNIT": "'elements' or 'bytes'", "NOT": "'not'",
}


@functools.cache
def _parser() -> lark.Lark:
    grammar = resources.files("ckptmap.mapping").joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False,
                     cache=_grammar_cache())


def _grammar_cache() -> str | bool:
    """Where lark keeps the analysed grammar (its parse tables: a quarter of a second of every start-up
    to build). Lark checks the grammar's hash on load and rebuilds a stale or unreadable cache; the
    file lives in the user's own cache folder, never a shared temporary one (it is a pickle)."""
    folder = cache_dir()
    if folder is None:
        return False
    return os.path.join(folder, f"grammar-lark{lark.__version__}-py{sys.version_info[0]}{sys.version_info[1]}.cache")


def _describe_expected(expected) -> str:
    names = []
    for t in sorted(expected):
        if t in _TERMINAL_NAMES:
            names.append(_TERMINAL_NAMES[t])
        elif t.startswith("__ANON") or t.isupper():
            names.append(repr(t.lower()))
        else:
            names.append(repr(t))
    return ", ".join(sorted(set(names)))


class _Builder(lark.Transformer):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _loc(self, meta) -> Loc:
        return Loc(self.path, getattr(meta, "line", 0), getattr(meta, "column", 0))

    # patterns
    def literal(self, items):
        return Segment("literal", text=str(items[0]))

    def placeholder(self, items):
        name = str(items[0])
        if name in (LAYER, EXPERT):
            return Segment(name)
        return Segment("ref", name=name)

    def choice(self, items):
        return Segment("choice", name=str(items[0]), choices=tuple(str(i) for i in items[1:]))

    def int_capture(self, items):
        return Segment("int", name=str(items[0]))

    def pattern(self, items):
        return Pattern(tuple(items))

    # param rules
    def replicated(self, _items):
        return Split()

    def split_dim(self, items):
        return ("dim", int(items[0]))

    def split_vocab(self, _items):
        return ("vocab_padded", True)

    def split_halves(self, items):
        if len(items) > 1:
            return ("halves", (int(items[0]), str(items[1])))
        return ("halves", int(items[0]))

    def split_groups(self, items):
        return ("groups", str(items[0]))

    def split(self, items):
        kwargs = dict(items)
        if isinstance(kwargs.get("halves"), tuple):
            kwargs["halves"], kwargs["halves_when"] = kwargs["halves"]
        if "dim" not in kwargs:
            raise _SemanticError("split(...) needs dim=N (the dimension cut across TP ranks)")
        return Split(**kwargs)

    def tp_clause(self, items):
        return ("tp", items[0])

    def int_arg(self, items):
        return int(items[0])

    def name_arg(self, items):
        return str(items[0])

    def op(self, items):
        return OpSpec(str(items[0]), tuple(items[1:]))

    def ops_clause(self, items):
        return ("ops", tuple(items))

    @lark.v_args(meta=True)
    def part_entry(self, meta, items):
        return (str(items[0]), items[1])

    @lark.v_args(meta=True)
    def parts_clause(self, meta, items):
        groups = items[0] if isinstance(items[0], Expr) else None
        entries = tuple(i for i in items if isinstance(i, tuple))
        return ("parts", Parts(entries, groups, self._loc(meta)))

    @lark.v_args(meta=True)
    def stack_clause(self, meta, items):
        return ("stack", (str(items[0]), self._loc(meta)))

    def div(self, items):
        return Expr("div", left=items[0], right=items[1])

    def ddp_clause(self, items):
        return items[0]

    @lark.v_args(meta=True)
    def param_rule(self, meta, items):
        optional = False
        if isinstance(items[0], lark.Token) and items[0].type == "OPTIONAL":
            optional, items = True, items[1:]
        megatron, rest = items[0], items[1:]
        ddp = None
        if rest and isinstance(rest[0], Pattern) and len([r for r in rest if isinstance(r, Pattern)]) == 2:
            ddp, rest = rest[0], rest[1:]
        mindspore, clauses = rest[0], rest[1:]
        tp, ops, shared, parts, stack = None, (), False, None, (None, None)
        for clause in clauses:
            if isinstance(clause, lark.Token):  # SHARED_EMBEDDING
                shared = True
                continue
            key, value = clause
            if key == "tp":
                if tp is not None:
                    raise _SemanticError("two tp: clauses in one rule", meta)
                tp = value
            elif key == "parts":
                if parts is not None:
                    raise _SemanticError("two parts: clauses in one rule; list every part in one", meta)
                parts = value
            elif key == "stack":
                if stack[0] is not None:
                    raise _SemanticError("two stack: clauses in one rule", meta)
                stack = value
            else:
                ops = ops + value
        if tp is None:
            raise _SemanticError(
                f"rule for {megatron} has no tp: clause; say how it is split across tensor-parallel "
                f"ranks (tp: replicated, or tp: split(dim=0))", meta)
        return ParamRule(megatron, mindspore, ddp, tp, ops, optional, self._loc(meta), shared, parts, *stack)

    # optimizer state
    @lark.v_args(meta=True)
    def state_entry(self, meta, items):
        return StateRule(str(items[0]), items[1], self._loc(meta))

    def state_block(self, items):
        return ("states", tuple(items))

    # buckets
    def const(self, items):
        return Expr("const", int(items[0]))

    def symbol(self, items):
        return Expr("symbol", str(items[0]))

    def mul(self, items):
        return Expr("mul", left=items[0], right=items[1])

    def add(self, items):
        return Expr("add", left=items[0], right=items[1])

    def order(self, items):
        return ("order", str(items[0]))

    def lcm(self, items):
        return Expr("lcm", args=tuple(items))

    def max(self, items):
        return Expr("max", args=tuple(items))

    def param_align(self, items):
        return ("param_align", (items[0], str(items[1])))

    def param_start_align(self, items):
        return ("param_start_align", (items[0], str(items[1])))

    def bucket_pad(self, items):
        return ("bucket_pad", BucketPad(items[0], str(items[1]), items[2] if len(items) > 2 else ()))

    def storage(self, items):
        return ("storage", str(items[0]))

    def uneven_stages(self, items):
        return ("uneven_stages", str(items[0]))

    def expert_params(self, items):
        return ("expert_params", (str(items[0]), items[1] if len(items) > 1 else ()))

    def version_range(self, items):
        lo = str(items[0])
        return ("versions", (lo, str(items[1]) if len(items) > 1 else lo))

    def cond_flag(self, items):
        return Condition(str(items[-1]), negated=len(items) == 2)

    def cond_compare(self, items):
        return Condition(op=str(items[1]), value=items[2], left=items[0])

    def mod(self, items):
        return Expr("mod", left=items[0], right=items[1])

    def shared_start(self, items):
        return ("shared_start", str(items[0]))

    def shared_prepad(self, items):
        return ("shared_prepad", items[0] if items else ())

    def condition(self, items):
        return tuple(items)

    def bucket_close(self, items):
        return ("bucket_close", (items[0], items[1] if len(items) > 1 else ()))

    def default(self, items):
        return ("default", (str(items[0]), items[1]))

    def shared_embedding(self, items):
        return ("shared_embedding", (str(items[0]), items[1] if len(items) > 1 else ()))

    @lark.v_args(meta=True)
    def buckets_block(self, meta, items):
        kwargs, defaults, pads = {}, [], []
        for key, value in items[1:]:
            if key == "default":
                defaults.append(value)
                continue
            if key == "bucket_pad":
                pads.append(value)
                continue
            if key in kwargs:
                raise _SemanticError(f"bucket setting {key!r} given twice", meta)
            kwargs[key] = value
        if "bucket_close" in kwargs:
            kwargs["bucket_close"], kwargs["close_when"] = kwargs["bucket_close"]
        if "shared_embedding" in kwargs:
            kwargs["shared_embedding"], kwargs["shared_when"] = kwargs["shared_embedding"]
        if "expert_params" in kwargs:
            kwargs["expert_params"], kwargs["expert_when"] = kwargs["expert_params"]
        kwargs["defaults"] = tuple(defaults)
        kwargs["bucket_pads"] = tuple(pads)
        if kwargs.get("uneven_stages", "none") not in KNOWN_UNEVEN_STAGES:
            raise _SemanticError(f"uneven_stages: {kwargs['uneven_stages']!r} is not one of "
                                 f"{', '.join(KNOWN_UNEVEN_STAGES)}", meta)
        if "param_align" in kwargs and "param_start_align" in kwargs:
            raise _SemanticError("param_align (padding after each parameter) and param_start_align (each "
                                 "parameter starts aligned) exclude each other; keep one", meta)
        return BucketLayout(name=str(items[0]), loc=self._loc(meta), **kwargs)

    # param groups
    def pg_order(self, items):
        return ("order", str(items[0]))

    def pg_load(self, items):
        return ("load", str(items[0]))

    def nowd_suffix(self, items):
        return ("suffix", "." + str(items[0]))

    def nowd_ndim(self, items):
        return ("ndim", int(items[0]))

    def pg_no_wd(self, items):
        return ("no_wd", tuple(items))

    @lark.v_args(meta=True)
    def param_groups_block(self, meta, items):
        kwargs = {}
        for key, value in items[1:]:
            if key in kwargs:
                raise _SemanticError(f"param_groups setting {key!r} given twice", meta)
            kwargs[key] = value
        for key, known in (("order", KNOWN_GROUP_ORDERS), ("load", KNOWN_GROUP_LOADS)):
            if key in kwargs and kwargs[key] not in known:
                raise _SemanticError(f"param_groups {key}: {kwargs[key]!r} is not one of {', '.join(known)}", meta)
        no_wd = kwargs.pop("no_wd", ())
        kwargs["no_wd_suffixes"] = tuple(v for k, v in no_wd if k == "suffix")
        kwargs["no_wd_ndims"] = tuple(v for k, v in no_wd if k == "ndim")
        return ParamGroupPolicy(name=str(items[0]), loc=self._loc(meta), **kwargs)

    # torch_dist layouts
    @lark.v_args(meta=True)
    def td_stacked(self, meta, items):
        loc = self._loc(meta)
        return ("stacked", StackedKey(KeyTemplate.parse(_text(items[0]), loc), KeyTemplate.parse(_text(items[1]), loc),
                                      loc))

    def td_rename(self, items):
        return (_text(items[0]), _text(items[1]))

    def td_layer_names(self, items):
        return ("layer_names", (str(items[0]), tuple(items[1:])))

    def td_dropped(self, items):
        return ("dropped", _text(items[0]))

    def td_over_dp(self, items):
        return items[0][1]   # the version range

    @lark.v_args(meta=True)
    def td_rank_object(self, meta, items):
        path = _text(items[1])
        if not path or any(not p for p in path.split(".")):
            raise _SemanticError(f"rank_object {items[0]}: \"{path}\" is not a dotted path of a legacy model file", meta)
        return ("rank_object", RankObject(str(items[0]), tuple(path.split(".")), items[2] if len(items) > 2 else None,
                                          self._loc(meta)))

    def td_dist_only(self, items):
        return ("dist_only", tuple((str(items[0]), _text(i)) for i in items[1:]))

    @lark.v_args(meta=True)
    def td_chained(self, meta, items):
        return ("chained", KeyTemplate.parse(_text(items[0]), self._loc(meta)))

    @lark.v_args(meta=True)
    def td_unsupported(self, meta, items):
        return ("unsupported", (str(items[0]), _text(items[1])))

    def sh_space(self, items):
        return ("space", str(items[0]))

    @lark.v_args(meta=True)
    def sh_tensors(self, meta, items):
        return ("tensors", KeyTemplate.parse(_text(items[0]), self._loc(meta)))

    @lark.v_args(meta=True)
    def sh_objects(self, meta, items):
        return ("objects", KeyTemplate.parse(_text(items[0]), self._loc(meta)))

    def sh_state(self, items):
        return (str(items[0]), str(items[1]))

    def sh_states(self, items):
        return ("state_names", tuple(items))

    def sh_nd_flattened(self, _items):
        return ("nd_flattened", True)

    def sh_param_groups(self, items):
        return ("param_groups", str(items[0]))

    @lark.v_args(meta=True)
    def td_sharding(self, meta, items):
        name, versions, rest = str(items[0]), items[1][1], list(items[2:])
        written_by = _text(rest.pop(0)) if rest and isinstance(rest[0], lark.Token) else ""
        kwargs = {}
        for key, value in rest:
            if key in kwargs:
                raise _SemanticError(f"sharding {name}: {key} given twice", meta)
            kwargs[key] = value
        if "space" not in kwargs:
            raise _SemanticError(f"sharding {name} has no `space:` (model, bucket or coalesced)", meta)
        return ("sharding", ShardingSpec(name, written_by, versions=versions, loc=self._loc(meta), **kwargs))

    @lark.v_args(meta=True)
    def torch_dist_block(self, meta, items):
        fields = {"stacked": [], "layer_names": [], "dropped": [], "rank_object": [], "dist_only": [],
                  "sharding": [], "unsupported": []}
        chained = None
        for key, value in items[1:]:
            if key == "chained":
                if chained is not None:
                    raise _SemanticError("chained: given twice", meta)
                chained = value
            elif key == "dist_only":
                fields[key].extend(value)
            else:
                fields[key].append(value)
        return TorchDistLayout(str(items[0]), tuple(fields["stacked"]), tuple(fields["layer_names"]),
                               tuple(fields["dropped"]), tuple(fields["rank_object"]), tuple(fields["dist_only"]),
                               chained, tuple(fields["sharding"]), tuple(fields["unsupported"]), self._loc(meta))

    @lark.v_args(meta=True)
    def include_stmt(self, meta, items):
        return ("include", str(items[0]), self._loc(meta))

    def layers_stmt(self, items):
        return LayersSpec(str(items[0]), str(items[1]) if len(items) > 1 else None)

    def description(self, items):
        return str(items[0])[1:-1]

    def header(self, items):
        return ("header", str(items[0]), items[1] if len(items) > 1 else "")

    def start(self, items):
        return items


def _text(token) -> str:
    return str(token)[1:-1]


class _SemanticError(Exception):
    def __init__(self, message, meta=None):
        super().__init__(message)
        self.message = message
        self.meta = meta


def parse_items(text: str, path: str) -> list:
    """The items of one rules file (header, rules, blocks, includes unresolved), or a CkptmapError at
    ``file:line:col``."""
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        raise CkptmapError(
            f"{path}:{e.line}:{e.column}: unexpected character {text[e.pos_in_stream]!r}; expected "
            f"{_describe_expected(e.allowed)}") from None
    except lark.UnexpectedToken as e:
        found = "end of file" if e.token.type == "$END" else repr(str(e.token))
        raise CkptmapError(
            f"{path}:{e.line}:{e.column}: unexpected {found}; expected "
            f"{_describe_expected(e.expected)}") from None
    except lark.UnexpectedEOF as e:
        raise CkptmapError(f"{path}: unexpected end of file; expected {_describe_expected(e.expected)}") from None
    try:
        items = _Builder(path).transform(tree)
    except lark.exceptions.VisitError as e:
        err = e.orig_exc
        if isinstance(err, _SemanticError):
            meta = err.meta or getattr(e.obj, "meta", None)
            where = f"{path}:{meta.line}:{meta.column}" if meta is not None and hasattr(meta, "line") else path
            raise CkptmapError(f"{where}: {err.message}") from None
        if isinstance(err, CkptmapError):   # located by the code that raised it
            raise err from None
        raise
    return items
