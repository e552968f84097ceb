"""One configuration object: `SimConfig` checks its values, the CLI's flags and sweep keys come from it, and the
search (above the policies) scores candidates through the caller's simulate callback."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pandas as pd
import pytest
import yaml

from experiments.cli import build_parser, main
from experiments.cli.config_flags import config_from_args, flag_of
from sim.api import simulate
from sim.config import DEFAULTS, FIELD_NAMES, SimConfig, settings
from sim.errors import SimInputError
from sim.policies import PlanContext, make_policy
from sim.search import SearchReport, plan_policy
from sim.workload import Workload
from traces import SynthConfig, generate_trace

BASE = {"model": "mixtral-8x7b", "system": "a100-80g-8452y"}


@pytest.mark.parametrize("change, message", [
    ({"batch": 0}, "batch must be an integer >= 1"),
    ({"batch": True}, "batch must be an integer >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"decode_sample": 1.5}, "decode_sample must be an integer >= 0"),
    ({"prompt_len": 0}, "prompt_len must be an integer >= 1 or a distribution"),
    ({"gen_len": "banana"}, "gen_len must be an integer >= 1 or a distribution"),
    ({"reuse_prob": float("nan")}, "reuse_prob must be a number in"),
    ({"reuse_prob": 1.5}, "reuse_prob must be a number in"),
    ({"policy": ""}, "policy must be a policy name"),
    ({"policy_options": ["a=1"]}, "policy options must be a mapping"),
    ({"model": None}, "needs a model and a system"),
])
def test_bad_settings_are_refused_with_their_name(change, message):
    with pytest.raises(SimInputError, match=message):
        SimConfig(**{**BASE, **change})


def test_config_normalises_and_round_trips_as_json():
    c = SimConfig(**BASE, policy="coxmoe", batch=4, prompt_len="uniform:2:9", gen_len=3,
                  policy_options={"coalesce": False, "rescore": 2})
    assert c.policy_options == {"coalesce": "off", "rescore": "2"}  # strings, as --policy-opt gives them
    point = c.point()
    # every setting, except those added later while at their default (old sweep points keep their hash)
    assert list(point) == [f for f in FIELD_NAMES if f not in ("expert_precision", "system_settings")] \
        and SimConfig.from_point(point) == c
    with pytest.raises(SimInputError, match="unknown setting"):
        SimConfig.from_point({**point, "bacth": 4})
    with pytest.raises(SimInputError, match="no JSON form"):
        SimConfig(model=make_policy("coxmoe", {}), system="x").point()
    assert c.replace(batch=8).batch == 8 and c.batch == 4  # frozen: replace makes a copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.batch = 2  # type: ignore[misc]


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_setting_is_a_simulate_flag_with_its_help():
    """The flags are generated: each field is a flag (the targets also as --X-file), with the field's help."""
    actions = {a.dest: a for a in _subparser("simulate")._actions}
    for f in settings():
        assert f.name in actions, f"no flag for {f.name}"
        assert flag_of(f) in actions[f.name].option_strings
        assert actions[f.name].help.startswith(f.metadata["help"])
    assert {"model_file", "system_file"} <= set(actions)


def test_flags_read_back_as_the_config():
    args = build_parser().parse_args([
        "simulate", "--model", "mixtral-8x7b", "--system-file", "box.yaml", "--policy", "coxmoe", "--batch", "8",
        "--prompt-len", "lognormal:64:0.5:200", "--gen-len", "4", "--policy-opt", "coalesce=off", "--policy-opt",
        "rescore=1", "--routing", "zipf:1.2", "--reuse-prob", "0.25", "--seed", "3", "--decode-sample", "2"])
    assert config_from_args(args) == SimConfig(
        model="mixtral-8x7b", system="box.yaml", policy="coxmoe", batch=8, prompt_len="lognormal:64:0.5:200",
        gen_len=4, policy_options={"coalesce": "off", "rescore": "1"}, routing="zipf:1.2", reuse_prob=0.25, seed=3,
        decode_sample=2)
    defaults = config_from_args(build_parser().parse_args(["simulate", "--model", "m", "--system", "s"]))
    assert defaults == SimConfig(**{**DEFAULTS, "model": "m", "system": "s"})


def test_real_runs_take_their_own_defaults_and_no_decode_sampling(capsys):
    args = build_parser().parse_args(["execute", "--model", "mixtral-8x7b"])
    c = config_from_args(args)
    assert (c.system, c.policy) == ("a100-80g-8452y", "cpu-only")
    assert main(["execute", "--model", "mixtral-8x7b", "--decode-sample", "2"]) == 2  # every step runs for real
    assert "unrecognized arguments: --decode-sample" in capsys.readouterr().err


def test_simulate_takes_a_config_or_its_fields():
    c = SimConfig(**BASE, policy="coxmoe", batch=8, prompt_len=16, gen_len=4)
    a, b = simulate(c), simulate(*BASE.values(), "coxmoe", batch=8, prompt_len=16, gen_len=4)
    assert (a.total_s, a.knobs, a.search) == (b.total_s, b.knobs, {**b.search, "search_s": a.search["search_s"]})


def _ctx(tiny_model, system, sample=0):
    wl = Workload.uniform(8, 16, 6)
    trace = generate_trace(SynthConfig("tiny", tiny_model.num_moe_layers, tiny_model.num_experts, tiny_model.top_k),
                           wl.prompt_lens, wl.gen_lens)
    return PlanContext(tiny_model, system, wl, trace, decode_sample=sample)


def test_search_scores_candidates_through_the_callback(tiny_model, paper_system):
    """The search simulates its re-scored candidates (unchecked) and, when they were planned on fewer decode steps
    than the run, the chosen plan once more (checked); what the callback returns decides the pick."""
    from sim.cost import RooflineCostModel
    from sim.engine import run_plan

    roof = RooflineCostModel(paper_system)
    calls: list[tuple[int, bool]] = []

    def simulate_cb(plan, check):
        calls.append((len(plan.ops), check))
        return run_plan(plan, roof, check=check)

    policy = make_policy("coxmoe", {"rescore": "3"})
    planned = plan_policy(policy, _ctx(tiny_model, paper_system), simulate_cb)
    assert isinstance(planned.search, SearchReport) and planned.search.simulated == 3
    assert [check for _, check in calls] == [False, False, False, True]  # 6 decode steps > the 4 re-scored
    assert planned.record is not None and planned.record.end_ns.size == len(planned.plan.ops)
    assert planned.search.to_dict()["simulated_total_s"] == pytest.approx(planned.search.simulated_total_s)
    # a callback that makes every plan but the second one re-scored slow picks that one
    ranked = policy.search_space(_ctx(tiny_model, paper_system)).rescore_order()
    runner_up = policy.search_space(_ctx(tiny_model, paper_system)).build(
        _ctx(tiny_model, paper_system, 4), ranked[1].options).knobs

    def prefer_runner_up(plan, check):
        record = run_plan(plan, roof, check=check)
        if plan.knobs != runner_up and not check:
            record.end_ns = record.end_ns * 10
        return record

    picked = plan_policy(policy, _ctx(tiny_model, paper_system), prefer_runner_up)
    assert picked.plan.knobs == runner_up
    # without a search: the policy's one plan, no report
    fixed = plan_policy(make_policy("stream-experts", {}), _ctx(tiny_model, paper_system))
    assert fixed.search is None and fixed.record is None


def test_calibrate_validate_searches_with_the_profile(tmp_path, monkeypatch):
    """The plan a real run is compared against is chosen with the same profile the comparison predicts with."""
    import sim.policies
    from experiments.cli.real_cmds import _real_run
    from sim.cost.profile import PROFILE_VERSION, ProfileCostModel, model_signature
    from sim.specs import ModelSpec

    spec = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=64)
    model_file = tmp_path / "tiny.yaml"
    model_file.write_text(yaml.safe_dump(dataclasses.asdict(spec)))
    prof = tmp_path / "prof"
    prof.mkdir()
    (prof / "profile.json").write_text(json.dumps({"version": PROFILE_VERSION, "model": spec.name,
                                                   "model_signature": model_signature(spec)}))
    pd.DataFrame([{"device": "cpu", "kind": "expert", "tokens": t, "kv": 0, "median_s": 1e-4 * t}
                  for t in (1, 4, 16)]).to_csv(prof / "timings.csv", index=False)
    seen = []
    real_context = sim.policies.PlanContext

    def recording_context(*args, **kwargs):
        seen.append(kwargs.get("cost"))
        return real_context(*args, **kwargs)

    monkeypatch.setattr(sim.policies, "PlanContext", recording_context)
    args = build_parser().parse_args(["calibrate", "validate", "--model-file", str(model_file), "--profile",
                                      str(prof), "--policy", "coxmoe", "--batch", "4", "--prompt-len", "4",
                                      "--gen-len", "3"])
    run = _real_run(args, profile=args.profile)
    assert isinstance(seen[0], ProfileCostModel) and run.plan.policy == "coxmoe"
    args = build_parser().parse_args(["execute", "--model-file", str(model_file), "--batch", "4", "--prompt-len",
                                      "4", "--gen-len", "3"])
    _real_run(args)
    assert seen[1] is None  # execute has no profile: its search uses the roofline


def test_numpy_scalars_and_numeric_text_are_settings_too():
    """What a notebook or a sweep file passes: NumPy integers and floats, and decimal text."""
    import numpy as np

    c = SimConfig(**BASE, batch=np.int64(8), seed=np.int32(2), prompt_len="16", gen_len=np.int64(4),
                  reuse_prob=np.float32(0.5), policy_options={"rescore": 2})
    assert (c.batch, c.seed, c.prompt_len, c.gen_len, c.reuse_prob) == (8, 2, 16, 4, 0.5)
    assert all(type(v) in (int, float) for v in (c.batch, c.seed, c.prompt_len, c.gen_len, c.reuse_prob))
    assert hash(c) == hash(SimConfig(**BASE, batch=8, seed=2, prompt_len=16, gen_len=4, reuse_prob=0.5,
                                     policy_options={"rescore": "2"}))
    for bad in ({"batch": "²"}, {"batch": "9" * 5000}, {"batch": "2.5"}, {"policy_options": {"a": None}}):
        with pytest.raises(SimInputError):
            SimConfig(**BASE, **bad)
    with pytest.raises(SimInputError, match="needs model"):
        SimConfig.from_point({"system": "x"})
    with pytest.raises(TypeError, match="not both"):
        simulate(SimConfig(**BASE), batch=4)
