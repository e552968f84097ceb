"""FlexGen's 4-bit group-wise compression (--compress-weight, --compress-cache): matrices and cache take 0.5625
bytes an element where they are kept and moved; before every use the GPU decompresses them (13 bytes of traffic
an element, by FlexGen's `decompress` op sequence), and new cache entries are compressed on the GPU."""

from __future__ import annotations

import pytest

from experiments.validation.schema import load_points
from sim.api import simulate
from sim.errors import SimInputError
from sim.plan import OpKind, Payload, Phase, Stream
from sim.policies.flexgen import COMPRESS_HALF_BYTES_PER_ELEMENT, DECOMPRESS_BYTES_PER_ELEMENT
from sim.policies.flexgen_weights import (
    COMPRESSED_BYTES_PER_ELEMENT,
    attention_tensors,
    compressed,
    ffn_tensors,
    matrix_flags,
    place_weights,
)
from sim.specs import load_model

OPT = "opt-6.7b"
SYSTEM = "gcp-t4-n1-208g"
BASE = {"gpu_batch_size": "4", "num_gpu_batches": "2", "weights_gpu_percent": "0", "kv_gpu_percent": "0",
        "act_gpu_percent": "0", "cpu_attention": "off", "memory_fraction": "1.0"}


def test_matrices_take_the_compressed_bytes_and_vectors_stay():
    m = load_model(OPT)
    sizes, flags = attention_tensors(m), matrix_flags(m, "attention")
    assert flags == [True, False, True, False, True, False, True, False, False, False]
    packed = compressed(sizes, flags, m)
    for size, held, is_matrix in zip(sizes, packed, flags, strict=True):
        assert held == (int(size * COMPRESSED_BYTES_PER_ELEMENT / 2) if is_matrix else size)
    plain, small = place_weights(m, 100), place_weights(m, 100, compress=True)
    assert small.gpu_bytes / plain.gpu_bytes == pytest.approx(0.5625 / 2, rel=0.02)
    # placed by element counts, as FlexGen places them: the same tensors on each tier
    half, half_small = place_weights(m, 50), place_weights(m, 50, compress=True)
    assert (half.attention_load[0] > 0) == (half_small.attention_load[0] > 0)


def _plan(opts):
    return simulate(OPT, SYSTEM, "flexgen", batch=8, prompt_len=32, gen_len=3, routing="uniform",
                    policy_options=opts, keep_plan=True, decode_sample=0).plan


def test_compressed_weights_move_less_and_are_decompressed_before_every_use():
    m = load_model(OPT)
    plain, packed = _plan(BASE), _plan({**BASE, "compress_weight": "on"})
    loads = [sum(op.bytes for op in p.ops if op.stream == Stream.H2D and op.step == 2) for p in (plain, packed)]
    assert loads[1] / loads[0] == pytest.approx(0.5625 / 2, rel=0.02)
    unpack = [op for op in packed.ops if op.payload is Payload.DECOMPRESS and op.step == 2]
    assert all(op.stream == Stream.GPU and op.kind is OpKind.COPY for op in unpack)
    attention_elements = sum(s for s, mat in zip(attention_tensors(m), matrix_flags(m, "attention"),
                                                 strict=True) if mat) // m.bytes_per_param
    ffn_elements = sum(s for s, mat in zip(ffn_tensors(m, 0), matrix_flags(m, "ffn", 0), strict=True)
                       if mat) // m.bytes_per_param
    layer0 = sorted(op.bytes for op in unpack if op.layer == 0)
    # two GPU batches, each decompressing the attention half's and the FFN half's matrices
    assert layer0 == sorted([DECOMPRESS_BYTES_PER_ELEMENT * attention_elements] * 2
                            + [DECOMPRESS_BYTES_PER_ELEMENT * ffn_elements] * 2)
    # each precedes the compute that uses it on the GPU stream
    ids = {op.id for op in unpack}
    users = [op for op in packed.ops if any(d in ids for d in op.deps)]
    # (the FFN half starts with its router, a placeholder for a dense model; the embeddings decompress too)
    assert {op.kind for op in users} == {OpKind.QKV, OpKind.ROUTER, OpKind.EMBED, OpKind.LM_HEAD}
    assert not any(op.payload is Payload.DECOMPRESS for op in plain.ops)


def test_a_compressed_cache_moves_less_and_is_decompressed_for_attention():
    m = load_model(OPT)
    plain, packed = _plan(BASE), _plan({**BASE, "compress_cache": "on"})
    assert packed.static_memory["cpu"]["kv_cache"] / plain.static_memory["cpu"]["kv_cache"] == pytest.approx(
        0.5625 / 2, rel=0.01)
    for p, scale in ((plain, 1.0), (packed, 0.5625 / 2)):
        ups = sum(op.bytes for op in p.ops if op.stream == Stream.H2D_ACT and op.payload is Payload.KV)
        base = sum(op.bytes for op in plain.ops if op.stream == Stream.H2D_ACT and op.payload is Payload.KV)
        assert ups == pytest.approx(base * scale, rel=0.01)
    attn = [op for op in packed.ops if op.kind is OpKind.ATTENTION and op.phase is Phase.DECODE]
    for op in attn:
        (cache,) = [packed.ops[d] for d in op.deps if packed.ops[d].payload is Payload.DECOMPRESS]
        assert cache.bytes == DECOMPRESS_BYTES_PER_ELEMENT * op.kv_tokens * m.kv_bytes_per_token_layer // 2
    packs = [op for op in packed.ops if op.payload is Payload.DECOMPRESS and op.phase is Phase.DECODE
             and op.bytes == COMPRESS_HALF_BYTES_PER_ELEMENT * (4 * m.kv_bytes_per_token_layer // 2) // 2]
    assert len(packs) == 2 * m.num_layers * 2  # every GPU batch's new entries, at steps 1 and 2
    r_plain = simulate(OPT, SYSTEM, "flexgen", batch=8, prompt_len=32, gen_len=3, routing="uniform",
                       policy_options=BASE, decode_sample=0)
    r_packed = simulate(OPT, SYSTEM, "flexgen", batch=8, prompt_len=32, gen_len=3, routing="uniform",
                        policy_options={**BASE, "compress_cache": "on"}, decode_sample=0)
    assert r_packed.busy_s["h2d_act"] < r_plain.busy_s["h2d_act"] and r_packed.busy_s["gpu"] > r_plain.busy_s["gpu"]


def test_cpu_attention_over_a_compressed_cache_is_refused_in_one_line():
    with pytest.raises(SimInputError, match="compress_cache on with cpu_attention on"):
        _plan({**BASE, "cpu_attention": "on", "compress_cache": "on"})


def test_the_compressed_benchmark_points_are_expressible():
    """Simulated with their published knobs; incomplete only because the bench-suite lines do not name their
    hardware (none is 'unsupported' any more)."""
    points = {p.id: p for p in load_points()}
    for pid in ("flexllmgen-bench-opt-6.7b-int4", "flexllmgen-bench-opt-30b-cache-int4",
                "flexllmgen-bench-opt-175b-int4"):
        assert points[pid].knobs["compress_cache"] == "on"
        assert points[pid].status == "incomplete" and "hardware" in points[pid].missing
    assert not [p for p in points.values() if p.status == "unsupported" and p.group == "flexllmgen-opt"]


def test_the_executor_refuses_compression_in_one_line():
    pytest.importorskip("torch")
    from executor.run import execute_plan

    with pytest.raises(SimInputError, match="does not run FlexGen's 4-bit compression: plan op \\d+"):
        execute_plan(_plan({**BASE, "compress_weight": "on"}), None, None, use_cuda=False)


def test_matrices_are_known_by_their_role_not_their_size():
    """A router is a matrix however few experts a model has (a size rule called it a vector below 7 experts)."""
    import dataclasses

    m = load_model("mixtral-8x7b")
    few = dataclasses.replace(m, name="few-experts", num_experts=2, top_k=1)
    for model in (m, few):
        flags = matrix_flags(model, "ffn", 0)
        assert flags == [True] * len(ffn_tensors(model, 0))
    assert matrix_flags(m, "attention") == [False, True, True, True, True, False]
    assert matrix_flags(m, "output") == [False, True]


def test_compressing_quantised_experts_is_refused_in_one_line():
    with pytest.raises(SimInputError, match="compress_weight on with int8 experts"):
        simulate("mixtral-8x7b", SYSTEM, "flexgen", batch=8, prompt_len=32, gen_len=3,
                 policy_options={**BASE, "compress_weight": "on"}, expert_precision="int8")
