"""The executor's CPU expert paths (executor/cpu_experts.py): every fused path against the plain bf16 math."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch

from executor import cpu_experts as C
from executor import kernels as K
from executor.weights import LayerWeights, random_weights
from sim.errors import SimInputError

H, F_, E = 64, 96, 4


def _layer(seed: int = 0) -> LayerWeights:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.bfloat16) * 0.05

    return LayerWeights(attn={}, attn_norm=torch.ones(H), ffn_norm=torch.ones(H), w1=rnd(E, F_, H),
                        w3=rnd(E, F_, H), w2=rnd(E, H, F_))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


needs_bf16 = pytest.mark.skipif(not C.onednn_bf16(), reason="this CPU has no oneDNN bf16 (AVX512-BF16 or AMX)")
needs_int8 = pytest.mark.skipif(not C.onednn_int8(), reason="this torch build has no oneDNN quantised linear")


@needs_bf16
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_prepacked_bf16_with_fused_gate_up_matches_the_plain_path(tokens):
    lw = _layer()
    x = torch.randn(tokens, H, dtype=torch.bfloat16)
    packed = C.CpuExperts(lw.w1, lw.w3, lw.w2, "bf16", "onednn", packed_tokens=(1, 64))  # packed at every size
    for e in range(E):
        want = K.expert(lw, e, x)
        got = packed(e, x)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert _rel(got, want) < 1e-2, f"expert {e}: {_rel(got, want):.2e}"


@needs_bf16
def test_bf16_calls_outside_the_packed_band_take_the_plain_weights(monkeypatch):
    """The packed layout is used for token counts in `packed_tokens` only; other calls compute the reference's
    three GEMMs (bit-identical to the plain backend) and pack nothing."""
    lw = _layer()
    experts = C.CpuExperts(lw.w1, lw.w3, lw.w2, "bf16", "onednn", packed_tokens=(4, 8))
    plain = C.CpuExperts(lw.w1, lw.w3, lw.w2, "bf16", "plain")
    monkeypatch.delenv(C.ENV_PACKED_TOKENS, raising=False)
    assert plain.packed_tokens == C.EVERY_CALL  # the default: every call on the packed copy
    assert C.CpuExperts(lw.w1, lw.w3, lw.w2, "bf16", "onednn").packed_tokens == C.EVERY_CALL
    monkeypatch.setenv(C.ENV_PACKED_TOKENS, "24:128")
    assert C.CpuExperts(lw.w1, lw.w3, lw.w2, "bf16", "onednn").packed_tokens == (24, 128)
    assert C.describe("onednn") == "onednn packed 24:128" and C.describe("plain") == "plain"
    for tokens in (3, 9):
        x = torch.randn(tokens, H, dtype=torch.bfloat16)
        assert torch.equal(experts(0, x), plain(0, x))
    assert not experts._packed
    x = torch.randn(6, H, dtype=torch.bfloat16)
    assert _rel(experts(1, x), plain(1, x)) < 1e-2 and set(experts._packed) == {1}


@needs_int8
@pytest.mark.parametrize("backend", ["plain", "auto"])
def test_int8_experts_stay_within_their_stated_tolerance_of_bf16(backend):
    """Per-channel int8 weights and per-token int8 activations: relative error under 5% (3.5% measured on
    Mixtral-8x7B's expert shapes, benchmarks/hf_moe_block.py)."""
    lw = _layer()
    x = torch.randn(32, H, dtype=torch.bfloat16)
    int8 = C.CpuExperts(lw.w1, lw.w3, lw.w2, "int8", backend)
    errors = [_rel(int8(e, x), K.expert(lw, e, x)) for e in range(E)]
    assert max(errors) < 0.05, errors
    assert min(errors) > 0  # it really ran in int8


def test_row_quantisation_round_trips_within_half_a_step():
    # seeded: unseeded draws put the share of ties past 1% about once in 40 runs (0-1.0%, mean 0.25%, 40 seeds)
    t = torch.randn(50, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    t[3] = 0  # an all-zero row keeps scale 1
    q, scale = C.quantize_rows(t)
    assert float(scale[3]) == 1.0 and int(q[3].abs().max()) == 0
    assert int(q.abs().max()) == 127
    assert torch.all((q.float() * scale - t.float()).abs() <= scale / 2 + 1e-6)
    u8, scale_u8 = C.quantize_rows_u8(t)
    assert torch.equal(scale, scale_u8)
    diff = u8.to(torch.int16) - 128 - q.to(torch.int16)
    assert int(diff.abs().max()) <= 1  # ties round half up instead of half to even
    assert float((diff != 0).float().mean()) < 0.01


@pytest.mark.parametrize("shards", [1, 3])
def test_tokens_grouped_once_give_the_same_expert_outputs(shards):
    """RoutedTokens (one sort per scope) selects exactly the (token, slot) pairs and order nonzero gives."""
    lw = _layer()
    lw.cpu_experts = C.CpuExperts(lw.w1, lw.w3, lw.w2, "bf16", "plain")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, H, generator=g, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(20)])
    ids[:, 0] = 2  # one busy expert
    gates = torch.softmax(torch.randn(20, 2, generator=g), dim=-1)
    routed = K.RoutedTokens(x, ids, E)
    for e in range(E):
        for shard in range(shards):
            a, b = torch.zeros(20, H), torch.zeros(20, H)
            n1 = K.expert_scatter(lw, e, x, ids, gates, a, shard, shards)
            n2 = K.expert_scatter(lw, e, x, ids, gates, b, shard, shards, routed, threading.Lock())
            assert n1 == n2 and torch.equal(a, b)
    assert sum(routed.rows(e).stop - routed.rows(e).start for e in range(E)) == ids.numel()


@pytest.mark.parametrize("text", ["24", "a:b", "128:24", "-1:5", "1:2:3"])
def test_a_malformed_packed_band_is_named(monkeypatch, text):
    monkeypatch.setenv(C.ENV_PACKED_TOKENS, text)
    with pytest.raises(SimInputError, match=C.ENV_PACKED_TOKENS):
        C.packed_tokens_band()


def test_unknown_or_unavailable_backends_are_named(monkeypatch):
    with pytest.raises(SimInputError, match="unknown CPU expert backend"):
        C.backend("fast")
    with pytest.raises(SimInputError, match="precision"):
        C.CpuExperts(*(torch.zeros(1, 2, 2),) * 3, precision="int2")
    # on whatever CPU runs the test: a CPU without oneDNN bf16, and an install without IPEX
    monkeypatch.setattr(C, "onednn_bf16", lambda: False)
    monkeypatch.setattr(C, "_ipex", lambda: None)
    with pytest.raises(SimInputError, match="use 'plain'"):
        C.backend("onednn")
    with pytest.raises(SimInputError, match="not installed"):
        C.backend("ipex")
    assert C.backend("auto") == "plain"
    monkeypatch.setattr(C, "onednn_bf16", lambda: True)
    assert C.backend("auto") == C.backend("onednn") == "onednn"


def test_backend_follows_the_environment(monkeypatch):
    monkeypatch.setenv(C.ENV_BACKEND, "plain")
    assert C.backend() == "plain"
    monkeypatch.setenv(C.ENV_BACKEND, "AUTO")
    assert C.backend() == ("onednn" if C.onednn_bf16() else "plain")
    monkeypatch.setenv(C.ENV_BACKEND, "bogus")
    with pytest.raises(SimInputError, match="COXMOE_CPU_EXPERTS"):
        C.backend()


@needs_int8
def test_each_expert_is_packed_once_even_from_two_threads():
    lw = _layer()
    experts = C.CpuExperts(lw.w1, lw.w3, lw.w2, "int8", "plain")
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(experts.pack(1))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(p is got[0] for p in got) and set(experts._packed) == {1}


@pytest.mark.parametrize("precision, low, high", [("bf16", 0.0, 2e-2),
                                                   pytest.param("int8", 1e-4, 0.1, marks=needs_int8)])
def test_a_plan_runs_end_to_end_near_the_reference(paper_system, precision, low, high):
    """The whole timed executor with the CPU expert path set per precision: outputs within the path's tolerance
    of the plain bf16 reference (int8 measurably different from it)."""
    from executor.reference import reference_forward
    from executor.run import execute_plan
    from sim.policies import PlanContext, make_policy
    from sim.specs import ModelSpec
    from sim.workload import Workload
    from traces import SynthConfig, generate_trace

    spec = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=6, top_k=2, expert_intermediate_size=96)
    prompts, gens = np.array([5, 3, 7]), np.array([3, 1, 2])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "zipf:1.0",
                                       0.2, 1), prompts, gens)
    workload = Workload(prompts, gens)
    plan = make_policy("cpu-only", {}).build(PlanContext(spec, paper_system, workload, trace))
    weights = random_weights(spec, seed=3)
    want = reference_forward(weights, trace, workload)
    K.use_cpu_experts(weights, precision)
    got = execute_plan(plan, weights, trace, use_cuda=False).outputs
    worst = max(_rel(got[k], want[k]) for k in want)
    assert low <= worst < high, worst
    assert all(lw.cpu_experts is None or lw.cpu_experts.precision == precision for lw in weights.layers)


def test_the_ipex_backend_runs_the_fused_expert_through_ipex_optimize(monkeypatch):
    """IPEX is not installable next to torch 2.13 (its last release needs 2.8), so its plumbing is checked with
    a stand-in whose `optimize` returns the modules unchanged: the fused gate/up and down modules compute the
    expert."""
    calls = []

    class FakeIpex:
        @staticmethod
        def optimize(model, dtype, inplace):
            calls.append(dtype)
            return model

    monkeypatch.setattr(C, "_ipex", lambda: FakeIpex)
    lw = _layer()
    x = torch.randn(5, H, dtype=torch.bfloat16)
    experts = C.CpuExperts(lw.w1, lw.w3, lw.w2, "bf16", "ipex")
    assert experts.backend == "ipex"
    assert _rel(experts(2, x), K.expert(lw, 2, x)) < 1e-2 and calls == [torch.bfloat16]


@needs_int8
def test_the_int8_epilogue_computes_the_same_compiled_or_eager():
    """INT8's middle step (token scales, SiLU x up, per-token quantisation), fused by torch.compile where a C++
    compiler exists: within one quantisation step of the eager ops, same scales."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(9, 2 * F_, generator=g, dtype=torch.bfloat16)
    scale = torch.rand(9, 1, generator=g) + 0.5
    a[4] = 0  # a token whose hidden state is all zero keeps scale 1
    want_u8, want_scale = C.scale_silu_mul_quantize(a, scale, F_)
    got_u8, got_scale = C.int8_epilogue()(a, scale, F_)
    assert got_u8.dtype == torch.uint8 and int((got_u8.int() - want_u8.int()).abs().max()) <= 1
    assert torch.allclose(got_scale, want_scale, rtol=1e-5) and float(got_scale[4]) == 1.0


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile needs a C++ compiler")
def test_warming_the_int8_epilogue_leaves_no_compile_for_a_timed_run(monkeypatch):
    """A decode expert often gets one token: a dynamic-shape compile still specialises that size, so the warm-up
    compiles it too, and no later token count compiles again (it had cost 0.13 s inside the first timed step)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv(C.ENV_FUSE, "compile")
    torch._dynamo.reset()  # an earlier test may have compiled it already: this one must see its own compiles
    fresh = C._Epilogue()
    monkeypatch.setattr(C, "int8_epilogue", lambda: fresh)
    before = counters["stats"]["unique_graphs"]
    C.warm_int8_epilogue()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # the warm-up compiled (a silent fall-back to eager ops would compile nothing)
    for tokens in (1, 2, 5, 64):
        fresh(torch.zeros(tokens, 2 * F_, dtype=torch.bfloat16), torch.ones(tokens, 1), F_)
    assert counters["stats"]["unique_graphs"] == graphs
    assert fresh.fn is not C.scale_silu_mul_quantize  # still the compiled function after the timed calls


def test_the_fuse_mode_is_checked(monkeypatch):
    monkeypatch.setenv(C.ENV_FUSE, "jit")
    with pytest.raises(SimInputError, match="COXMOE_CPU_FUSE"):
        C._Epilogue()
    monkeypatch.setenv(C.ENV_FUSE, "eager")
    assert C._Epilogue().fn is C.scale_silu_mul_quantize


def test_packing_keeps_other_weight_dtypes_and_same_device_copies_keep_their_experts():
    lw = _layer()
    w1, w3, w2 = lw.w1.float(), lw.w3.float(), lw.w2.float()
    fp32 = C.CpuExperts(w1, w3, w2, "bf16")
    assert fp32.backend == "plain" and fp32(1, torch.ones(2, H)).dtype == torch.float32
    weights = random_weights(__import__("sim.specs", fromlist=["ModelSpec"]).ModelSpec(
        name="t", num_layers=1, hidden_size=16, vocab_size=11, num_attention_heads=2, num_kv_heads=1, head_dim=8,
        num_experts=2, top_k=1, expert_intermediate_size=8))
    runner = K.cpu_experts(weights.layers[0])
    assert weights.to("cpu").layers[0].cpu_experts is runner


@pytest.mark.parametrize("rows, cols", [(96, 64), (7, 301), (64, 256)])
def test_int4_groups_round_trip_within_four_bit_error(rows, cols):
    """4-bit symmetric groups of 128 inputs: packed two a byte with one bf16 scale per group; the dequantised
    weights of a Gaussian matrix come back within the quantisation noise (about 11% relative), exact at zero."""
    torch.manual_seed(0)
    w = torch.randn(rows, cols, dtype=torch.bfloat16)
    q, s = C.quantize_groups_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (rows, -(-cols // 2)) and s.shape == (rows, -(-cols // 128))
    back = C.dequantize_groups_int4(q, s, cols)
    err = float((back.float() - w.float()).norm() / w.float().norm())
    assert 0.05 < err < 0.15
    zero = C.dequantize_groups_int4(*C.quantize_groups_int4(torch.zeros(3, cols, dtype=torch.bfloat16)), cols)
    assert torch.equal(zero, torch.zeros(3, cols, dtype=torch.bfloat16))


def test_int4_experts_compute_the_gated_ffn_of_their_dequantised_weights():
    lw = _layer()
    x = torch.randn(5, H, dtype=torch.bfloat16)
    experts = C.CpuExperts(lw.w1, lw.w3, lw.w2, "int4")
    got, want = experts(2, x), K.expert(lw, 2, x)
    assert 0.03 < _rel(got, want) < 0.25  # weight-only INT4's error on one expert (stated in docs/executor.md)
    packed = experts.pack(2)
    exact = C.gated_ffn(x, *(C.dequantize_groups_int4(q, s, n) for q, s, n in (
        (packed.q1, packed.s1, packed.h), (packed.q3, packed.s3, packed.h), (packed.q2, packed.s2, packed.f))))
    assert torch.equal(got, exact)
