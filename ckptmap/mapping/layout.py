"""Parallel-layout arithmetic: the one place in ckptmap that computes ranks and layer numbers.

Everything here is pure integer arithmetic over a :class:`ParallelLayout`; file naming
(``mp_rank_TT_PPP``, ``rank_{g}``) lives with the formats, not here.

Ranks (formats.md §3.1).  The global rank is a mixed-radix number over the rank order string
(default ``"tp-cp-ep-dp-pp"``, first token varies fastest), exactly as Megatron's
``RankGenerator`` builds it.  Expert parallelism is carved out of data parallelism: the digits
``ep`` (size EP) and ``dp`` (size DP/EP) must be adjacent in the order and together form the full
data-parallel rank -- ``dp_full = ep + EP * dp_rest`` for ``…-ep-dp-…`` and
``dp_full = dp_rest + (DP/EP) * ep`` for ``…-dp-ep-…``.  Either way the global rank equals the
mixed-radix number over the order *without* ``ep`` using the full dp rank, so for the default order
``g = tp + TP*(cp + CP*(dp + DP*pp))``.  Tokens of size 1 may be left out of the order (Megatron
appends them); a token of size > 1 may not.

Layers (formats.md §3.2).  ``num_layers`` (L) counts the MindSpeed layers including noop layers;
MindSpeed global ids are 0 … L-1.  Pipeline chunk ``(pp, v)`` holds a contiguous range of global
ids: uniform ``L/PP`` per stage without VPP, ``v*L/VPP + pp*L/(VPP*PP) + [0, L/(VPP*PP))`` with an
interleaved VPP, or the ranges given by a stage list (one entry per stage without VPP, one entry
per *virtual* stage ``v*PP + pp`` with VPP).  Noop layers keep their global ids on the MindSpeed
side and hold no parameters; the Megatron chunk holds the remaining layers of the chunk, numbered
compactly from 0 in ascending global order.

Choices worth knowing:

* Stage-list entries may be 0.  A stage (or virtual stage) without transformer layers is what
  Megatron's standalone-embedding-stage setup produces and what a noop-heavy layout can reduce a
  chunk to; the arithmetic is well defined (the chunk is empty), so it is not refused here.
* ``num_layers == 0`` means "no layer count known": the rank arithmetic works, every layer method
  raises :class:`CkptmapError` asking for ``--num-layers``.  This keeps a forgotten layer count
  from silently converting no layers.
* VPP > 1 needs PP > 1 (no Megatron version runs an interleaved schedule on one stage).  The
  Megatron core_r0.6.0 limit PP >= 3 is not enforced here: newer Megatron and MindSpeed accept
  PP 2, and the arithmetic is the same.
"""

from __future__ import annotations

import operator
import re
from typing import Iterable

import attrs

from ckptmap.errors import CkptmapError

__all__ = ["ParallelLayout", "parse_stage_list", "DEFAULT_ORDER", "FLAGS"]

DEFAULT_ORDER = "tp-cp-ep-dp-pp"
_TOKENS = ("tp", "cp", "ep", "dp", "pp")

# Command-line flag names used in error messages (one place to keep them in step with the CLI).
FLAGS = {
    "tp": "--tp-size",
    "pp": "--pp-size",
    "dp": "--dp-size",
    "cp": "--cp-size",
    "ep": "--ep-size",
    "vpp": "--vpp-size",
    "num_layers": "--num-layers",
    "stage_list": "--stage-list",
    "noop": "--noop",
    "order": "--parallel-init-order",
}


# --------------------------------------------------------------------------- parsing helpers


def stage_major(key: tuple) -> tuple:
    """A rank key (tp, pp, ep) as it sorts stage by stage: pipeline rank, expert rank, then tensor rank —
    the ranks of one stage, whose files are alike, next to each other."""
    tp, pp, ep = key
    return pp, ep, tp


def _as_int(value, flag: str, what: str) -> int:
    """One integer from an int-like value or a decimal string; CkptmapError otherwise."""
    if isinstance(value, bool):
        raise CkptmapError(
            f"{flag}: expected {what} as whole numbers, found the boolean {value!r}. "
            f"Pass integers, e.g. {flag} 4."
        )
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 10)
        except ValueError:
            raise CkptmapError(
                f"{flag}: expected {what} as whole numbers, found {value!r}. "
                f"Pass integers separated by commas or spaces, e.g. {flag} 4,4,4."
            ) from None
    try:
        return operator.index(value)
    except TypeError:
        raise CkptmapError(
            f"{flag}: expected {what} as whole numbers, found {value!r} "
            f"(type {type(value).__name__}). Pass integers, e.g. {flag} 4."
        ) from None


def _parse_int_list(values, flag: str, what: str) -> tuple[int, ...]:
    """Flatten ints and strings such as "3", "3,4,5" or "3 4" into a tuple of ints."""
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = [values]
    out: list[int] = []
    for item in values:
        if isinstance(item, bytes):
            item = item.decode()
        if isinstance(item, str):
            pieces = re.split(r"\s*,\s*|\s+", item.strip())
            if "" in pieces:
                raise CkptmapError(
                    f"{flag}: expected {what} as whole numbers, found the empty entry {item!r}. "
                    f"Remove it or write the numbers separated by commas, e.g. {flag} 4,4,4."
                )
            out.extend(_as_int(p, flag, what) for p in pieces)
        else:
            out.append(_as_int(item, flag, what))
    return tuple(out)


def parse_stage_list(values) -> tuple[int, ...]:
    """Parse a stage list given as ints or strings like ``"3"`` or ``"3,4,5"`` (also a mix,
    e.g. argparse ``nargs="+"`` output) into a tuple of non-negative ints.

    Raises CkptmapError for an empty list, a non-integer or a negative entry.  Whether the list
    fits the layout (length, sum) is checked by :class:`ParallelLayout`.
    """
    flag = FLAGS["stage_list"]
    parsed = _parse_int_list(values, flag, "the number of layers of each pipeline stage")
    if not parsed:
        raise CkptmapError(
            f"{flag}: expected the number of layers of each pipeline stage, found an empty list. "
            f"Give one non-negative count per stage, e.g. {flag} 4,4,4, or leave {flag} out for "
            f"a uniform split."
        )
    negative = [n for n in parsed if n < 0]
    if negative:
        raise CkptmapError(
            f"{flag}: expected non-negative layer counts per stage, found {negative[0]} in "
            f"{','.join(map(str, parsed))}. Fix the list so that every entry is 0 or more."
        )
    return parsed


def _convert_stage_list(value):
    return None if value is None else parse_stage_list(value)


def _convert_noop(value) -> frozenset:
    if isinstance(value, frozenset) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        return value
    return frozenset(_parse_int_list(value, FLAGS["noop"], "noop layer ids"))


def _convert_order(value):
    return value.strip().lower() if isinstance(value, str) else value


def _convert_vpp(value):
    return 1 if value is None else value


def _balanced(total: int, parts: int) -> str:
    """A comma-separated example split of `total` into `parts` nearly equal counts."""
    base, extra = divmod(total, parts)
    return ",".join(str(base + (1 if i < extra else 0)) for i in range(parts))


# --------------------------------------------------------------------------- the layout


@attrs.frozen
class ParallelLayout:
    """Sizes of a parallel training run plus its layer placement; see the module docstring."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    vpp: int = attrs.field(default=1, converter=_convert_vpp)  # chunks per stage; None → 1
    num_layers: int = 0
    stage_list: tuple[int, ...] | None = attrs.field(default=None, converter=_convert_stage_list)
    noop: frozenset[int] = attrs.field(default=frozenset(), converter=_convert_noop)
    order: str = attrs.field(default=DEFAULT_ORDER, converter=_convert_order)

    # Derived tables, filled in __attrs_post_init__ (not part of equality / hashing / repr).
    _radix: tuple = attrs.field(init=False, eq=False, repr=False)
    _stride: dict = attrs.field(init=False, eq=False, repr=False)
    _ep_before_dp: bool = attrs.field(init=False, eq=False, repr=False)
    _replica_offsets: tuple | None = attrs.field(init=False, default=None, eq=False, repr=False)
    _chunk_table: dict = attrs.field(init=False, eq=False, repr=False)
    _megatron_table: dict = attrs.field(init=False, eq=False, repr=False)
    _locate_table: tuple = attrs.field(init=False, eq=False, repr=False)

    # ------------------------------------------------------------------ validation

    def __attrs_post_init__(self) -> None:
        self._check_sizes()
        self._build_order()
        self._build_layers()

    def _check_sizes(self) -> None:
        for name in ("tp", "pp", "dp", "cp", "ep", "vpp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise CkptmapError(
                    f"{FLAGS[name]}: expected a whole number of at least 1, found {value!r}. "
                    f"Pass an integer, e.g. {FLAGS[name]} 2 (1 means that parallelism is off)."
                )
            if value < 1:
                raise CkptmapError(
                    f"{FLAGS[name]}: expected a size of at least 1, found {value}. "
                    f"Pass 1 if that parallelism is not used, otherwise the size the training "
                    f"run used."
                )
        if self.dp % self.ep:
            raise CkptmapError(
                f"{FLAGS['dp']} {self.dp} is not divisible by {FLAGS['ep']} {self.ep}: expert "
                f"parallelism is carved out of data parallelism, so the data-parallel size must "
                f"be a multiple of the expert-parallel size. Check both flags against the "
                f"training run (DP = world size / (TP*CP*PP))."
            )
        if self.vpp > 1 and self.pp == 1:
            raise CkptmapError(
                f"{FLAGS['vpp']} {self.vpp} needs pipeline parallelism, but {FLAGS['pp']} is 1: "
                f"the interleaved schedule splits each pipeline stage into chunks and only runs "
                f"with several stages. Pass {FLAGS['vpp']} 1 (or leave it out), or the real "
                f"{FLAGS['pp']}."
            )
        nl = self.num_layers
        if isinstance(nl, bool) or not isinstance(nl, int) or nl < 0:
            raise CkptmapError(
                f"{FLAGS['num_layers']}: expected the number of transformer layers on the "
                f"MindSpeed side (noop layers included) as a whole number >= 1, found {nl!r}. "
                f"Pass e.g. {FLAGS['num_layers']} 24."
            )

    def _build_order(self) -> None:
        flag = FLAGS["order"]
        raw = self.order
        if not isinstance(raw, str):
            raise CkptmapError(
                f"{flag}: expected a string such as {DEFAULT_ORDER!r}, found {raw!r}. "
                f"Pass the tokens tp, cp, ep, dp, pp joined by '-'."
            )
        tokens = [t.strip() for t in raw.strip().lower().split("-")]
        for t in tokens:
            if t not in _TOKENS:
                raise CkptmapError(
                    f"{flag}: expected '-'-separated tokens from tp, cp, ep, dp, pp, found "
                    f"{t!r} in {raw!r}. Use an order such as {DEFAULT_ORDER!r} "
                    f"(the first token varies fastest)."
                )
        dupes = sorted({t for t in tokens if tokens.count(t) > 1})
        if dupes:
            raise CkptmapError(
                f"{flag}: expected each of tp, cp, ep, dp, pp at most once, found "
                f"{', '.join(dupes)} repeated in {raw!r}. Remove the repetition, "
                f"e.g. {DEFAULT_ORDER!r}."
            )
        if "ep" in tokens:
            i, j = tokens.index("ep"), tokens.index("dp") if "dp" in tokens else None
            if j is None or abs(i - j) != 1:
                raise CkptmapError(
                    f"{flag}: 'ep' and 'dp' must be adjacent in the rank order (expert "
                    f"parallelism is carved out of data parallelism), found {raw!r}. Put 'ep' "
                    f"directly before 'dp', as in {DEFAULT_ORDER!r}."
                )
        for t in _TOKENS:
            if t not in tokens:
                if getattr(self, t) != 1:
                    raise CkptmapError(
                        f"{flag}: the order {raw!r} leaves out {t!r}, but {FLAGS[t]} is "
                        f"{getattr(self, t)}; a token may only be left out when its size is 1. "
                        f"Add {t!r} to the order (e.g. {DEFAULT_ORDER!r}) or check {FLAGS[t]}."
                    )
                tokens.append(t)
        sizes = {"tp": self.tp, "cp": self.cp, "pp": self.pp, "ep": self.ep,
                 "dp": self.dp // self.ep}
        radix = tuple((t, sizes[t]) for t in tokens)
        stride, s = {}, 1
        for t, size in radix:
            stride[t] = s
            s *= size
        object.__setattr__(self, "_radix", radix)
        object.__setattr__(self, "_stride", stride)
        object.__setattr__(self, "_ep_before_dp", tokens.index("ep") < tokens.index("dp"))

    def _build_layers(self) -> None:
        L, PP, VPP = self.num_layers, self.pp, self.vpp
        sl = self.stage_list
        if sl is None:
            per = PP * VPP
            if L % per:
                if VPP == 1:
                    raise CkptmapError(
                        f"{FLAGS['num_layers']} {L} is not divisible by {FLAGS['pp']} {PP}: "
                        f"without a stage list every pipeline stage holds the same number of "
                        f"layers. Give the layers per stage with {FLAGS['stage_list']} "
                        f"(e.g. {FLAGS['stage_list']} {_balanced(L, PP)}), or check "
                        f"{FLAGS['num_layers']} (noop layers included) and {FLAGS['pp']}."
                    )
                raise CkptmapError(
                    f"{FLAGS['num_layers']} {L} is not divisible by {FLAGS['pp']} {PP} x "
                    f"{FLAGS['vpp']} {VPP} = {per}: the interleaved schedule gives every "
                    f"virtual stage the same number of layers unless a stage list says "
                    f"otherwise. Give the layers of each of the {per} virtual stages in "
                    f"execution order with {FLAGS['stage_list']} (e.g. {FLAGS['stage_list']} "
                    f"{_balanced(L, per)}), or check {FLAGS['num_layers']} (noop layers "
                    f"included), {FLAGS['pp']} and {FLAGS['vpp']}."
                )
            counts = (L // per,) * per
        else:
            if VPP > 1 and len(sl) == PP:
                raise CkptmapError(
                    f"{FLAGS['stage_list']} {','.join(map(str, sl))} gives {PP} entries, one per "
                    f"pipeline stage, but with {FLAGS['vpp']} {VPP} that is ambiguous: it does "
                    f"not say how a stage's layers split between its {VPP} chunks. Give "
                    f"{PP * VPP} entries, the layers of each virtual stage in execution order "
                    f"(entry v*{PP}+p = chunk v of stage p), e.g. {FLAGS['stage_list']} "
                    f"{_balanced(sum(sl), PP * VPP)}."
                )
            want = PP * VPP
            if len(sl) != want:
                what = (f"{PP} entries (one per pipeline stage, {FLAGS['pp']} {PP})" if VPP == 1
                        else f"{want} entries (one per virtual stage, {FLAGS['pp']} {PP} x "
                             f"{FLAGS['vpp']} {VPP}, in execution order)")
                raise CkptmapError(
                    f"{FLAGS['stage_list']}: expected {what}, found {len(sl)}: "
                    f"{','.join(map(str, sl))}. Give exactly one layer count per "
                    f"{'stage' if VPP == 1 else 'virtual stage'} or check {FLAGS['pp']}"
                    f"{'' if VPP == 1 else ' and ' + FLAGS['vpp']}."
                )
            if sum(sl) != L:
                raise CkptmapError(
                    f"{FLAGS['stage_list']} {','.join(map(str, sl))} adds up to {sum(sl)} "
                    f"layers, but {FLAGS['num_layers']} is {L} (the MindSpeed layer count, "
                    f"noop layers included). Make the entries add up to {L} or fix "
                    f"{FLAGS['num_layers']}."
                )
            counts = sl
        bad = sorted(i for i in self.noop if not 0 <= i < L)
        if bad:
            raise CkptmapError(
                f"{FLAGS['noop']}: expected MindSpeed global layer ids in 0..{L - 1} "
                f"({FLAGS['num_layers']} {L}), found {', '.join(map(str, bad))}. Noop ids count "
                f"from 0 over all layers, noop layers included; fix {FLAGS['noop']} or "
                f"{FLAGS['num_layers']}."
                if L > 0 else
                f"{FLAGS['noop']}: noop layer ids {', '.join(map(str, bad))} were given but "
                f"{FLAGS['num_layers']} is not set (0). Pass {FLAGS['num_layers']} with the "
                f"MindSpeed layer count, noop layers included."
            )

        # counts[k] = layers of virtual stage k = v*PP + p, laid out in execution order.
        chunk_table: dict[tuple[int, int], tuple[int, ...]] = {}
        start = 0
        for k, n in enumerate(counts):
            v, p = divmod(k, PP)
            chunk_table[(p, v)] = tuple(range(start, start + n))
            start += n
        megatron_table: dict[tuple[int, int], tuple[int, ...]] = {}
        locate: list = [None] * L
        for (p, v), ids in chunk_table.items():
            kept = tuple(g for g in ids if g not in self.noop)
            megatron_table[(p, v)] = kept
            local_of = {g: n for n, g in enumerate(kept)}
            for g in ids:
                locate[g] = (p, v, local_of.get(g))
        object.__setattr__(self, "_chunk_table", chunk_table)
        object.__setattr__(self, "_megatron_table", megatron_table)
        object.__setattr__(self, "_locate_table", tuple(locate))

    # ------------------------------------------------------------------ ranks

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def expert_dp(self) -> int:
        """The expert-data-parallel size: the data-parallel ranks that hold one expert rank's experts (EP is
        carved out of DP). A buffer of expert parameters is sharded over that many ranks, not over DP."""
        return self.dp // self.ep

    def _check_coord(self, name: str, value: int, size: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            raise CkptmapError(
                f"{name} rank {value!r} is out of range: with {FLAGS[name]} {size} the {name} "
                f"rank must be in 0..{size - 1}. Check {FLAGS[name]} against the checkpoint."
            )

    def global_rank(self, *, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        """Global rank of the given coordinates; `dp` is the full data-parallel rank
        (expert rank included)."""
        self._check_coord("tp", tp, self.tp)
        self._check_coord("pp", pp, self.pp)
        self._check_coord("dp", dp, self.dp)
        self._check_coord("cp", cp, self.cp)
        if self._ep_before_dp:
            ep, dp_rest = dp % self.ep, dp // self.ep
        else:
            dp_rest, ep = dp % (self.dp // self.ep), dp // (self.dp // self.ep)
        st = self._stride
        return tp * st["tp"] + cp * st["cp"] + pp * st["pp"] + ep * st["ep"] + dp_rest * st["dp"]

    def coords(self, rank: int) -> dict:
        """Inverse of :meth:`global_rank`: ``{"tp", "cp", "ep", "dp", "pp"}`` with the full dp
        rank and its expert-parallel part ``ep`` (``dp % EP`` when ep precedes dp in the order,
        ``dp // (DP/EP)`` when it follows)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise CkptmapError(
                f"global rank {rank!r} is out of range: the layout {self.describe()} has "
                f"{self.world_size} ranks (0..{self.world_size - 1}). Check the parallel sizes "
                f"against the checkpoint's rank directories."
            )
        digits = {}
        rest = rank
        for token, size in self._radix:
            rest, digits[token] = divmod(rest, size)
        ep, dp_rest = digits["ep"], digits["dp"]
        dp = ep + self.ep * dp_rest if self._ep_before_dp else dp_rest + (self.dp // self.ep) * ep
        return {"tp": digits["tp"], "cp": digits["cp"], "ep": ep, "dp": dp, "pp": digits["pp"]}

    def _replicas(self) -> tuple[int, ...]:
        """Ascending offsets ``cp*stride(cp) + ep*stride(ep) + dp_rest*stride(dp)`` over every
        (cp, ep, dp_rest) digit combination: added to the rank of (tp, pp, dp 0, cp 0) they give
        every rank holding the same model shard.  Built once, DP*CP entries: a mixed-radix
        number grows with its slower digits, so listing each digit over the combinations of the
        faster ones keeps the list ascending without sorting."""
        if self._replica_offsets is None:
            offsets = [0]
            for token, size in self._radix:   # fastest digit first
                if token in ("cp", "ep", "dp") and size > 1:
                    stride = self._stride[token]
                    offsets = [j * stride + o for j in range(size) for o in offsets]
            object.__setattr__(self, "_replica_offsets", tuple(offsets))
        return self._replica_offsets

    def mp_rank_ranks(self, tp: int, pp: int, *, all_dp_cp: bool, ep: int | None = None) -> list[int]:
        """The global ranks that hold Megatron's mp_rank (`tp`, `pp`) — with `ep`, the expert
        folder (`tp`, `pp`, `ep`) — ascending: all of its data-/context-parallel (and, without `ep`,
        expert) replicas when `all_dp_cp`, otherwise only the zero-redundancy one (cp = 0 and the
        data-parallel rank outside expert parallelism 0, the smallest).  Computed directly:
        O(DP*CP) with `all_dp_cp`, O(1) without, independent of the world size."""
        self._check_coord("tp", tp, self.tp)
        self._check_coord("pp", pp, self.pp)
        base = tp * self._stride["tp"] + pp * self._stride["pp"]
        if ep is not None:
            self._check_coord("ep", ep, self.ep)
            base += ep * self._stride["ep"]
        if not all_dp_cp:
            return [base]
        if ep is None:
            return [base + o for o in self._replicas()]
        offsets = [0]
        for token, size in self._radix:   # fastest digit first, so the list stays ascending
            if token in ("cp", "dp") and size > 1:
                offsets = [j * self._stride[token] + o for j in range(size) for o in offsets]
        return [base + o for o in offsets]

    def model_parallel_rank(self, tp: int, pp: int) -> int:
        """Rank of (``tp``, ``pp``) in Megatron's model-parallel group (the TP x PP ranks of one
        data-/context-parallel replica, in global-rank order): the ``data_parallel_group_idx`` of
        that rank's distributed optimizer (``dp_group_idx_N`` in torch_dist bucket-space keys)."""
        self._check_coord("tp", tp, self.tp)
        self._check_coord("pp", pp, self.pp)
        return self._rank_in_group(tp=tp, pp=pp)

    def expert_model_parallel_rank(self, tp: int, pp: int, ep: int) -> int:
        """Rank of (``tp``, ``pp``, ``ep``) in Megatron's expert-model-parallel group (the TP x EP x PP
        ranks of one expert-data-parallel replica, in global-rank order): the ``data_parallel_group_idx``
        of that rank's expert optimizer (``chained_1.…dp_group_idx_N`` in torch_dist bucket-space keys)."""
        self._check_coord("tp", tp, self.tp)
        self._check_coord("pp", pp, self.pp)
        self._check_coord("ep", ep, self.ep)
        return self._rank_in_group(tp=tp, pp=pp, ep=ep)

    def _rank_in_group(self, **coords) -> int:
        """Rank of ``coords`` among the ranks that vary only those axes (the others 0), in global-rank
        order: global ranks are mixed-radix numbers, so the group's order is the same digits alone."""
        rank, scale = 0, 1
        for token, size in self._radix:   # fastest digit first
            if token in coords:
                rank += coords[token] * scale
                scale *= size
        return rank

    def global_expert(self, ep: int, local: int, num_experts: int) -> int:
        """Global id of local expert `local` of expert-parallel rank `ep` (Megatron gives each EP rank
        a contiguous block of num_experts / EP experts)."""
        self._check_coord("ep", ep, self.ep)
        if num_experts % self.ep:
            raise CkptmapError(f"{num_experts} experts cannot be split among {FLAGS['ep']} {self.ep}; check "
                               f"{FLAGS['ep']} and the model's number of experts")
        per = num_experts // self.ep
        if not 0 <= local < per:
            raise CkptmapError(f"local expert {local} of expert rank {ep} is out of range: with {num_experts} experts "
                               f"and {FLAGS['ep']} {self.ep} each rank holds {per} (0..{per - 1})")
        return ep * per + local

    def locate_expert(self, global_id: int, num_experts: int) -> tuple[int, int]:
        """(expert rank, local id) of global expert `global_id`."""
        if num_experts % self.ep or not 0 <= global_id < num_experts:
            raise CkptmapError(f"expert {global_id} does not exist with {num_experts} experts and {FLAGS['ep']} "
                               f"{self.ep}")
        return divmod(global_id, num_experts // self.ep)

    def ranks(self, *, all_dp_cp: bool) -> list[tuple[int, dict]]:
        """``(global rank, coords)`` ascending by rank: every rank when `all_dp_cp`, otherwise
        the zero-redundancy set dp = cp = 0 (one rank per (tp, pp)).  Linear in the ranks
        returned; per mp_rank, use :meth:`mp_rank_ranks` instead of filtering this list."""
        if all_dp_cp:
            return [(g, self.coords(g)) for g in range(self.world_size)]
        st_tp, st_pp = self._stride["tp"], self._stride["pp"]
        found = sorted(t * st_tp + p * st_pp for p in range(self.pp) for t in range(self.tp))
        return [(g, self.coords(g)) for g in found]

    def describe(self) -> str:
        """Short human-readable summary for messages, e.g. ``TP2 PP3 VPP2 DP1 CP1 EP1 L12``."""
        text = (f"TP{self.tp} PP{self.pp} VPP{self.vpp} DP{self.dp} CP{self.cp} EP{self.ep} "
                f"L{self.num_layers}")
        if self.stage_list is not None:
            text += f" stages {','.join(map(str, self.stage_list))}"
        if self.noop:
            text += f" noop {','.join(map(str, sorted(self.noop)))}"
        return text

    # ------------------------------------------------------------------ layers

    def _require_layers(self) -> None:
        if self.num_layers == 0:
            raise CkptmapError(
                f"this step needs the number of transformer layers, but the layout was built "
                f"without one ({FLAGS['num_layers']} 0). Pass {FLAGS['num_layers']} with the "
                f"MindSpeed layer count (noop layers included)."
            )

    def _check_chunk(self, pp: int, v: int) -> None:
        self._require_layers()
        self._check_coord("pp", pp, self.pp)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vpp:
            raise CkptmapError(
                f"virtual-pipeline chunk {v!r} is out of range: with {FLAGS['vpp']} {self.vpp} "
                f"the chunk index must be in 0..{self.vpp - 1}. Check {FLAGS['vpp']} against "
                f"the checkpoint (model0, model1, … entries)."
            )

    def chunks(self) -> list[tuple[int, int]]:
        """All ``(pp, v)`` pairs, stage-major: (0,0), (0,1), …, (1,0), … (the order in which a
        stage's file lists its chunks)."""
        return [(p, v) for p in range(self.pp) for v in range(self.vpp)]

    def chunk_layers(self, pp: int, v: int = 0) -> tuple[int, ...]:
        """MindSpeed global layer ids of chunk (pp, v), noop layers included, ascending."""
        self._check_chunk(pp, v)
        return self._chunk_table[(pp, v)]

    def megatron_layers(self, pp: int, v: int = 0) -> tuple[int, ...]:
        """Global ids of the layers Megatron stores in chunk (pp, v), noop layers excluded,
        ascending; the position in the tuple is the Megatron local layer number."""
        self._check_chunk(pp, v)
        return self._megatron_table[(pp, v)]

    def stored_layers(self) -> tuple[int, ...]:
        """Global ids of the layers that hold weights (noop layers excluded), ascending: the k-th is
        the model's k-th real layer, whatever the noop layers around it (how layers move between two
        layouts with different noop sets)."""
        self._require_layers()
        return tuple(g for g in range(self.num_layers) if g not in self.noop)

    def global_layer(self, pp: int, v: int, local: int) -> int:
        """MindSpeed global id of Megatron local layer `local` of chunk (pp, v)."""
        if type(pp) is int and type(v) is int and type(local) is int:  # called per tensor: a plain lookup
            kept = self._megatron_table.get((pp, v)) if self.num_layers else None
            if kept is not None and 0 <= local < len(kept):
                return kept[local]
        kept = self.megatron_layers(pp, v)
        if isinstance(local, bool) or not isinstance(local, int) or not 0 <= local < len(kept):
            noop_here = [g for g in self._chunk_table[(pp, v)] if g in self.noop]
            held = ", ".join(map(str, kept)) or "none"
            if noop_here:
                held += f"; noop layers {', '.join(map(str, noop_here))} are not stored"
            raise CkptmapError(
                f"Megatron layer number {local!r} of pipeline stage {pp}, chunk {v} is out of "
                f"range: with the layout {self.describe()} that chunk holds {len(kept)} "
                f"layer{'' if len(kept) == 1 else 's'} (MindSpeed global ids {held})"
                f"{f', numbered 0..{len(kept) - 1} on the Megatron side' if kept else ''}. Check {FLAGS['num_layers']}, "
                f"{FLAGS['pp']}, {FLAGS['vpp']}, {FLAGS['stage_list']} and {FLAGS['noop']} "
                f"against the checkpoint."
            )
        return kept[local]

    def locate_layer(self, global_id: int) -> tuple[int, int, int | None]:
        """``(pp, v, local)`` of MindSpeed global layer `global_id`; `local` is the Megatron
        local layer number, or None for a noop layer (no Megatron counterpart)."""
        self._require_layers()
        L = self.num_layers
        if isinstance(global_id, bool) or not isinstance(global_id, int) or not 0 <= global_id < L:
            raise CkptmapError(
                f"MindSpeed layer {global_id!r} is out of range: with {FLAGS['num_layers']} {L} "
                f"the global layer ids are 0..{L - 1}. Check {FLAGS['num_layers']} (noop layers "
                f"included) against the checkpoint."
            )
        return self._locate_table[global_id]
