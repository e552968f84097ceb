"""Building blocks that emit the ops of a transformer layer; policies decide placement and order.

A layer is split the CoX-MoE way: `attention_front` emits OP0 (QKV) and OP1 (attention, on the GPU or the CPU,
with the copies that crossing devices needs); `attention_back_and_ffn` emits OP2 (O projection) and the FFN:
router plus the routed experts that received tokens (OP3: one grouped op per run of them with the same
dependencies), the shared expert, or a dense FFN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import compress, groupby
from operator import itemgetter
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sim.cost import OpWork, Work
from sim.plan import Op, OpKind, Payload, Phase, PlanBuilder, Stream
from sim.policies.base import PlanContext

if TYPE_CHECKING:
    from sim.policies.step_replay import Recording

GPU, CPU, CPU_EXPERTS, H2D, H2D_ACT, D2H = (Stream.GPU, Stream.CPU, Stream.CPU_EXPERTS, Stream.H2D, Stream.H2D_ACT,
                                            Stream.D2H)
NDP = "ndp"  # the near-memory tier's stream (sim/topology.py), when the system has one
CPU_STREAMS = frozenset({Stream.CPU, Stream.CPU_EXPERTS})  # a copy there is a host memcpy (read + write)


def copy_traffic(stream: str, nbytes: int) -> int:
    """Memory traffic of a copy of `nbytes` on `stream`: the bytes moved, twice on a CPU stream (a host memcpy reads
    and writes them)."""
    return 2 * nbytes if stream in CPU_STREAMS else nbytes


def split_by_tokens(requests: np.ndarray, lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Consecutive groups of whole requests with at most `token_budget` tokens (at least one request each)."""
    groups: list[np.ndarray] = []
    current: list[int] = []
    total = 0
    for r in requests.tolist():
        n = int(lengths[r])
        if current and total + n > token_budget:
            groups.append(np.asarray(current, dtype=np.int64))
            current, total = [], 0
        current.append(r)
        total += n
    if current:
        groups.append(np.asarray(current, dtype=np.int64))
    return groups


def split_by_count(requests: np.ndarray, size: int) -> list[np.ndarray]:
    """Groups of `size` requests (the last may be smaller); size <= 0 means one group."""
    if size <= 0 or size >= requests.size:
        return [requests]
    return [requests[i:i + size] for i in range(0, requests.size, size)]


def group_requests(ctx: PlanContext, prefill_tokens: int,
                   decode_micro_batch: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Prefill and decode micro-batches of the workload, and the most tokens any of them holds."""
    wl = ctx.workload
    requests = np.arange(wl.batch)
    prefill = split_by_tokens(requests, wl.prompt_lens, prefill_tokens)
    decode = split_by_count(requests, decode_micro_batch)
    max_tokens = max(max(int(wl.prompt_lens[g].sum()) for g in prefill), max(g.size for g in decode))
    return prefill, decode, max_tokens


# Expert GEMMs over many tokens are tiled: intermediates for this many tokens at a time. [assumed] a workspace
# estimate (memory only, no time): runtimes tile at their own sizes (vLLM's fused_moe at VLLM_FUSED_MOE_CHUNK_SIZE,
# tens of thousands of tokens), and no policy's feasibility in the paper grid turns on it.
EXPERT_CHUNK_TOKENS = 8192


def activation_workspace_bytes(ctx: PlanContext, tokens: int, requests: int | None = None) -> int:
    """GPU buffers for one micro-batch in flight: hidden states and QKV/attention outputs of its `tokens`,
    expert intermediates tiled at EXPERT_CHUNK_TOKENS, and fp32 logits of its last tokens (`requests`).
    [assumed] estimates, memory only: four hidden-width buffers a token (the residual stream, its normed copy, a
    layer's output and one spare) and logits in fp32, as samplers upcast them."""
    m = ctx.model
    requests = min(tokens, ctx.workload.batch) if requests is None else requests
    per_token = 4 * m.hidden_size + m.qkv_out_width + m.attn_out_width
    dense = m.dense_intermediate_size if m.first_dense_layers else 0  # a size no layer uses buffers nothing
    ffn = 2 * m.top_k * m.expert_intermediate_size + 2 * max(m.shared_expert_intermediate_size, dense)
    chunk = min(tokens, EXPERT_CHUNK_TOKENS)
    return (tokens * per_token + chunk * ffn) * m.bytes_per_param + requests * m.vocab_size * 4


Deps = int | tuple[int, ...]
# (slice, where, tokens per expert, router op, shared-expert op) -> what the next layer waits for
RoutedExperts = Callable[["BatchSlice", "At", np.ndarray, int, int], Deps]


def as_deps(dep: Deps) -> tuple[int, ...]:
    """One op id or several, as a deps tuple (negative ids are dropped when the op is added)."""
    return dep if isinstance(dep, tuple) else (dep,)


class At(NamedTuple):
    """Where an op sits in the schedule: phase, step, layer and micro-batch (-1: the whole batch)."""

    phase: Phase
    step: int
    layer: int
    mb: int = -1


_FLOPS, _BYTES = itemgetter(2), itemgetter(3)  # of a member (expert, tokens, flops, bytes)


def _extras(ready: Callable[[int], int], experts: list[int]) -> list[int] | None:
    """Per expert, the op its weights wait for (-1: none), or None when none waits for any."""
    many = getattr(ready, "many", None)
    extras = many(experts) if many is not None else [max(ready(e), -1) for e in experts]
    return extras if extras is not None and max(extras) >= 0 else None


class LayerEmitter:
    """Emits ops into a PlanBuilder for one model and routing trace."""

    recording: Recording | None = None  # set while a decode step is emitted as a replay template (step_replay)

    def __init__(self, ctx: PlanContext, builder: PlanBuilder):
        self.ctx = ctx
        self.m = ctx.model
        self.w: OpWork = ctx.work
        self.b = builder
        self.ops = builder.ops
        w = self.w
        self._work = {OpKind.EMBED: w.embed, OpKind.QKV: w.qkv, OpKind.O_PROJ: w.o_proj, OpKind.ROUTER: w.router,
                      OpKind.EXPERT: w.expert, OpKind.SHARED_EXPERT: w.shared_expert, OpKind.DENSE_FFN: w.dense_ffn,
                      OpKind.LM_HEAD: w.lm_head}
        # Grouped ops' members, each stored once: a plan repeats few of them (Qwen3-30B-A3B at B=4096, full decode:
        # 1.57 M members, 20 k distinct), and each copy held a tuple and two large ints (about 136 bytes); per expert,
        # its tokens -> the member (`_group_members`)
        self._members: list[dict[int, tuple[int, int, int, int]]] = [{} for _ in range(max(self.m.num_experts, 1))]

    def _op(self, kind: OpKind, stream: Stream, phase: Phase, step: int, layer: int, mb: int, tokens: int,
            work: Work, deps: tuple[int, ...], expert: int = -1, kv_tokens: int = 0, scope: int = -1) -> int:
        """Append an op directly (this is the hot path of plan building); negative deps are dropped."""
        op_id = self.b.next_id(step)
        self.ops.append(Op(op_id, kind, stream, phase, step, layer, mb, tokens, work[0], work[1],
                           tuple([d for d in deps if d >= 0]), expert, Payload.NONE, kv_tokens, (), (), scope))
        return op_id

    def op(self, kind: OpKind, stream: Stream, at: At, tokens: int, deps: tuple[int, ...], expert: int = -1) -> int:
        """A GEMM-shaped op (QKV, O-proj, router, expert, shared expert, dense FFN, embed, LM head)."""
        return self._op(kind, stream, at.phase, at.step, at.layer, at.mb, tokens, self._work[kind](tokens), deps,
                        expert)

    def attention(self, stream: Stream, at: At, s: BatchSlice, deps: tuple[int, ...]) -> int:
        return self._op(OpKind.ATTENTION, stream, at.phase, at.step, at.layer, at.mb, s.tokens,
                        self.w.attention(s.tokens, s.kv_attended, s.kv_read, at.phase is Phase.PREFILL), deps,
                        kv_tokens=s.kv_read)

    def xfer(self, stream: str, at: At, nbytes: int, payload: Payload, deps: tuple[int, ...],
             tokens: int = 0) -> int:
        """A copy over PCIe (`h2d`, `h2d_act`, `d2h`), or a host memcpy on a CPU stream (pinned staging)."""
        op_id = self.b.next_id(at.step)
        self.ops.append(Op(op_id, OpKind.COPY, stream, at.phase, at.step, at.layer, at.mb, tokens, 0,
                           copy_traffic(stream, nbytes), tuple([d for d in deps if d >= 0]), -1, payload, 0, (), ()))
        return op_id

    def copy(self, stream: Stream, phase: Phase, step: int, layer: int, mb: int, nbytes: int, payload: Payload,
             deps: tuple[int, ...], tokens: int = 0) -> int:
        return self.xfer(stream, At(phase, step, layer, mb), nbytes, payload, deps, tokens)

    def experts(self, stream: str, at: At, counts: np.ndarray | list[int], experts: np.ndarray | list[int] | tuple,
                deps: tuple[int, ...], ready: Callable[[int], int] | None = None, scope: int = -1) -> int:
        """The listed experts that received tokens (over `scope`'s tokens when one is named), in order; returns
        the last op (or -1 if none ran). Consecutive experts with the same dependencies form one grouped op
        (`Op.members`): only later work waits for them, on the last, so the group ends when its last expert
        would, and the plan holds one op instead of one per expert (the engine runs the members in turn where the
        stream shares its resources). `ready(e)` names the op expert e's weights wait for (-1: none); a `ready`
        with a `many(ids)` method answers for a list of experts at once (no call per expert). The hot loop of
        plan building: each op is appended as `_op` would, with look-ups hoisted."""
        loads = counts.tolist() if isinstance(counts, np.ndarray) else [int(c) for c in counts]  # plain ints
        ids = experts.tolist() if isinstance(experts, np.ndarray) else experts
        run = list(compress(map(int, ids), map(loads.__getitem__, ids)))  # those with tokens (C-level passes)
        n = len(run)
        if not n:
            return -1
        ts = list(map(loads.__getitem__, run))
        base = tuple([d for d in deps if d >= 0])
        extras = None if ready is None else _extras(ready, run)
        if extras is None:  # one run, one set of dependencies
            spans = [(0, n, base)]
        else:  # a new run wherever the extra dependency changes (runs found in C: `groupby`)
            spans, lo = [], 0
            for extra, same in groupby(extras):
                hi = lo + len(list(same))
                spans.append((lo, hi, base if extra < 0 else base + (extra,)))
                lo = hi
        b = self.b
        first = b.next_id(at.step)  # the builder's guards, once: every op here is at the same step
        last = first + len(spans) - 1
        grouped = sum([hi - lo for lo, hi, _ in spans if hi - lo > 1]) if len(spans) < n else 0
        b.reserve(last, grouped)
        if self.recording is not None and grouped:
            self.recording.member_calls.append(grouped)
        append, work, expert_kind = self.ops.append, self.w.expert, OpKind.EXPERT
        phase, step, layer, mb, none = at.phase, at.step, at.layer, at.mb, Payload.NONE
        for op_id, (lo, hi, op_deps) in enumerate(spans, first):
            if hi - lo == 1:
                t = ts[lo]
                flops, nbytes, _ = work(t)
                append(Op(op_id, expert_kind, stream, phase, step, layer, mb, t, flops, nbytes, op_deps, run[lo], none,
                          0, (), (), scope))
                continue
            tokens = ts[lo:hi]
            members = self._group_members(run[lo:hi], tokens)
            append(Op(op_id, expert_kind, stream, phase, step, layer, mb, sum(tokens), sum(map(_FLOPS, members)),
                      sum(map(_BYTES, members)), op_deps, -1, none, 0, (), (), scope, members))
        return last

    def _group_members(self, experts: Sequence[int], tokens: list[int]) -> tuple[tuple[int, int, int, int], ...]:
        """The members (expert, tokens, FLOPs, bytes) of a grouped op, each the plan's one stored copy: looked up in
        its expert's table by its tokens in one C-level pass (ids are in 0..E-1, as the counts they index), made only
        for a member the plan has not seen. 130 ns a member where an int key tokens * E + expert in one table took
        260 (each key a new int, and a None test per member; members are tuples, so `all` finds a miss)."""
        tables = self._members
        found = tuple(map(dict.get, map(tables.__getitem__, experts), tokens))
        if all(found):
            return found
        work, made, new = self.w.expert, list(found), []
        for i, member in enumerate(made):
            if member is None:
                e, t = experts[i], tokens[i]
                flops, nbytes, _ = work(t)
                made[i] = tables[e][t] = (e, t, flops, nbytes)
                new.append(made[i])
        self.b.members.extend(new)  # so that reading the plan into columns finds them (`OpTable.from_ops`)
        return tuple(made)

    def embed(self, phase: Phase, step: int, mb: int, tokens: int, dep: Deps = -1) -> int:
        return self._op(OpKind.EMBED, GPU, phase, step, -1, mb, tokens, self.w.embed(tokens), as_deps(dep))

    def lm_head(self, phase: Phase, step: int, mb: int, tokens: int, dep: Deps) -> int:
        return self._op(OpKind.LM_HEAD, GPU, phase, step, self.m.num_layers, mb, tokens, self.w.lm_head(tokens),
                        as_deps(dep))

    def attention_front(self, phase: Phase, step: int, layer: int, mb: int, tokens: int, kv_attended: int,
                        kv_read: int, attention_on: Stream, kv_on_cpu: bool, dep: Deps) -> int:
        """OP0 on the GPU, then OP1; returns the op after which the attention output is on the GPU."""
        qkv = self._op(OpKind.QKV, GPU, phase, step, layer, mb, tokens, self.w.qkv(tokens), as_deps(dep))
        attn_work = self.w.attention(tokens, kv_attended, kv_read, phase is Phase.PREFILL)
        if attention_on is CPU:
            down = self.copy(D2H, phase, step, layer, mb, self.w.qkv_out_bytes(tokens), Payload.ACTIVATIONS,
                             (qkv,), tokens)
            attn = self._op(OpKind.ATTENTION, CPU, phase, step, layer, mb, tokens, attn_work, (down,),
                            kv_tokens=kv_read)
            return self.copy(H2D, phase, step, layer, mb, self.w.attn_out_bytes(tokens), Payload.ACTIVATIONS,
                             (attn,), tokens)
        attn = self._op(OpKind.ATTENTION, GPU, phase, step, layer, mb, tokens, attn_work, (qkv,),
                        kv_tokens=kv_read)
        if kv_on_cpu:
            # The cache lives in host memory: store this micro-batch's new K/V there (it does not block OP2).
            self.copy(D2H, phase, step, layer, mb, self.w.kv_bytes(tokens), Payload.KV, (attn,), tokens)
        return attn

    def attention_back_and_ffn(self, phase: Phase, step: int, layer: int, mb: int, tokens: int,
                               counts: np.ndarray | None, front: Deps,
                               expert_deps: Callable[[int], int] | None = None) -> int:
        """OP2 and the FFN on the GPU; `counts` are the layer's tokens per expert. Returns the last op."""
        at = At(phase, step, layer, mb)
        o = self.op(OpKind.O_PROJ, GPU, at, tokens, as_deps(front))
        return self.ffn(at, tokens, counts, (o,), expert_deps)

    def ffn(self, at: At, tokens: int, counts: np.ndarray | None, deps: tuple[int, ...],
            expert_deps: Callable[[int], int] | None = None) -> int:
        """The FFN on the GPU after `deps`: the router, shared expert and the experts that received tokens
        (`counts`; grouped, see `experts`), or a dense FFN. Returns the last op. `tokens` may count padded
        positions (FlexGen): the dense FFN, the router's gate, the shared expert and a dense model's FFN in one-expert
        form are GEMMs over every position; routed experts see just the real tokens, whose routing the trace holds."""
        if not self.m.is_moe_layer(at.layer):
            return self.op(OpKind.DENSE_FFN, GPU, at, tokens, deps)
        router = last = self.op(OpKind.ROUTER, GPU, at, tokens, deps)
        if self.m.shared_expert_intermediate_size:
            last = self.op(OpKind.SHARED_EXPERT, GPU, at, tokens, (router,))
        assert counts is not None
        if not self.m.has_router:  # a dense FFN in one-expert form (OPT) runs over every position, padded ones too
            counts = np.full(1, tokens, dtype=np.int64)
        ran = self.experts(GPU, at, counts, np.flatnonzero(counts).tolist(), (router,), expert_deps)
        return ran if ran >= 0 else last


    def through_layers(self, slices: list[BatchSlice], routed: RoutedExperts) -> None:
        """Every slice through every layer, micro-batch by micro-batch, with embedding, attention, O-projection,
        router, shared expert and dense FFNs on the GPU; `routed(s, at, counts, router, shared)` emits an MoE
        layer's routed experts wherever the policy places them and returns what the next layer waits for."""
        for s in slices:
            last: Deps = self.embed(s.phase, s.step, s.mb, s.tokens)
            for layer in range(self.m.num_layers):
                last = self._layer(s, layer, last, routed)
            self.lm_head(s.phase, s.step, s.mb, int(s.requests.size), last)

    def layer_by_layer(self, slices: list[BatchSlice], routed: RoutedExperts,
                       layer_start: Callable[[int], None]) -> None:
        """`through_layers`, layer-major: every slice through layer 0, then every slice through layer 1, ...
        (FlexGen's zig-zag), with `layer_start(layer)` called before a layer's first op (a policy emits there what
        the layer's micro-batches share, such as its experts' fetch)."""
        lasts: list[Deps] = [self.embed(s.phase, s.step, s.mb, s.tokens) for s in slices]
        for layer in range(self.m.num_layers):
            layer_start(layer)
            lasts = [self._layer(s, layer, last, routed) for s, last in zip(slices, lasts, strict=True)]
        for s, last in zip(slices, lasts, strict=True):
            self.lm_head(s.phase, s.step, s.mb, int(s.requests.size), last)

    def _layer(self, s: BatchSlice, layer: int, last: Deps, routed: RoutedExperts) -> Deps:
        """Slice `s` through one layer after `last`; returns what the next layer waits for."""
        front = self.attention_front(s.phase, s.step, layer, s.mb, s.tokens, s.kv_attended, s.kv_read, GPU, False,
                                     last)
        counts = s.layer_counts(self.ctx, layer)
        if counts is None:
            return self.attention_back_and_ffn(s.phase, s.step, layer, s.mb, s.tokens, None, front)
        at = At(s.phase, s.step, layer, s.mb)
        o_proj = self.op(OpKind.O_PROJ, GPU, at, s.tokens, (front,))
        router = shared = self.op(OpKind.ROUTER, GPU, at, s.tokens, (o_proj,))
        if self.m.shared_expert_intermediate_size:
            shared = self.op(OpKind.SHARED_EXPERT, GPU, at, s.tokens, (router,))
        return routed(s, at, counts, router, shared)


class BatchSlice:
    """The requests one micro-batch runs at one step, with its attention sizes and expert loads."""

    __slots__ = ("phase", "step", "mb", "requests", "tokens", "kv_attended", "kv_read", "counts")

    def __init__(self, phase: Phase, step: int, mb: int, requests: np.ndarray, tokens: int, kv_attended: int,
                 kv_read: int, counts: np.ndarray):
        """`tokens` may count padded positions (FlexGen); `counts` route the real tokens only."""
        self.phase, self.step, self.mb, self.requests = phase, step, mb, requests
        self.tokens, self.kv_attended, self.kv_read, self.counts = tokens, kv_attended, kv_read, counts

    def layer_counts(self, ctx: PlanContext, layer: int) -> np.ndarray | None:
        return self.counts[ctx.model.moe_index(layer)] if ctx.model.is_moe_layer(layer) else None


def prefill_slices(ctx: PlanContext, groups: list[np.ndarray]) -> list[BatchSlice]:
    """Prefill of each group of requests: every prompt token, causal attention within its own prompt."""
    out = []
    for mb, reqs in enumerate(groups):
        s = ctx.workload.prompt_lens[reqs].astype(np.int64)
        counts = ctx.trace.prefill_counts(reqs)
        out.append(BatchSlice(Phase.PREFILL, 0, mb, reqs, int(s.sum()), int((s * (s + 1) // 2).sum()),
                              int(s.sum()), counts))
    return out


def all_slices(ctx: PlanContext, prefill_groups: list[np.ndarray], decode_groups: list[np.ndarray]) -> list[BatchSlice]:
    """Every prefill micro-batch, then every decode micro-batch of every step the plan emits, in that order."""
    slices = prefill_slices(ctx, prefill_groups)
    for step in ctx.steps():
        slices += decode_slices(ctx, step, decode_groups)
    return slices


def decode_slices(ctx: PlanContext, step: int, groups: list[np.ndarray]) -> list[BatchSlice]:
    """Decode step `step` (1-based) of each group: one token per request still generating."""
    out = []
    wl = ctx.workload
    table = ctx.decode_counts(groups)
    for mb, reqs in enumerate(groups):
        active = reqs[wl.gen_lens[reqs] > step]
        if active.size == 0:
            continue
        kv = int((wl.prompt_lens[active].astype(np.int64) + step).sum())
        counts = (table[step - 1, mb].astype(np.int64) if table is not None
                  else ctx.trace.expert_counts(ctx.trace.decode_rows(step, active)))
        out.append(BatchSlice(Phase.DECODE, step, mb, active, int(active.size), kv, kv, counts))
    return out
