"""Run a plan's ops, in plan order, on real tensors: the executor's numerics, device-agnostic.

Each op acts on the requests its (phase, step, micro-batch) names; expert ops gather every token of that
scope routed to their expert, run one GEMM chain, and scatter the weighted result back. The residual add of
a layer's FFN happens when the request's next op needs its hidden state. Copies move no data here (one
device); `executor.run` times the same ops on their streams. Plans must hold every decode step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from executor import kernels as K
from executor.reference import Outputs
from executor.weights import ModelWeights
from sim.plan import Op, OpKind, Phase, Plan
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


class PlanInterpreter:
    """Executes ops one by one; `outputs` holds each request's last-layer hidden states per step."""

    def __init__(self, plan: Plan, weights: ModelWeights, trace: RoutingTrace,
                 weights_on: dict[str, ModelWeights] | None = None, device_of: dict | None = None):
        if plan.decode_scale != 1.0:
            raise ValueError("the executor needs a plan with every decode step (it was built with decode_sample)")
        if weights.spec.num_layers != plan.model.num_layers:
            raise ValueError(f"weights have {weights.spec.num_layers} layers, the plan {plan.model.num_layers}")
        self.plan, self.mw, self.trace = plan, weights, trace
        self.weights_on = {"cpu": weights, **(weights_on or {})}
        self.device_of = device_of or {}
        wl = plan.workload
        self.cache = K.KVCache(weights.spec, int((wl.prompt_lens + wl.gen_lens).max()), weights.dtype)
        self.state: dict[int, _Request] = {}
        self.outputs: Outputs = {}

    def scope(self, op: Op) -> list[int]:
        """Requests an op works on: its micro-batch (or all), those still generating at a decode step."""
        wl = self.plan.workload
        group = (self.plan.micro_batches[str(op.phase)][op.micro_batch] if op.micro_batch >= 0
                 else np.arange(wl.batch))
        if op.phase is Phase.DECODE:
            group = group[wl.gen_lens[group] > op.step]
        return [int(r) for r in group]

    def run(self) -> Outputs:
        for op in self.plan.ops:
            self.step(op)
        return self.outputs

    def _finalize(self, st: _Request) -> None:
        if st.y is not None:
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
            wl = self.plan.workload
            for r in requests:
                if op.phase is Phase.PREFILL:
                    positions = torch.arange(int(wl.prompt_lens[r]))
                    rows = self.trace.prefill_rows(np.array([r]))
                else:
                    positions = torch.tensor([int(wl.prompt_lens[r]) + op.step - 1])
                    rows = self.trace.decode_rows(op.step, np.array([r]))
                self.state[r] = _Request(positions, rows, K.embed(mw, r, positions.to(dev)))
            return
        if kind is OpKind.LM_HEAD:
            for r in requests:
                st = self.state[r]
                self._finalize(st)
                self.outputs[(r, str(op.phase), op.step)] = st.h.cpu()
                K.lm_head(mw, st.h[-1:].to(dev))
            return
        lw = mw.layers[op.layer]
        if kind is OpKind.EXPERT:
            self._expert(op, lw, requests, dev)
            return
        for r in requests:
            st = self.state[r]
            if kind is OpKind.QKV:
                self._finalize(st)
                st.new = K.qkv(spec, lw, st.h.to(dev), st.positions.to(dev))
            elif kind is OpKind.ATTENTION:
                # A plan may split one attention by where its cache lives (FlexGen's mixed KV): the first part
                # computes it whole here; the others are the same math, merged on real devices.
                if st.new:
                    new = {k: v.to(dev) for k, v in st.new.items()}
                    st.attn_out = K.attention(spec, lw, new, self.cache, r, op.layer, st.positions.to(dev))
                    st.new = {}
            elif kind is OpKind.O_PROJ:
                st.h_attn = st.h.to(dev) + K.o_proj(lw, st.attn_out.to(dev))
                st.x = K.rms_norm(st.h_attn, lw.ffn_norm)
                st.y = torch.zeros(st.x.shape, dtype=torch.float32, device=dev)
            elif kind is OpKind.ROUTER:
                li = spec.moe_index(op.layer)
                st.ids = torch.from_numpy(self.trace.experts[st.rows, li].astype(np.int64)).to(dev)
                gates = self.trace.gate_weights
                st.gates = K.router_weights(lw, st.x.to(dev), st.ids, None if gates is None else
                                            torch.from_numpy(gates[st.rows, li]).to(dev))
            elif kind in (OpKind.SHARED_EXPERT, OpKind.DENSE_FFN):
                out = K.ffn(lw.shared if kind is OpKind.SHARED_EXPERT else lw.dense, st.x.to(dev)).float()
                with st.lock:
                    st.y += out.to(st.y.device)

    def _expert(self, op: Op, lw, requests: list[int], dev: str) -> None:
        """Gather the scope's tokens routed to `op.expert`, one GEMM chain, weighted scatter-add back."""
        picks = []
        for r in requests:
            st = self.state[r]
            t, j = torch.nonzero(st.ids.cpu() == op.expert, as_tuple=True)
            if t.numel():
                picks.append((st, t, j))
        routed = sum(t.numel() for _, t, _ in picks)
        if routed != op.tokens:
            raise ValueError(f"plan op {op.id} runs expert {op.expert} on {op.tokens} tokens; the trace routes "
                             f"{routed} of its scope there")
        if not picks:
            return
        x = torch.cat([st.x[t.to(st.x.device)].to(dev) for st, t, _ in picks])
        out = K.expert(lw, op.expert, x).float()
        start = 0
        for st, t, j in picks:
            n = t.numel()
            g = st.gates[t.to(st.gates.device), j.to(st.gates.device)].float().to(st.y.device)
            part = out[start:start + n].to(st.y.device) * g[:, None]
            with st.lock:
                st.y.index_add_(0, t.to(st.y.device), part)
            start += n
