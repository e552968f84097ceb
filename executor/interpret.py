"""Run a plan's ops, in plan order, on real tensors: the executor's numerics, device-agnostic.

Each op acts on the requests its (phase, step, micro-batch) names; expert ops gather every token of that
scope routed to their expert, run one GEMM chain, and scatter the weighted result back (a grouped expert op
does that for each of its members in order). The residual add of
a layer's FFN happens when the request's next op needs its hidden state. Copies move no data here (one
device); `executor.run` times the same ops on their streams. Plans must hold every decode step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from executor import kernels as K
from executor.reference import Outputs
from executor.weights import ModelWeights
from sim.plan import Op, OpKind, Phase, Plan, member_ops
from sim.plan_verify import padded_positions
from traces import RoutingTrace


@dataclass
class _Request:
    """What one request carries through the current step."""

    positions: torch.Tensor
    rows: np.ndarray
    h: torch.Tensor
    new: dict[str, torch.Tensor] = field(default_factory=dict)
    attn_out: torch.Tensor | None = None
    h_attn: torch.Tensor | None = None
    x: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    y: torch.Tensor | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # experts on two devices add into y at once
    pending: list = field(default_factory=list)  # (scope batch, offset, rows): expert outputs to add into y


class _ScopeBatch:
    """The tokens of one expert scope, concatenated once: every expert op of the scope gathers from here."""

    def __init__(self, sts: list[_Request], dev: str):
        self.x = torch.cat([st.x.to(dev) for st in sts])
        self.ids = torch.cat([st.ids.to(dev) for st in sts])
        self.gates = torch.cat([st.gates.to(dev) for st in sts]).float()
        self.y = torch.zeros(self.x.shape, dtype=torch.float32, device=dev)
        self.lock = threading.Lock()
        self.routed: K.RoutedTokens | None = None  # tokens grouped by expert, built by the scope's first expert op
        offset = 0
        for st in sts:
            n = st.x.shape[0]
            st.pending.append((self, offset, n))
            offset += n


class BuiltOnce:
    """Values built once per key by the first thread that asks for it, outside the table's lock, so one stream
    gathering a large scope (its tokens copied to a device) does not hold up another stream asking for a
    different key; threads asking for the same key wait for that build. A failed build is raised in every thread
    that waited for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Build] = {}

    def get(self, key: Hashable, build: Callable[[], Any], drop: Callable[[Hashable], bool] | None = None) -> Any:
        """The value for `key`, built by `build()` if no thread has started it; `drop(k)` says which other keys
        are done with when a new key is added (their values are let go)."""
        with self._lock:
            entry = self._entries.get(key)
            mine = entry is None
            if mine:
                if drop is not None:
                    for k in [k for k in self._entries if drop(k)]:
                        del self._entries[k]
                entry = self._entries[key] = _Build()
        if mine:
            try:
                entry.value = build()
            except BaseException as exc:
                entry.error = exc
                raise
            finally:
                entry.ready.set()
            return entry.value
        entry.ready.wait()
        if entry.error is not None:
            raise RuntimeError(f"building {key!r} failed in another thread") from entry.error
        return entry.value


@dataclass
class _Build:
    ready: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None


class PlanInterpreter:
    """Executes ops one by one; `outputs` holds each request's last-layer hidden states per step."""

    def __init__(self, plan: Plan, weights: ModelWeights, trace: RoutingTrace,
                 weights_on: dict[str, ModelWeights] | None = None, device_of: dict | None = None):
        if plan.decode_scale != 1.0:
            raise ValueError("the executor needs a plan with every decode step (it was built with decode_sample)")
        trace.require_prompt_rows("the executor")  # it routes every prompt token as the trace says
        if weights.spec.num_layers != plan.model.num_layers:
            raise ValueError(f"weights have {weights.spec.num_layers} layers, the plan {plan.model.num_layers}")
        self.plan, self.mw, self.trace = plan, weights, trace
        self.weights_on = {"cpu": weights, **(weights_on or {})}
        self.device_of = device_of or {}
        wl = plan.workload
        K.check_run_memory(weights.spec, wl, weights.dtype, "executing this plan")
        self.cache = K.KVCache(weights.spec, int((wl.prompt_lens + wl.gen_lens).max()), weights.dtype)
        self.state: dict[int, _Request] = {}
        self.outputs: Outputs = {}
        self._scopes = BuiltOnce()  # expert scopes' gathered tokens, per (step, layer, scope, device, stream)

    def scope(self, op: Op) -> list[int]:
        """Requests an op works on (`Plan.scope_of`: its explicit scope, else its micro-batch or all), those
        still generating at a decode step."""
        return [int(r) for r in self.plan.scope_of(op)[0]]

    def run(self) -> Outputs:
        for op in self.plan.ops:
            self.step(op)
        return self.outputs

    def _finalize(self, st: _Request) -> None:
        if st.y is not None:
            for batch, offset, n in st.pending:
                y = batch.y
                if y.is_cuda:  # made on another stream (a second modelled GPU sharing this device): keep its memory
                    # from reuse until this stream's read of it has run (the batch may be dropped before then)
                    y.record_stream(torch.cuda.current_stream(y.device))
                st.y += y[offset:offset + n].to(st.y.device)
            st.pending = []
            st.h = st.h_attn + st.y.to(device=st.h_attn.device, dtype=st.h_attn.dtype)
            st.y = None

    def step(self, op: Op) -> None:
        kind = op.kind
        if kind is OpKind.COPY:
            return
        spec = self.mw.spec
        dev = self.device_of.get(op.stream, "cpu")
        mw = self.weights_on[dev]
        requests = self.scope(op)
        if kind is OpKind.EMBED:
            self._embed(op, requests, mw, dev)
            return
        if kind is OpKind.LM_HEAD:
            sts = [self.state[r] for r in requests]
            for st in sts:
                self._finalize(st)
            if sts:  # the scope's hidden states leave the device in one copy (one per request was a sync each)
                hidden = torch.cat([st.h.to(dev) for st in sts]).cpu().split([st.h.shape[0] for st in sts])
                for r, h in zip(requests, hidden, strict=True):
                    self.outputs[(r, str(op.phase), op.step)] = h
            if sts:  # one GEMM over the scope's last tokens
                K.lm_head(mw, torch.cat([st.h[-1:].to(dev) for st in sts]))
            return
        lw = mw.layers[op.layer]
        if kind is OpKind.EXPERT:
            self._expert(op, lw, requests, dev)
            return
        sts = [self.state[r] for r in requests]
        if not sts:
            return
        sizes = [st.positions.shape[0] for st in sts]
        # GEMM-shaped ops run once over the scope's tokens (as the profile measures them), then split back.
        if kind is OpKind.QKV:
            for st in sts:
                self._finalize(st)
            h = torch.cat([st.h.to(dev) for st in sts])
            new = K.qkv(spec, lw, h, torch.cat([st.positions for st in sts]).to(dev))
            for st, parts in zip(sts, zip(*(v.split(sizes) for v in new.values()), strict=True), strict=True):
                st.new = dict(zip(new.keys(), parts, strict=True))
        elif kind is OpKind.ATTENTION:
            # Per request: each attends over its own cache. A plan may split one attention by where its cache
            # lives (FlexGen's mixed KV): the part that claims the request first computes it whole; the others
            # (the same math, with no dependency between the parts, so possibly at the same time on another
            # stream) find it claimed. The claim is taken under the request's lock: checked and cleared apart, both
            # parts could append the new tokens to the cache.
            for r, st in zip(requests, sts, strict=True):
                with st.lock:
                    claimed, st.new = st.new, {}
                if claimed:
                    new = {k: v.to(dev) for k, v in claimed.items()}
                    st.attn_out = K.attention(spec, lw, new, self.cache, r, op.layer)
        elif kind is OpKind.O_PROJ:
            # The residual add, the norm and the experts' accumulator over the scope at once, then views per request
            # (per request they were three small kernels each: on a GPU, launches that dwarf the GEMM at batch 256).
            h_attn, x, y = K.o_proj_op(lw, torch.cat([st.h.to(dev) for st in sts]),
                                       torch.cat([st.attn_out.to(dev) for st in sts]))
            for st, ha, xs, ys in zip(sts, h_attn.split(sizes), x.split(sizes), y.split(sizes), strict=True):
                st.h_attn, st.x, st.y = ha, xs, ys
        elif kind is OpKind.ROUTER:
            li = spec.moe_index(op.layer)
            rows = np.concatenate([st.rows for st in sts])
            ids = torch.from_numpy(self.trace.experts[rows, li].astype(np.int64)).to(dev)
            gates = self.trace.gate_weights
            weights = K.router_weights(lw, torch.cat([st.x.to(dev) for st in sts]), ids,
                                       None if gates is None else torch.from_numpy(gates[rows, li]).to(dev))
            for st, i, g in zip(sts, ids.split(sizes), weights.split(sizes), strict=True):
                st.ids, st.gates = i, g
        elif kind in (OpKind.SHARED_EXPERT, OpKind.DENSE_FFN):
            out = K.ffn(lw.shared if kind is OpKind.SHARED_EXPERT else lw.dense,
                        torch.cat([st.x.to(dev) for st in sts])).float().split(sizes)
            for st, o in zip(sts, out, strict=True):
                with st.lock:
                    st.y += o.to(st.y.device)

    def _embed(self, op: Op, requests: list[int], mw: ModelWeights, dev: str) -> None:
        """The scope's tokens embedded in one look-up (one per request was a kernel launch each on a GPU), then
        split into each request's state: its positions, its trace rows and its hidden states (views)."""
        if not requests:
            return
        wl = self.plan.workload
        reqs = np.asarray(requests, dtype=np.int64)
        if op.phase is Phase.PREFILL:
            lens = wl.prompt_lens[reqs].astype(np.int64)
            starts = np.repeat(np.cumsum(lens) - lens, lens)
            positions = np.arange(int(lens.sum()), dtype=np.int64) - starts
            rows = self.trace.prefill_rows(reqs)
        else:  # the scope holds the requests still generating: one token each
            lens = np.ones(reqs.size, dtype=np.int64)
            positions = wl.prompt_lens[reqs].astype(np.int64) + op.step - 1
            rows = self.trace.decode_rows(op.step, reqs)
        pos = torch.from_numpy(positions)
        ids = K.token_ids(torch.from_numpy(np.repeat(reqs, lens)), pos, mw.spec.vocab_size)
        hidden = mw.embed[ids.to(dev)]
        sizes = lens.tolist()
        for r, p, rw, h in zip(requests, pos.split(sizes), np.split(rows, np.cumsum(lens)[:-1]), hidden.split(sizes),
                               strict=True):
            self.state[r] = _Request(p, rw, h)

    def _expert(self, op: Op, lw, requests: list[int], dev: str) -> None:
        """For each expert the op runs (`op.expert`, or a grouped op's members in order): gather the scope's tokens
        routed to it (the op's shard of them), one GEMM chain, weighted scatter-add back."""
        # CPU workers share a scope's batch (under its lock); each GPU stream has its own, so modelled GPUs that
        # share one real device never read a batch another CUDA stream is still filling.
        key = (op.phase, op.step, op.layer, op.micro_batch, op.scope, dev, "cpu" if dev == "cpu" else op.stream)
        batch = self._scopes.get(key, lambda: _ScopeBatch([self.state[r] for r in requests], dev),
                                 drop=lambda k: k[:2] != key[:2] or k[2] < op.layer)  # earlier layers are done
        with batch.lock:
            if batch.routed is None:
                batch.routed = K.RoutedTokens(batch.x, batch.ids, self.mw.spec.num_experts)
        _, shard, shards = self.plan.scope_of(op)
        # Two CPU workers compute their experts at once; only the add into the scope's accumulator is serialised.
        # A grouped op runs its member experts one after another, as the ops it stands for would.
        for member in member_ops(op):
            routed = K.expert_scatter(lw, member.expert, batch.x, batch.ids, batch.gates, batch.y, shard, shards,
                                      batch.routed, batch.lock)
            if routed != member.tokens and not padded_positions(self.plan, member, routed):
                raise ValueError(f"plan op {op.id} runs expert {member.expert} on {member.tokens} tokens; the trace "
                                 f"routes {routed} of its scope there")
