"""Composed policies: a policy picks a schedule and a placement; this module turns them into ops and memory.

- `Schedule`: which scopes exist: prefill micro-batches (whole requests up to a token budget), decode micro-batches
  (a request count), and how many attention micro-batches one expert run gathers (`expert_batch`: 1 = per
  micro-batch, 0 = the whole step coalesced, k = module batching over k micro-batches).
- `Layout`: one phase's placement: where OP0 (QKV), OP1 (attention) and OP2 (O projection and router) run, which
  device holds the residual stream between layers (`home`), and per MoE layer which experts are resident in
  VRAM (E_R), copied over PCIe on every visit (E_M), or run on the CPU (E_C).
- `LayoutEmitter`: one walk over a step's layers that emits every op where the layout puts it and inserts a copy
  whenever data changes device (hidden states, QKV and attention outputs, new K/V, expert inputs and outputs).
- `gpu_static` / `cpu_static`: the static memory a placement implies (weights where their ops run, the KV cache
  where decode attention runs, fetch buffers, hidden states and workspace).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from sim.errors import SimInputError
from sim.op_table import OpTable
from sim.plan import OpKind, Payload, Phase, Plan, PlanBuilder, Scope, Stream, shard_bounds
from sim.policies import step_replay
from sim.policies.base import PlanContext
from sim.policies.layers import (
    CPU,
    CPU_EXPERTS,
    D2H,
    GPU,
    H2D,
    H2D_ACT,
    NDP,
    At,
    BatchSlice,
    LayerEmitter,
    activation_workspace_bytes,
    decode_slices,
    group_requests,
    prefill_slices,
)
from sim.specs import ModelSpec

DEVICE_STREAM = {"g": GPU, "c": CPU}
# GPU buffers a streamed KV cache rotates through (`Layout.kv_streamed`): a micro-batch's cache is copied into one
# while earlier micro-batches attend from the others. MoE-Gen's Mixtral initializer (EfficientMoE/MoE-Gen
# moe_gen/models/mixtral/Mixtral_Initializer.py @2561b09: num_k_buffer = num_v_buffer = 3, each sized for one
# attention micro-batch at the full context).
KV_STREAM_BUFFERS = 3
ON_CPU = frozenset({CPU, CPU_EXPERTS, NDP})  # host side: the DIMMs compute on host memory
REPLAY_ENV = "COXMOE_STEP_REPLAY"


def replay_enabled() -> bool:
    """Whether decode steps are replayed from an earlier step of the same shape (`step_replay`): $COXMOE_STEP_REPLAY
    on (or unset), or off to emit every step op by op (the same plan, slower: for checking the replay); anything
    else is refused by name."""
    value = os.environ.get(REPLAY_ENV, "").strip().lower()
    if value in ("", "on"):
        return True
    if value == "off":
        return False
    raise SimInputError(f"{REPLAY_ENV}={os.environ[REPLAY_ENV]!r}: use on or off")


def on_cpu(stream: Stream) -> bool:
    return stream in ON_CPU


Experts = tuple[tuple[int, ...], ...]  # per MoE layer, expert ids


def no_experts(m: ModelSpec) -> Experts:
    """No expert in any MoE layer (an empty E_R, E_M or E_C)."""
    return ((),) * m.num_moe_layers


def all_experts(m: ModelSpec) -> Experts:
    """Every expert of every MoE layer."""
    return (tuple(range(m.num_experts)),) * m.num_moe_layers


@dataclass(frozen=True)
class Layout:
    """One phase's placement. `placement` is x0 x1 x2 as three letters of g/c (QKV, attention, O projection and
    router); `home` is where the residual stream and the layer's combine live (embedding, dense FFN, shared
    expert, LM head); experts per MoE layer are `resident` (E_R), `fetched` (E_M) or `on_cpu` (E_C), and
    `cpu_lane` is the CPU stream that runs E_C (its own worker next to OP0-OP2's, or the same one)."""

    placement: str
    resident: Experts
    fetched: Experts
    on_cpu: Experts
    home: Stream = GPU
    cpu_lane: Stream = CPU_EXPERTS
    fetch_routed: bool = False  # copy only the E_M experts the step's tokens chose (else all of E_M)
    # per MoE layer, (expert, GPU shards, shards): the expert's tokens in `shards` parts, the first `GPU shards` on
    # the GPU and the rest on the CPU lane (an E_C expert split this way is fetched for its GPU share)
    splits: tuple[tuple[tuple[int, int, int], ...], ...] = ()
    on_ndp: Experts = ()  # per MoE layer, experts run on a near-memory DIMM tier (E_N; their weights live there)
    # decode micro-batches (indices) whose attention runs on the CPU over a host-memory KV cache while the others
    # attend where the placement says (the GPU): one attention batch shared by both devices
    attention_cpu_mbs: frozenset[int] = frozenset()
    # decode attention on the GPU reads a KV cache kept in host memory: each micro-batch's cache is copied into a
    # GPU buffer (one of KV_STREAM_BUFFERS) before its attention, and the step's new entries are written back
    kv_streamed: bool = False

    @property
    def streams(self) -> tuple[Stream, Stream, Stream]:
        return DEVICE_STREAM[self.placement[0]], DEVICE_STREAM[self.placement[1]], DEVICE_STREAM[self.placement[2]]

    def split_of(self, li: int) -> dict[int, tuple[int, int]]:
        """Layer `li`'s split experts: expert -> (GPU shards, shards)."""
        return {e: (g, n) for e, g, n in self.splits[li]} if self.splits else {}

    def fetched_for_gpu(self, li: int) -> tuple[int, ...]:
        """What crosses PCIe for layer `li`: E_M and the E_C experts split onto the GPU."""
        on_cpu = set(self.on_cpu[li])
        return self.fetched[li] + tuple(e for e in self.split_of(li) if e in on_cpu)

    @property
    def widest_fetch(self) -> int:
        return max((len(self.fetched_for_gpu(li)) for li in range(len(self.fetched))), default=0)


@dataclass(frozen=True)
class Schedule:
    """The micro-batches of each phase and how many of them one expert run gathers (0: all of a step's)."""

    prefill: list[np.ndarray]
    decode: list[np.ndarray]
    expert_batch: int = 0
    prefill_expert_batch: int | None = None  # prefill's, where it differs from `expert_batch`

    @classmethod
    def split(cls, ctx: PlanContext, prefill_tokens: int, decode_micro_batch: int, expert_batch: int = 0,
              prefill_expert_batch: int | None = None) -> Schedule:
        """Prefill in groups of whole requests of at most `prefill_tokens` prompt tokens; decode in groups of
        `decode_micro_batch` requests (0: the whole batch): `group_requests`' micro-batches."""
        prefill, decode, _ = group_requests(ctx, prefill_tokens, decode_micro_batch)
        return cls(prefill, decode, expert_batch, prefill_expert_batch)

    def groups(self) -> dict[str, list[np.ndarray]]:
        return {"prefill": self.prefill, "decode": self.decode}


# ---- static memory from placement ----------------------------------------------------------------------------

def gpu_static(ctx: PlanContext, pre: str, dec: str, mb_tokens: int, expert_tokens: int, resident: int,
               widest: int, kv_cpu_tokens: int = 0, kv_stream_tokens: int = 0) -> dict[str, int]:
    """VRAM a placement holds: non-expert weights of the ops placed on the GPU in either phase (embedding, LM head,
    norms (the final one included), routers, shared experts and dense FFNs always), `resident` experts per MoE
    layer, a double buffer of `widest` fetched experts, hidden states of `expert_tokens` (what one expert run
    gathers), the workspace of the largest micro-batch (`mb_tokens`), and the KV cache when decode attention runs on
    the GPU (less the `kv_cpu_tokens` entries of requests whose attention runs on the CPU instead), or, where that
    cache is streamed from host memory, KV_STREAM_BUFFERS buffers of one layer's `kv_stream_tokens` entries (the
    largest decode micro-batch at its longest context)."""
    m, wl, bpp = ctx.model, ctx.workload, ctx.model.bytes_per_param
    weights = (m.embedding_params + m.lm_head_params + m.final_norm_params + m.num_layers * m.norm_params_per_layer
               + m.num_moe_layers * (m.router_params + m.shared_expert_params)
               + (m.num_layers - m.num_moe_layers) * m.dense_ffn_params)
    up = m.attention_up_params  # MLA's up-projection: the attention's weights (OpWork.attention), not OP0's
    if "g" in (pre[0], dec[0]):
        weights += m.num_layers * (m.qkv_params - up)
    if up and "g" in (pre[1], dec[1]):
        weights += m.num_layers * up
    if "g" in (pre[2], dec[2]):
        weights += m.num_layers * m.o_proj_params
    per_resident, per_buffer = gpu_static_slopes(m)
    static = {
        "non_expert_weights": m.weight_param_bytes(weights),
        "resident_experts": resident * per_resident,
        "expert_fetch_buffers": widest * per_buffer,
        "hidden_states": 2 * expert_tokens * m.hidden_size * bpp,
        "workspace": activation_workspace_bytes(ctx, max(mb_tokens, 1)),
    }
    if dec[1] == "g" and kv_stream_tokens:
        static["kv_stream_buffers"] = KV_STREAM_BUFFERS * kv_stream_tokens * m.kv_bytes_per_token_layer
    elif dec[1] == "g":
        static["kv_cache"] = (wl.kv_tokens_total - kv_cpu_tokens) * m.kv_bytes_per_token
    return static


def gpu_static_slopes(model: ModelSpec) -> tuple[int, int]:
    """What one more resident expert per MoE layer and one more fetched expert (`widest`) add to `gpu_static`'s
    total, which is linear in both: a search sizes thousands of configurations from one call each and these."""
    return model.num_moe_layers * model.expert_bytes, 2 * model.expert_bytes


def cpu_static(ctx: PlanContext, pre: str, dec: str, kv_cpu_tokens: int = 0, kv_streamed: bool = False
               ) -> dict[str, int]:
    """DRAM a placement holds: every routed expert's weights (the copy E_M is fetched from and E_C runs on),
    hidden states of the whole prompt, QKV / O-projection and router weights where those ops run on the CPU,
    and the KV cache when decode attention runs on the CPU or streams it from here (or the `kv_cpu_tokens`
    entries of the requests that attend there while the others attend on the GPU)."""
    m, wl, bpp = ctx.model, ctx.workload, ctx.model.bytes_per_param
    static = {"expert_weights": m.routed_expert_bytes,
              "hidden_states": 2 * wl.prompt_tokens * m.hidden_size * bpp}
    cpu_weights = 0
    up = m.attention_up_params
    if "c" in (pre[0], dec[0]):
        cpu_weights += m.num_layers * (m.qkv_params - up)
    if up and ("c" in (pre[1], dec[1]) or kv_cpu_tokens):  # some requests attending on the CPU need it there too
        cpu_weights += m.num_layers * up
    if "c" in (pre[2], dec[2]):
        cpu_weights += m.num_layers * (m.o_proj_params + m.router_params)
    if cpu_weights:
        static["non_expert_weights"] = m.weight_param_bytes(cpu_weights)
    if dec[1] == "c" or kv_streamed:
        static["kv_cache"] = wl.kv_tokens_total * m.kv_bytes_per_token
    elif kv_cpu_tokens:
        static["kv_cache"] = kv_cpu_tokens * m.kv_bytes_per_token
    return static


@dataclass(frozen=True)
class _ExpertInputs:
    """Per micro-batch of an expert batch, what its experts wait for: hidden states on the GPU, on the E_C lane,
    and (residual on the CPU) at home."""

    gpu: tuple[int, ...]
    cpu: tuple[int, ...]
    home: tuple[int, ...]


class _WeightsReady:
    """The op an expert's weights wait for on the GPU: the layer's fetch for E_M (and experts swapped in)."""

    def __init__(self, fetched: set[int], fetch: int):
        self.fetched, self.fetch = fetched, fetch

    def __call__(self, expert: int) -> int:
        return self.fetch if expert in self.fetched else -1

    def many(self, experts: list[int]) -> list[int] | None:
        """`self(e)` for each of `experts` at once (as `LayerEmitter.experts` asks), or None when none waits."""
        fetched, fetch = self.fetched, self.fetch
        if fetch < 0 or not fetched:
            return None
        return [fetch if e in fetched else -1 for e in experts]


# ---- the emitter ---------------------------------------------------------------------------------------------

class LayoutEmitter(LayerEmitter):
    """Emits steps of a layout: OP0 and OP1 for every micro-batch first (so GPU and CPU pipeline across
    micro-batches), then OP2 and the router, then OP3 once per expert batch, split across E_R / E_M on the GPU
    and E_C on the CPU; E_M's weights are copied over PCIe into a double buffer (the copy for a layer waits until
    the layer two visits back is done with its half)."""

    def __init__(self, ctx: PlanContext, builder: PlanBuilder, kv_on_gpu: bool, expert_batch: int = 0,
                 kv_on_cpu: np.ndarray | None = None, prefill_expert_batch: int | None = None):
        super().__init__(ctx, builder)
        self.kv_on_gpu, self.expert_batch = kv_on_gpu, expert_batch
        self.prefill_expert_batch = expert_batch if prefill_expert_batch is None else prefill_expert_batch
        # per request, whether its KV cache is in host memory when that differs by request (a split attention)
        self.kv_on_cpu = kv_on_cpu
        self.layer_done: dict[int, int] = {}
        self.seq = 0  # (step, layer) visits so far: the fetch double buffer alternates on it
        self.prefill_end: tuple[int, ...] = ()
        self.scopes: list[Scope] = []
        self._scope_index: dict[tuple, int] = {}
        self._kv_holders: list[int] = []  # per streamed attention, in order, the last op using its GPU buffer
        self._kv_stored: dict[tuple[int, int], int] = {}  # (layer, micro-batch) -> its last write-back to host memory
        # decode-step replay (`step_replay`): the first step of each shape seen, by shape; the layouts shapes name
        # are held so their ids stay theirs
        self.replay = replay_enabled()
        self._recordings: dict[step_replay.StepShape, step_replay.Recording] = {}
        self._members_by_tokens: step_replay.MemberIndex | None = None
        self._layouts: list[Layout] = []
        self._moe_index = [self.m.moe_index(layer) if self.m.is_moe_layer(layer) else -1
                           for layer in range(self.m.num_layers + 1)]

    # ---- copies ------------------------------------------------------------------------------------------
    def move(self, src: Stream, dst: Stream, at: At, nbytes: int, payload: Payload, deps: tuple[int, ...],
             tokens: int) -> tuple[int, ...]:
        """What `dst` waits for to have data made on `src`: `deps` itself on the same device, else a copy."""
        if on_cpu(src) == on_cpu(dst):
            return deps
        return (self.xfer(D2H if on_cpu(dst) else H2D_ACT, at, nbytes, payload, deps, tokens),)

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self, slices: list[BatchSlice], phase: Phase, step: int, layout: Layout,
             entering: Experts | None = None, swap_bytes: tuple[int, ...] | None = None) -> None:
        """Emit one step; `entering` (re-stratification) lists, per MoE layer, experts copied into E_R first, and
        `swap_bytes` the bytes each layer's swap copy carries (default: the entering experts' weights; a sampled
        decode step carries its share of every step's swaps, see `coxmoe._Restratifier`). A decode step shaped
        like an earlier one is replayed from it (`step_replay`): the same ops as emitting it."""
        shape = self._replay_key(slices, phase, layout, entering, swap_bytes)
        if shape is None:
            self._emit_step(slices, phase, step, layout, entering, swap_bytes)
            return
        seen = self._recordings.get(shape)
        if seen is not None:  # a later step of a shape: replayed from its first, when that one can be
            template = seen.template(self._moe_index)
            if template is not None and step_replay.replay(template, slices, step, self.b, self.w, self.layer_done,
                                                           self.seq, self._member_index()):
                self.seq += self.m.num_layers
            else:  # a shape a replay cannot reproduce, or a step past the op limit (raised where emission raises)
                self._emit_step(slices, phase, step, layout, entering, swap_bytes)
            return
        if all(held is not layout for held in self._layouts):
            self._layouts.append(layout)
        self.recording = rec = step_replay.Recording(
            self.ops, len(self.ops), self.seq, step_replay.layer_done_pair(self.layer_done, self.seq),
            len(self.scopes), self._kv_state())
        try:
            self._emit_step(slices, phase, step, layout, entering, swap_bytes)
        finally:
            self.recording = None
        rec.close(self.layer_done, self.seq, len(self.scopes), self._kv_state())
        if len(self._recordings) >= step_replay.SHAPES_KEPT:
            self._recordings.pop(next(iter(self._recordings)))
        self._recordings[shape] = rec

    def _member_index(self) -> step_replay.MemberIndex:
        """The members replays gather by (expert, tokens), made on the first replay."""
        if self._members_by_tokens is None:
            self._members_by_tokens = step_replay.MemberIndex(self.w.expert, self._group_members, self.b,
                                                              self.m.num_experts)
        return self._members_by_tokens

    def prefill(self, slices: list[BatchSlice], layout: Layout, cache: dict | None = None) -> None:
        """`step` for the prefill. With `cache` (a search's: its candidates share a model, trace and workload), a
        prefill already emitted for the same layout, micro-batches and emitter settings is copied from it, its ops
        and the state it left, instead of emitted again (with replay off, or past the op limit, it is emitted)."""
        if cache is None or not self.replay or self.ops:
            self.step(slices, Phase.PREFILL, 0, layout)
            return
        key = (layout, id(self.ctx.trace), id(self.ctx.workload), tuple([s.requests.tobytes() for s in slices]),
               self.kv_on_gpu, self.prefill_expert_batch, None if self.kv_on_cpu is None else self.kv_on_cpu.tobytes())
        state = cache.get(key)
        if state is not None and state.restore(self):
            return
        self.step(slices, Phase.PREFILL, 0, layout)
        if len(cache) >= PREFILLS_KEPT:
            cache.pop(next(iter(cache)))
        cache[key] = _PrefillState(self)

    def _replay_key(self, slices: list[BatchSlice], phase: Phase, layout: Layout, entering: Experts | None,
                    swap_bytes: tuple[int, ...] | None) -> step_replay.StepShape | None:
        """A decode step's shape (`step_replay.StepShape`), or None when the step is emitted the ordinary way:
        prefill, a step with swap copies (experts entering E_R; an entering list with none in any layer emits what
        no list does), a layout whose split experts' shards depend on token counts or whose KV cache streams, and
        every step with replay off."""
        if (phase is not Phase.DECODE or not self.replay or swap_bytes is not None
                or (entering is not None and any(entering)) or any(layout.splits) or layout.kv_streamed
                or not slices):
            return None
        ld2, ld1 = step_replay.layer_done_pair(self.layer_done, self.seq)
        return step_replay.StepShape(
            id(layout), tuple([(s.mb, s.tokens, s.requests.size) for s in slices]), (ld2 >= 0, ld1 >= 0),
            step_replay.pattern_of(slices, self._expert_groups(len(slices), self.expert_batch)))

    def _kv_state(self) -> tuple[int, int]:
        return len(self._kv_holders), len(self._kv_stored)

    def _emit_step(self, slices: list[BatchSlice], phase: Phase, step: int, layout: Layout,
                   entering: Experts | None, swap_bytes: tuple[int, ...] | None) -> None:
        """`step`, op by op. A number here that varies between decode steps of one shape (`_replay_key`) must be
        recomputed by `step_replay.replay` too, as attention's KV entries, expert tokens and the routed copies
        (`RoutedCopy`) are; tests/test_step_replay.py compares the two ways on every composed policy."""
        m, w = self.m, self.w
        x0, x1, x2 = layout.streams
        home = layout.home
        expert_batch = self.prefill_expert_batch if phase is Phase.PREFILL else self.expert_batch
        ready: list[tuple[int, ...]] = [(self.op(OpKind.EMBED, home, At(phase, step, -1, s.mb), s.tokens, ()),)
                                        for s in slices]
        for layer in range(m.num_layers):
            moe = m.is_moe_layer(layer)
            li = m.moe_index(layer) if moe else -1
            fetched = layout.fetched_for_gpu(li) if moe else ()
            cpu_experts = layout.on_cpu[li] if moe else ()
            split = layout.split_of(li) if moe else {}
            ndp_experts = layout.on_ndp[li] if moe and layout.on_ndp else ()
            host_side = bool(cpu_experts or split or ndp_experts)  # hidden states needed in host memory
            fetch = -1
            if fetched and layout.fetch_routed:
                routed = sum(s.counts[li] for s in slices)
                fetched = tuple(e for e in fetched if routed[e])
            if fetched:
                fetch = self.xfer(H2D, At(phase, step, layer), len(fetched) * m.expert_bytes, Payload.EXPERT_WEIGHTS,
                                  (self.layer_done.get(self.seq - 2, -1),))
            attn_out = [self._front(phase, step, layer, s, ready[i], layout) for i, s in enumerate(slices)]
            to_gpu, to_cpu, to_home = [], [], []
            home_cpu = on_cpu(home)
            for i, s in enumerate(slices):  # OP2 and the router of every micro-batch, then OP3
                at = At(phase, step, layer, s.mb)
                o = self.op(OpKind.O_PROJ, x2, at, s.tokens, (attn_out[i],))
                if not moe:
                    deps = self.move(x2, home, at, w.hidden_bytes(s.tokens), Payload.ACTIVATIONS, (o,), s.tokens)
                    ready[i] = (self.op(OpKind.DENSE_FFN, home, at, s.tokens, deps),)
                    continue
                r = self.op(OpKind.ROUTER, x2, at, s.tokens, (o,))
                hidden = w.hidden_bytes(s.tokens)
                if home_cpu:  # the residual (and the shared expert) on the CPU; E_C reads the same copy
                    to_home.append(self.move(x2, home, at, hidden, Payload.ACTIVATIONS, (r,), s.tokens)[0])
                to_gpu.append(self.move(x2, GPU, at, hidden, Payload.ACTIVATIONS, (r,), s.tokens)[0]
                              if not home_cpu or layout.resident[li] or fetched or split else r)
                if home_cpu:
                    to_cpu.append(to_home[-1] if host_side else -1)
                else:
                    to_cpu.append(self.move(x2, layout.cpu_lane, at, hidden, Payload.ACTIVATIONS, (r,), s.tokens)[0]
                                  if host_side else (r if on_cpu(x2) else -1))
            if not moe:
                self.layer_done[self.seq] = ready[-1][0]
                self.seq += 1
                continue
            nbytes = (swap_bytes[li] if swap_bytes is not None else
                      len(entering[li]) * m.expert_bytes if entering else 0)
            if nbytes:  # swap-in copies share the H2D stream with E_M's fetch, into slots the layer's previous
                # visit must be done with (without it a swap could start steps early, while they were in use)
                fetch = self.xfer(H2D, At(phase, step, layer), nbytes, Payload.EXPERT_WEIGHTS,
                                  (fetch, self.layer_done.get(self.seq - m.num_layers, -1), *self.prefill_end))
            weights = _WeightsReady(set(fetched) | set(entering[li] if entering else ()), fetch)
            last_gpu = -1
            for group in self._expert_groups(len(slices), expert_batch):
                members = [slices[i] for i in group]
                if len(group) == 1 and len(slices) > 1 or expert_batch == 1:
                    at, scope = At(phase, step, layer, members[0].mb), -1
                elif len(group) == len(slices):
                    at, scope = At(phase, step, layer), -1
                else:  # module batching: one expert run over several micro-batches, scoped to their requests
                    at = At(phase, step, layer)
                    scope = self._scope(phase, step, np.concatenate([s.requests for s in members]))
                ins = _ExpertInputs(tuple(to_gpu[i] for i in group), tuple(to_cpu[i] for i in group),
                                    tuple(to_home[i] for i in group) if home_cpu else ())
                gpu_done, done = self._experts(at, layout, li, members, ins, layout.resident[li] + fetched,
                                               cpu_experts, weights, scope, split, ndp_experts)
                last_gpu = max(last_gpu, gpu_done)
                for i in group:
                    ready[i] = done
            self.layer_done[self.seq] = last_gpu
            self.seq += 1
        heads = [self.op(OpKind.LM_HEAD, home, At(phase, step, m.num_layers, s.mb), int(s.requests.size), ready[i])
                 for i, s in enumerate(slices)]
        if phase is Phase.PREFILL:  # a decode swap copy never runs inside the (unscaled) prefill
            self.prefill_end = tuple(heads)

    @staticmethod
    def _expert_groups(n: int, expert_batch: int) -> list[list[int]]:
        """Indices of the micro-batches each expert run gathers (`expert_batch` of them; 0: all)."""
        k = n if expert_batch <= 0 else expert_batch
        return [list(range(i, min(i + k, n))) for i in range(0, n, k)]

    def _scope(self, phase: Phase, step: int, requests: np.ndarray, shard: int = 0, shards: int = 1) -> int:
        """The index of the scope of these requests (and shard) at this step, one per group, shared by its
        layers."""
        key = (phase, step, requests.tobytes(), shard, shards)
        index = self._scope_index.get(key)
        if index is None:
            index = self._scope_index[key] = len(self.scopes)
            self.scopes.append(Scope(phase, step, requests, shard, shards))
        return index

    def _front(self, phase: Phase, step: int, layer: int, s: BatchSlice, ready: tuple[int, ...],
               layout: Layout) -> int:
        """OP0 and OP1 of one micro-batch with the copies between them; returns what OP2 waits for."""
        w = self.w
        x0, x1, x2 = layout.streams
        at = At(phase, step, layer, s.mb)
        deps = self.move(layout.home, x0, at, w.hidden_bytes(s.tokens), Payload.ACTIVATIONS, ready, s.tokens)
        q = self.op(OpKind.QKV, x0, at, s.tokens, deps)
        if phase is Phase.DECODE and s.mb in layout.attention_cpu_mbs:
            x1 = CPU
        (q,) = self.move(x0, x1, at, w.qkv_out_bytes(s.tokens), Payload.ACTIVATIONS, (q,), s.tokens)
        if phase is Phase.DECODE and layout.kv_streamed and x1 is GPU:
            a = self._streamed_attention(at, s, q, written_on_gpu=x0 is GPU)
        else:
            a = self.attention(x1, at, s, (q,))
        # store K/V where decode attention reads it: OP0 made them on x0 and they moved to x1 in its output, so
        # with OP0 and OP1 on two devices they are on both already
        if phase is Phase.PREFILL and (x0 is GPU) == (x1 is GPU):
            stored = self._kv_elsewhere(s, x1 is GPU)
            if stored:
                self.xfer(D2H if x1 is GPU else H2D_ACT, at, w.kv_bytes(stored), Payload.KV, (a,), stored)
        (a,) = self.move(x1, x2, at, w.attn_out_bytes(s.tokens), Payload.ACTIVATIONS, (a,), s.tokens)
        return a

    def _streamed_attention(self, at: At, s: BatchSlice, q: int, written_on_gpu: bool) -> int:
        """GPU attention over a KV cache in host memory: the micro-batch's past entries are copied into a GPU
        buffer once its user KV_STREAM_BUFFERS streamed attentions ago is done (and once the previous step's new
        entries of this layer and micro-batch reached host memory), attention reads them there, and this step's
        new entries, made on the GPU by OP0, are written back (made on the CPU, they are in host memory already)."""
        w, holders = self.w, self._kv_holders
        past = s.kv_read - s.tokens  # entries before this step's
        key = (at.layer, s.mb)
        held = holders[-KV_STREAM_BUFFERS] if len(holders) >= KV_STREAM_BUFFERS else -1
        load = self.xfer(H2D_ACT, at, w.kv_bytes(past), Payload.KV, (held, self._kv_stored.get(key, -1)), s.tokens)
        a = self.attention(GPU, at, s, (q, load))
        if written_on_gpu:
            a_or_store = self._kv_stored[key] = self.xfer(D2H, at, w.kv_bytes(s.tokens), Payload.KV, (a,), s.tokens)
        else:
            a_or_store = a
        holders.append(a_or_store)
        return a

    def _kv_elsewhere(self, s: BatchSlice, on_gpu: bool) -> int:
        """Prompt tokens of a prefill slice whose KV cache lives on the other device than its attention ran on."""
        if self.kv_on_cpu is None:
            return s.tokens if on_gpu != self.kv_on_gpu else 0
        lens = self.ctx.workload.prompt_lens[s.requests]
        cpu = self.kv_on_cpu[s.requests]
        return int(lens[cpu].sum()) if on_gpu else int(lens[~cpu].sum())

    def _experts(self, at: At, layout: Layout, li: int, members: list[BatchSlice], ins: _ExpertInputs,
                 gpu_experts: tuple[int, ...], cpu_experts: tuple[int, ...], weights: _WeightsReady,
                 scope: int, split: dict[int, tuple[int, int]], ndp_experts: tuple[int, ...] = ()
                 ) -> tuple[int, tuple[int, ...]]:
        """OP3 of one expert batch: the shared expert where the residual lives, E_R + E_M on the GPU, E_C on the
        CPU lane, a split expert's shards on each, and the outputs copied to the residual's device. Returns (last
        GPU op, what the next layer waits for)."""
        m, w = self.m, self.w
        counts = members[0].counts[li] if len(members) == 1 else sum(s.counts[li] for s in members)
        tokens = sum(s.tokens for s in members)
        gpu_list = tuple(e for e in gpu_experts if e not in split) if split else tuple(gpu_experts)
        cpu_list = tuple(e for e in cpu_experts if e not in split) if split else tuple(cpu_experts)
        gpu_tokens = int(counts[list(gpu_list)].sum()) if gpu_list else 0
        host = cpu_list + ndp_experts
        cpu_tokens = int(counts[list(host)].sum()) if host else 0  # E_C and E_N: host side
        requests = members[0].requests if len(members) == 1 else np.concatenate([s.requests for s in members])

        def run_split(stream: Stream, on_gpu: bool, deps: tuple[int, ...], last: int) -> tuple[int, int]:
            """The split experts' shards on one side: (last op, tokens)."""
            moved = 0
            for e, (g, n) in split.items():
                c = int(counts[e])
                for i in range(g) if on_gpu else range(g, n):
                    lo, hi = shard_bounds(c, i, n)
                    t = hi - lo
                    if t:
                        extra = (weights(e),) if on_gpu else ()
                        last = self._op(OpKind.EXPERT, stream, at.phase, at.step, at.layer, at.mb, t,
                                        w.expert(t), deps + extra, expert=e,
                                        scope=self._scope(at.phase, at.step, requests, i, n))
                        moved += t
            return last, moved

        if on_cpu(layout.home):
            last_home = max(ins.home)
            if m.shared_expert_intermediate_size:
                last_home = self._shared(layout.home, at, tokens, ins.home, scope)
            ran = self.experts(GPU, at, counts, gpu_list, ins.gpu, weights, scope=scope)
            ran, moved = run_split(GPU, True, ins.gpu, ran)
            down = -1
            if ran >= 0:  # the GPU experts' outputs join the residual on the CPU
                routed = min(gpu_tokens + moved, tokens)
                down = self.xfer(D2H, at, w.hidden_bytes(routed), Payload.ACTIVATIONS, (ran,), routed)
                if self.recording is not None:
                    self.recording.routed.append(step_replay.RoutedCopy(down, li, at.mb, gpu_list, tokens))
            ran_cpu = self.experts(layout.cpu_lane, at, counts, cpu_list, ins.cpu, scope=scope)
            ran_cpu, _ = run_split(layout.cpu_lane, False, ins.cpu, ran_cpu)
            ran_ndp = self.experts(NDP, at, counts, ndp_experts, ins.cpu, scope=scope)
            return ran, (last_home, down, ran_cpu, ran_ndp)
        last_gpu = max(ins.gpu)
        if m.shared_expert_intermediate_size:
            last_gpu = self._shared(layout.home, at, tokens, ins.gpu, scope)
        ran = self.experts(GPU, at, counts, gpu_list, ins.gpu, weights, scope=scope)
        ran, _ = run_split(GPU, True, ins.gpu, ran)
        last_gpu = max(last_gpu, ran)
        ran_cpu = self.experts(layout.cpu_lane, at, counts, cpu_list, ins.cpu, scope=scope)
        ran_cpu, moved = run_split(layout.cpu_lane, False, ins.cpu, ran_cpu)
        ran_ndp = self.experts(NDP, at, counts, ndp_experts, ins.cpu, scope=scope)
        back = ran_cpu
        if ran_cpu >= 0 or ran_ndp >= 0:  # E_C's (and E_N's) outputs back to the residual on the GPU
            routed = min(cpu_tokens + moved, tokens)
            back = self.xfer(H2D_ACT, at, w.hidden_bytes(routed), Payload.ACTIVATIONS, (ran_cpu, ran_ndp), routed)
            if self.recording is not None:
                self.recording.routed.append(step_replay.RoutedCopy(back, li, at.mb, host, tokens))
        return last_gpu, (last_gpu, back)

    def _shared(self, home: Stream, at: At, tokens: int, deps: tuple[int, ...], scope: int) -> int:
        return self._op(OpKind.SHARED_EXPERT, home, at.phase, at.step, at.layer, at.mb, tokens,
                        self.w.shared_expert(tokens), deps, scope=scope)


class _PrefillState:
    """A prefill's ops and what it left in its emitter and builder, to start another plan of the same search from
    (`LayoutEmitter.prefill`). The ops are shared, not copied: a plan's ops are not changed once built."""

    def __init__(self, emit: LayoutEmitter):
        b = emit.b
        self.ops = list(emit.ops)
        self.member_load, self.builder_step = b.member_load, b.step
        self.layer_done, self.seq, self.prefill_end = dict(emit.layer_done), emit.seq, emit.prefill_end
        self.scopes, self.scope_index = list(emit.scopes), dict(emit._scope_index)
        self.kv_holders, self.kv_stored = list(emit._kv_holders), dict(emit._kv_stored)
        self.members = [dict(table) for table in emit._members]
        self.table: OpTable | None = None  # the ops' columns, read out once for every plan that starts here

    def restore(self, emit: LayoutEmitter) -> bool:
        """Start `emit` (with no ops yet) where this prefill left its own; False when the prefill would cross the
        builder's op limit (its largest guard), which emitting it raises."""
        b = emit.b
        if emit.ops or len(self.ops) - 1 + self.member_load >= b.max_ops:
            return False
        emit.ops.extend(self.ops)
        if self.table is None:
            self.table = OpTable.from_ops(self.ops)
        b.prefix = self.table
        b.member_load, b.step = self.member_load, self.builder_step
        emit.layer_done, emit.seq, emit.prefill_end = dict(self.layer_done), self.seq, self.prefill_end
        emit.scopes, emit._scope_index = list(self.scopes), dict(self.scope_index)
        emit._kv_holders, emit._kv_stored = list(self.kv_holders), dict(self.kv_stored)
        emit._members = [dict(table) for table in self.members]
        return True


PREFILLS_KEPT = 4  # prefills a search keeps (its candidates share a few prefill configurations)


def compose_plan(ctx: PlanContext, policy: str, knobs: dict, schedule: Schedule, prefill: Layout, decode: Layout,
                 static: dict[str, dict[str, int]], kv_on_gpu: bool, expert_kernels: str = "per_expert") -> Plan:
    """The plan of a schedule and one layout per phase: prefill, then every decode step the context plans."""
    emit = LayoutEmitter(ctx, ctx.builder(), kv_on_gpu=kv_on_gpu, expert_batch=schedule.expert_batch,
                         prefill_expert_batch=schedule.prefill_expert_batch)
    emit.step(prefill_slices(ctx, schedule.prefill), Phase.PREFILL, 0, prefill)
    for step in ctx.steps():
        slices = decode_slices(ctx, step, schedule.decode)
        if slices:
            emit.step(slices, Phase.DECODE, step, decode)
    return Plan(policy, knobs, ctx.model, ctx.system, ctx.workload, emit.b.result(), static, schedule.groups(),
                decode_scale=ctx.decode_scale, scopes=emit.scopes, expert_kernels=expert_kernels)
