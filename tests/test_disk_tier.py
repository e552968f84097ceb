"""A disk behind the host (FlexGen's third tier): the system's `disk_read` / `disk_write` streams move bytes between
the disk pool and host DRAM at the disk's measured rates and draw on host DRAM; FlexGen places weights and KV
cache on it by its --percent rule, reads them back every step through its copy threads, and writes new cache
entries to it; its search spills to disk only where DRAM cannot hold what the GPU leaves."""

from __future__ import annotations

import pytest

from experiments.validation.schema import load_points
from sim.api import simulate
from sim.cost import RooflineCostModel
from sim.engine import run_plan
from sim.errors import SimInputError
from sim.plan import OpKind, Payload, Phase, Plan, PlanBuilder, Stream
from sim.policies.flexgen_weights import place_weights, tiers
from sim.specs import load_model, load_system
from sim.specs.overrides import apply_system_settings
from sim.topology import topology_of
from sim.workload import Workload

T4_DISK = "gcp-t4-n1-208g"
OPT = "opt-6.7b"
# FlexGen's OPT-175B layout (--percent 0 50 0 0 0 100 --cpu --pin-weight 0), on the smaller OPT for speed
DISK_OPTS = {"gpu_batch_size": "2", "num_gpu_batches": "2", "weights_gpu_percent": "0", "weights_cpu_percent": "50",
             "kv_gpu_percent": "0", "kv_cpu_percent": "0", "act_gpu_percent": "0", "cpu_attention": "on",
             "pin_weight": "off", "memory_fraction": "1.0"}


def test_the_disk_is_a_pool_and_two_host_streams_at_its_measured_rates():
    system = load_system(T4_DISK)
    disk = system.disk
    topo = topology_of(system)
    assert topo.pools["disk"] == disk.capacity_bytes == 1_500_000_000_000
    read, write = topo.streams["disk_read"], topo.streams["disk_write"]
    assert read.group == write.group == "host" and (read.spec.src, read.spec.dst) == ("disk", "cpu")
    b = PlanBuilder()
    b.add(OpKind.COPY, "disk_read", Phase.DECODE, 1, 0, nbytes=10**9, payload=Payload.KV)
    b.add(OpKind.COPY, "disk_write", Phase.DECODE, 1, 0, nbytes=10**9, payload=Payload.KV)
    plan = Plan("t", {}, load_model(OPT), system, Workload.uniform(4, 1, 2), b.ops, {"gpu": {}, "cpu": {}})
    cost = RooflineCostModel(system)
    r, w = (cost.op_time_ns(op) / 1e9 for op in plan.ops)
    assert r == pytest.approx(1e9 / (disk.read_bytes_per_s * disk.read_efficiency) + disk.latency_s, rel=1e-6)
    assert w == pytest.approx(1e9 / (disk.write_bytes_per_s * disk.write_efficiency) + disk.latency_s, rel=1e-6)
    # both land in or leave host DRAM: they draw on it (read at ~2 GB/s: a small share), run in parallel (full
    # duplex: their own resources) and never exceed the DRAM's capacity together
    (own_r, dram_r), (own_w, dram_w) = (cost.usage(op) for op in plan.ops)
    assert own_r == own_w == 1.0 and 0 < dram_r < 0.1 and 0 < dram_w < 0.1
    rec = run_plan(plan, cost)
    assert rec.start_ns.tolist() == [0, 0]
    assert rec.end_ns.tolist() == [cost.op_time_ns(op) for op in plan.ops]
    # a system without a disk has neither the streams nor the pool
    assert "disk" not in topology_of(load_system("gcp-t4-n1")).pools
    assert "disk_read" not in topology_of(load_system("gcp-t4-n1")).streams


def test_flexgen_places_tensors_on_three_tiers_by_their_midpoints():
    """get_choice over [disk, cpu, gpu]: a tensor whose midpoint lies below the disk share goes to disk."""
    assert tiers([10, 10, 10, 10], gpu_percent=25, cpu_percent=25) == ["disk", "disk", "cpu", "gpu"]
    assert tiers([10, 10, 10, 10], gpu_percent=25) == ["cpu", "cpu", "cpu", "gpu"]  # no disk share
    m = load_model("opt-175b")
    pl = place_weights(m, 0, 50)
    total = pl.gpu_bytes + pl.cpu_bytes + pl.disk_bytes
    assert pl.gpu_bytes == 0 and pl.cpu_bytes / total == pytest.approx(0.5, abs=0.01)
    assert pl.attention_disk[0] > 0 and pl.ffn_disk[0] > 0
    # without a disk share nothing goes there and the two-tier numbers are unchanged
    two, three = place_weights(m, 10), place_weights(m, 10, 90)
    assert two.disk_bytes == three.disk_bytes == 0 and two == three


def test_flexgen_reads_its_disk_share_every_step_and_writes_new_entries():
    r = simulate(OPT, T4_DISK, "flexgen", batch=4, prompt_len=32, gen_len=3, routing="uniform",
                 policy_options=DISK_OPTS, keep_plan=True, decode_sample=0)
    plan, m = r.plan, load_model(OPT)
    assert plan.static_memory["disk"]["weights"] > 0 and plan.static_memory["disk"]["kv_cache"] > 0
    pl = place_weights(m, 0, 50)
    for step in (1, 2):
        reads = [op for op in plan.ops if op.stream == "disk_read" and op.step == step and op.phase is Phase.DECODE]
        weights = sum(op.bytes for op in reads if op.payload is Payload.EXPERT_WEIGHTS)
        kv = sum(op.bytes for op in reads if op.payload is Payload.KV)
        # every layer's disk tensors once per step (k = 0 only), the embeddings' with the first and last layer
        assert weights == pl.disk_bytes
        # CPU attention over the whole cache: each GPU batch's cache, read from disk into the CPU workspace
        assert kv == 4 * (32 + step) * m.kv_bytes_per_token_layer * m.num_layers
        # each weight read is copied up by the copy thread's relay (a pinned DMA after it)
        ups = {d for op in plan.ops if op.stream == Stream.H2D for d in op.deps}
        assert all(op.id in ups for op in reads if op.payload is Payload.EXPERT_WEIGHTS)
        writes = [op for op in plan.ops if op.stream == "disk_write" and op.step == step]
        assert sum(op.bytes for op in writes) == 4 * m.kv_bytes_per_token_layer * m.num_layers  # one new token
    # prefill's new entries go down through the relay, then into the disk's file
    prefill_writes = [op for op in plan.ops if op.stream == "disk_write" and op.phase is Phase.PREFILL]
    assert prefill_writes
    for op in prefill_writes:
        relays = [plan.ops[d] for d in op.deps if plan.ops[d].stream == Stream.D2H and plan.ops[d].layer == op.layer
                  and plan.ops[d].micro_batch == op.micro_batch and plan.ops[d].payload is Payload.KV]
        assert len(relays) == 1 and relays[0].bytes == op.bytes
    # CPU attention over the disk share: the copy threads made the workspace copy (read 2 B, write 4 B per 2 B
    # cached) while reading it, so the attention op moves 3 x the cache's bytes less than over a DRAM cache
    dram = simulate(OPT, T4_DISK, "flexgen", batch=4, prompt_len=32, gen_len=3, routing="uniform",
                    policy_options={**DISK_OPTS, "kv_cpu_percent": "100"}, keep_plan=True, decode_sample=0).plan

    def attention(p):
        return next(op for op in p.ops if op.kind is OpKind.ATTENTION and op.stream == Stream.CPU and op.step == 2)

    on_disk, in_dram = attention(plan), attention(dram)
    assert on_disk.kv_tokens == in_dram.kv_tokens
    assert in_dram.bytes - on_disk.bytes == 3 * on_disk.kv_tokens * m.kv_bytes_per_token_layer
    assert r.record.busy_ns["disk_read"] > 0 and r.record.busy_ns["disk_write"] > 0


def test_gpu_attention_loads_the_dram_share_before_the_disk_share():
    """cpu_attention off, a cache half in DRAM and half on disk: each position's DRAM share goes up on the cache's
    stream first, then the copy threads' relay of the disk share (read, then its DMA)."""
    opts = {**DISK_OPTS, "cpu_attention": "off", "kv_cpu_percent": "50", "pin_weight": "on"}
    plan = simulate(OPT, T4_DISK, "flexgen", batch=4, prompt_len=32, gen_len=3, routing="uniform",
                    policy_options=opts, keep_plan=True, decode_sample=0).plan
    ups = [op for op in plan.ops if op.stream == Stream.H2D_ACT and op.payload is Payload.KV and op.step == 2]
    from_disk = [op for op in ups if any(plan.ops[d].stream == "disk_read" for d in op.deps)]
    from_dram = [op for op in ups if op not in from_disk]
    assert from_disk and len(from_disk) == len(from_dram)
    for dram, disk in zip(from_dram, from_disk, strict=True):
        assert dram.id < disk.id and (dram.layer, dram.micro_batch) == (disk.layer, disk.micro_batch)
        assert disk.bytes == dram.bytes  # half and half (whole rows, even here)


def test_disk_shares_need_a_disk_and_must_fit_it():
    with pytest.raises(SimInputError, match="has no disk"):
        simulate(OPT, "gcp-t4-n1", "flexgen", batch=4, prompt_len=32, gen_len=3, policy_options=DISK_OPTS)
    small = apply_system_settings(load_system(T4_DISK), {"disk.capacity_bytes": str(10**9)})
    with pytest.raises(SimInputError, match="disk"):
        simulate(OPT, small, "flexgen", batch=4, prompt_len=32, gen_len=3, policy_options=DISK_OPTS)
    with pytest.raises(SimInputError, match="exceed 100"):
        simulate(OPT, T4_DISK, "flexgen", batch=4, prompt_len=32, gen_len=3,
                 policy_options={**DISK_OPTS, "weights_gpu_percent": "60", "weights_cpu_percent": "50"})


def test_the_search_spills_to_disk_only_where_dram_cannot_hold_the_rest():
    opts = {"cpu_attention": "on", "gpu_batch_size": "4"}
    roomy = simulate(OPT, T4_DISK, "flexgen", batch=8, prompt_len=32, gen_len=2, policy_options=opts)
    assert roomy.knobs["weights_cpu_percent"] == -1 and roomy.knobs["kv_cpu_percent"] == -1
    # 8.5 GiB of DRAM, 8 of them reserved: what of OPT-6.7B's 13 GB the GPU leaves cannot all stay in DRAM
    tight = apply_system_settings(load_system(T4_DISK), {"dram_bytes": str(17 * 2**29)})
    r = simulate(OPT, tight, "flexgen", batch=8, prompt_len=32, gen_len=2, policy_options=opts, keep_plan=True)
    assert 0 <= r.knobs["weights_cpu_percent"] < 100 - r.knobs["weights_gpu_percent"]
    static = r.plan.static_memory
    assert sum(static["cpu"].values()) <= tight.dram_usable_bytes and static["disk"]["weights"] > 0
    no_disk = apply_system_settings(load_system("gcp-t4-n1"), {"dram_bytes": str(17 * 2**29)})
    with pytest.raises(SimInputError, match="no configuration fits"):
        simulate(OPT, no_disk, "flexgen", batch=8, prompt_len=32, gen_len=2, policy_options=opts)
    # a configuration with every share given never spills: it fits, or the error names the memory
    forced = {"gpu_batch_size": "4", "weights_gpu_percent": "50", "kv_gpu_percent": "100", "act_gpu_percent": "100",
              "cpu_attention": "on"}
    with pytest.raises(SimInputError, match="DRAM"):
        simulate(OPT, tight, "flexgen", batch=8, prompt_len=32, gen_len=2, policy_options=forced)
    # a DRAM share given while the GPU's is searched: the search keeps gpu + cpu <= 100, the rest on disk
    half = simulate(OPT, T4_DISK, "flexgen", batch=8, prompt_len=32, gen_len=2,
                    policy_options={**opts, "weights_cpu_percent": "50", "kv_cpu_percent": "0"})
    assert half.knobs["weights_gpu_percent"] <= 50 and half.knobs["kv_gpu_percent"] <= 100


def test_the_executor_refuses_a_disk_tier_in_one_line():
    pytest.importorskip("torch")
    from executor.run import _disk_link, execute_plan

    # only the disk's own streams are set aside; a plan without disk ops runs as on a system without a disk
    topo = topology_of(load_system(T4_DISK))
    assert [s for s in topo.streams if _disk_link(topo, s)] == ["disk_read", "disk_write"]

    r = simulate(OPT, T4_DISK, "flexgen", batch=4, prompt_len=32, gen_len=2, policy_options=DISK_OPTS,
                 keep_plan=True)
    with pytest.raises(SimInputError, match="does not run a disk tier: plan op \\d+ moves"):
        execute_plan(r.plan, None, None, use_cuda=False)


def test_opt_175b_runs_are_validation_points_with_their_published_layout():
    points = {p.id: p for p in load_points()}
    x5 = points["flexllmgen-bench-opt-175b"]
    assert x5.knobs["weights_cpu_percent"] == 50 and x5.knobs["kv_cpu_percent"] == 0
    dw = [p for p in points.values() if p.id.startswith("flexllmgen-dw-opt-175b")]
    assert len(dw) == 10 and not any(p.train for p in dw)
    # expressible and simulated, but incomplete: their attention runs on the T4 box's unpublished CPU (and the
    # bench-suite line's hardware is not named at all)
    assert all(p.status == "incomplete" and "CPU" in p.missing for p in dw) and x5.status == "incomplete"


def test_the_timeline_names_the_disk_tracks():
    from sim.timeline import track_name

    assert track_name("disk_read") == "Disk read (to DRAM)" and track_name("disk_write") == "Disk write (from DRAM)"
