"""Routing-trace commands: trace gen, import, record, stats, validate; eas (hot experts from probed prompts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.cli.common import (
    Parser,
    arg_type,
    emit_json,
    nonneg_int,
    output_file,
    positive_int,
    probability_arg,
    seed_int,
)
from sim.config import int_at_least
from sim.errors import SimInputError
from traces.limits import MAX_LENGTH, MAX_TOP_K

# ---- trace ----------------------------------------------------------------------------------------------------
top_k_arg = arg_type(int_at_least(1, MAX_TOP_K))


def cmd_trace_gen(args: argparse.Namespace) -> int:
    from traces import SynthConfig, generate_trace, save_trace
    from traces.limits import check_memory
    from traces.synth import workload_lengths

    if args.preset:
        from traces.synth_presets import synth_preset

        synth_preset(args.preset)  # an unknown preset fails here, naming the presets
        args.model = args.model or args.preset
    if args.preset and (args.routing is not None or args.reuse_prob is not None):  # even when given as the default
        raise SimInputError("--preset sets the routing and reuse; drop --routing / --reuse-prob")
    if args.model:
        from sim.api import resolve_model

        given = [flag for flag, value in (("--layers", args.layers), ("--experts", args.experts),
                                          ("--top-k", args.top_k)) if value]
        if given:
            raise SimInputError(f"{', '.join(given)}: the model sets the shape; give them without --model")
        m = resolve_model(args.model)
        name, layers, experts, top_k = m.name, m.num_moe_layers, m.num_experts, m.top_k
    else:
        if not (args.layers and args.experts and args.top_k):
            raise SimInputError("give --model, or all of --layers, --experts and --top-k")
        name, layers, experts, top_k = "custom", args.layers, args.experts, args.top_k
    if args.topic_shift is not None and not args.topics:
        raise SimInputError("--topic-shift splits the popularity of --topics; give --topics N too")
    shift = 0.5 if args.topic_shift is None else args.topic_shift
    # Every request routes at least one token: a lower bound on the synthesis's own check, made before the
    # per-request lengths are drawn (300 M requests took 7 GB there before that check could refuse them).
    check_memory(args.requests * (48 + top_k * 10 + 16 + layers * top_k), f"a routing trace of {args.requests:,} "
                 "requests")
    prompt, gen = workload_lengths(args.prompt_len, args.gen_len, args.requests, args.seed)  # as `simulate` draws
    if args.preset:
        from sim.api import preset_for_model
        from traces.synth_presets import synth_preset

        # the model a preset describes (or its first layers), as `simulate --routing preset:NAME` requires
        preset = preset_for_model(synth_preset(args.preset), m)
        cfg = preset.config(layers, experts, top_k, seed=args.seed, topics=args.topics, topic_shift=shift,
                            affinity=args.affinity)
    else:
        cfg = SynthConfig(name, layers, experts, top_k, args.routing or "uniform", args.reuse_prob or 0.0, args.seed,
                          topics=args.topics, topic_shift=shift, affinity=args.affinity)
    trace = generate_trace(cfg, prompt, gen, progress=True)
    save_trace(trace, args.output, compress=args.compress)
    print(f"wrote {args.output}: {trace.num_requests} requests, {trace.num_tokens} routed tokens, "
          f"{layers} MoE layers x {experts} experts, top-{top_k}, routing {cfg.routing}"
          + (f" (preset {args.preset})" if args.preset else ""))
    return 0


def _save_and_report(trace, output: str, origin: str) -> int:
    """Write a trace and print its one-line summary (import and record)."""
    from traces import save_trace

    save_trace(trace, output)
    h = trace.header
    print(f"wrote {output}: {trace.num_requests} requests, {trace.num_tokens} routed tokens, {h.num_layers} "
          f"MoE layers x {h.num_experts} experts, top-{h.top_k}, {origin}")
    return 0


def cmd_trace_import(args: argparse.Namespace) -> int:
    from traces import import_jsonl, import_switch_csv, read_count_table, trace_from_counts

    uses = {"jsonl": ("--experts",), "switch-csv": (), "counts": ("--top-k", "--seed")}[args.format]
    given = [flag for flag, value in (("--experts", args.experts), ("--top-k", args.top_k), ("--seed", args.seed))
             if value is not None and flag not in uses]
    if given:  # a flag of another format had been ignored in silence
        raise SimInputError(f"--format {args.format} does not use {', '.join(given)}"
                            + (f" (it takes {', '.join(uses)})" if uses else " (the file sets its own shape)"))
    if args.format == "jsonl":
        trace = import_jsonl(args.file, model=args.model or "imported", num_experts=args.experts)
    elif args.format == "switch-csv":
        trace = import_switch_csv(args.file, model=args.model or "switch-base-32")
    else:
        if not args.top_k:
            raise SimInputError("--format counts needs --top-k (the table counts top-k selections)")
        trace = trace_from_counts(read_count_table(args.file), args.top_k, model=args.model or "counts",
                                  seed=args.seed or 0, source=f"counts:{Path(args.file).name}")
    return _save_and_report(trace, args.output, f"source {trace.header.source}")


def cmd_trace_record(args: argparse.Namespace) -> int:
    from executor.record import read_prompts, record_trace

    prompts = read_prompts(args.prompts, limit=args.limit)
    trace = record_trace(args.model_dir, prompts, args.gen_len, args.max_prompt_tokens)
    return _save_and_report(trace, args.output, f"recorded from {args.model_dir}")


def cmd_trace_stats(args: argparse.Namespace) -> int:
    from traces import format_stats, load_trace, trace_stats

    stats = trace_stats(load_trace(args.file), lru_max_tokens=args.lru_tokens)
    if args.json:
        emit_json(stats.to_dict())
    else:
        print(format_stats(stats))
    return 0


def cmd_trace_validate(args: argparse.Namespace) -> int:
    from traces import load_trace

    t = load_trace(args.file)
    h = t.header
    routed = int(t.routed_lens.sum())
    form = "" if t.has_prompt_rows else f" (prompts as per-request counts: {t.num_tokens} generated-token rows)"
    print(f"ok: {args.file}: trace v1, model {h.model}, {t.num_requests} requests, {routed} routed tokens{form}, "
          f"{h.num_layers} MoE layers x {h.num_experts} experts, top-{h.top_k}, source {h.source}")
    return 0


def cmd_eas(args: argparse.Namespace) -> int:
    """EAS: features (prompt embeddings, or the trace's request features), prototypes, their prefill routing
    (from the trace, or recorded from a local checkpoint), hot experts per layer."""
    import numpy as np

    from traces import load_trace
    from traces.eas import hit_ratio, map_from_probe, oracle_map, pick_prototypes, save_map

    if not (args.trace or args.model_dir):
        raise SimInputError("give --trace (probe recorded routing) or --model-dir (probe the model itself)")
    if args.model_dir and not args.prompts:
        raise SimInputError("--model-dir probes prompts: give --prompts")
    if args.embedder and not args.prompts:
        raise SimInputError("--embedder embeds --prompts; without them the trace's request features are used "
                            "(give --prompts, or omit --embedder)")
    if args.max_prompt_tokens and not args.model_dir:
        raise SimInputError("--max-prompt-tokens truncates the prompts --model-dir probes; a --trace probe reads "
                            "its recorded routing (omit it)")
    if args.model_dir:  # before the prompts are read and embedded (minutes for many prompts)
        from executor.record import check_model_dir

        check_model_dir(args.model_dir)
    trace = load_trace(args.trace) if args.trace else None
    features, prompts = None, None
    if args.prompts:
        from executor.embed import embed_prompts
        from executor.record import read_prompts

        prompts = read_prompts(args.prompts)
        if trace is not None and len(prompts) != trace.num_requests:
            raise SimInputError(f"{args.prompts} has {len(prompts)} prompts but the trace has "
                                f"{trace.num_requests} requests; they must be the same requests in order")
        features = embed_prompts(prompts, args.embedder)
    elif trace is not None:
        features = trace.request_features
    count = len(prompts) if prompts is not None else trace.num_requests
    if features is None:
        print("note: no prompts and no request_features in the trace; sampling prototypes uniformly (one cluster)",
              file=sys.stderr)
    clusters = min(args.clusters, count) if features is not None else 1
    picked = pick_prototypes(features, count, clusters=clusters, sample=min(args.sample, count), seed=args.seed)
    if args.model_dir:
        from executor.record import record_trace

        probe = record_trace(args.model_dir, [prompts[i] for i in picked], gen_len=1,
                             max_prompt_tokens=args.max_prompt_tokens)
        load = probe.expert_counts(np.arange(probe.num_tokens)).astype(np.float64)
        model, top_k = probe.header.model, probe.header.top_k
    else:
        load = trace.prefill_counts(picked).astype(np.float64)
        model, top_k = trace.header.model, trace.header.top_k
    if args.vram_experts > load.shape[1]:
        raise SimInputError(f"--vram-experts {args.vram_experts} exceeds the {load.shape[1]} experts per layer")
    if trace is not None and load.shape != (trace.header.num_layers, trace.header.num_experts):
        # before the map is written: it is scored on the trace and meant for its model
        raise SimInputError(f"the probe counts {load.shape[0]} layers x {load.shape[1]} experts, the trace "
                            f"{trace.header.num_layers} x {trace.header.num_experts}: a map for another model")
    hot = map_from_probe(model, load, top_k, args.vram_experts, {
        "clusters": clusters, "sample": int(picked.size), "seed": args.seed,
        "probe": "model" if args.model_dir else "trace",
        "features": "prompt-embeddings" if prompts is not None else ("trace" if features is not None else "none")})
    save_map(hot, args.output)
    line = (f"wrote {args.output}: {args.vram_experts} resident experts per layer from {picked.size} prototypes "
            f"in {clusters} clusters ({hot.extra['probed_tokens']} probed prompt tokens)")
    if trace is not None:
        # scored on the requests the probe did not see (the probed prompts' own routing made the map)
        unseen = np.setdiff1d(np.arange(trace.num_requests), picked)
        scored = unseen if unseen.size else None
        where = f"on the {unseen.size} requests not probed" if unseen.size else "on the trace (every request probed)"
        line += (f"; expert hit ratio {where} {hit_ratio(trace, hot, requests=scored):.3f} (global-frequency oracle "
                 f"{hit_ratio(trace, oracle_map(trace, args.vram_experts), requests=scored):.3f})")
    print(line)
    return 0




def register(sub: argparse._SubParsersAction) -> None:
    """trace gen, import, record, stats, validate; eas."""
    p = sub.add_parser("eas", help="expert-aware stratification: pick hot experts per layer from probed prototypes")
    p.add_argument("--trace", help="routing trace to probe (its request_features are clustered without --prompts)")
    p.add_argument("--prompts", help="JSONL prompts (a text field per line) to embed and cluster; with --trace, "
                   "the trace's requests in the same order")
    p.add_argument("--model-dir", help="probe the prototypes' prefill routing on this local HF MoE checkpoint")
    p.add_argument("--embedder", help="local sentence-transformers directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--max-prompt-tokens", type=positive_int, help="--model-dir: truncate prompts")
    p.add_argument("--vram-experts", type=nonneg_int, required=True,
                   help="resident experts per layer (E_R) the map ranks; CoX-MoE's hot_map takes the ranking (pin the "
                        "count with resident_experts)")
    p.add_argument("--clusters", type=positive_int, default=8, help="k-means clusters of the request features")
    p.add_argument("--sample", type=positive_int, default=64, help="prototypes to probe, split by cluster size")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("-o", "--output", required=True, type=output_file(".npz", exact=True),
                   help="hot-expert map (.npz) for --policy-opt hot_map=PATH")
    p.set_defaults(func=cmd_eas)

    t = sub.add_parser("trace", help="generate, inspect and validate routing traces")
    tsub = t.add_subparsers(dest="trace_command", required=True, parser_class=Parser)
    p = tsub.add_parser("gen", help="write a synthetic routing trace")
    p.add_argument("--model", help="model preset or file (sets layers, experts and top-k)")
    p.add_argument("--layers", type=positive_int, help="MoE layers (without --model)")
    p.add_argument("--experts", type=positive_int, help="experts per layer (without --model)")
    p.add_argument("--top-k", type=top_k_arg, help="experts per token (without --model)")
    p.add_argument("--requests", type=positive_int, required=True, help="number of requests")
    p.add_argument("--prompt-len", required=True,
                   help="N, fixed:N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MAX] or preset:NAME")
    p.add_argument("--gen-len", required=True, help="same forms as --prompt-len")
    p.add_argument("--routing", help="uniform (the default), zipf:ALPHA or table:NAME")
    p.add_argument("--reuse-prob", type=probability_arg, help="probability of reusing the last experts (default 0)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--preset", help="synthesis preset tuned to published routing statistics (mixtral-8x7b, "
                   "qwen3-30b-a3b, deepseek-v2-lite): popularity and per-layer reuse")
    p.add_argument("--affinity", type=probability_arg, default=0.0,
                   help="probability a token's experts follow (rank-matched) from its previous layer's")
    p.add_argument("--topics", type=nonneg_int, default=0,
                   help="latent topics, each with its own popularity; requests carry a topic feature vector")
    p.add_argument("--topic-shift", type=probability_arg, default=None,
                   help="share of a topic's popularity that is its own (0: topics route alike; default 0.5)")
    p.add_argument("--compress", action="store_true", help="deflate the arrays (smaller, slower to write)")
    p.add_argument("-o", "--output", required=True, type=output_file(".npz", exact=True), help="output .npz file")
    p.set_defaults(func=cmd_trace_gen)
    p = tsub.add_parser("import", help="convert published routing data into a trace (format v1)")
    p.add_argument("file")
    p.add_argument("--format", required=True, choices=("jsonl", "switch-csv", "counts"),
                   help="jsonl: per-(request, token, layer) records; switch-csv: the Switch-base decoder CSV; "
                   "counts: a [layers, experts] selection-count table (.csv or .npy)")
    p.add_argument("--model", help="model name for the trace header")
    p.add_argument("--experts", type=positive_int, help="jsonl: experts per layer (default: largest id + 1)")
    p.add_argument("--top-k", type=top_k_arg, help="counts: experts per token")
    p.add_argument("--seed", type=seed_int, help="counts: seed of the token order (default 0)")
    p.add_argument("-o", "--output", required=True, type=output_file(".npz", exact=True), help="output .npz file")
    p.set_defaults(func=cmd_trace_import)
    p = tsub.add_parser("record", help="record routing from a local Hugging Face MoE checkpoint")
    p.add_argument("--model-dir", required=True, help="local checkpoint directory (config, tokenizer, weights)")
    p.add_argument("--prompts", required=True, help="JSONL file with a text field per line")
    p.add_argument("--gen-len", type=arg_type(int_at_least(1, MAX_LENGTH)), default=16,
                   help="tokens to generate greedily per prompt")
    p.add_argument("--max-prompt-tokens", type=positive_int, help="truncate prompts to this many tokens")
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts")
    p.add_argument("-o", "--output", required=True, type=output_file(".npz", exact=True), help="output .npz file")
    p.set_defaults(func=cmd_trace_record)
    p = tsub.add_parser("stats", help="popularity, entropy, reuse and LRU hit rates of a trace")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--lru-tokens", type=positive_int, default=50_000,
                   help="routed tokens replayed for the LRU hit rates (whole requests, from the first)")
    p.set_defaults(func=cmd_trace_stats)
    p = tsub.add_parser("validate", help="check a trace file and print its header")
    p.add_argument("file")
    p.set_defaults(func=cmd_trace_validate)
