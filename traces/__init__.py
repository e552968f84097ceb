"""Routing traces: format v1 (load, save, validate), synthetic generators, and summary statistics."""

from traces.errors import TraceError
from traces.format import RoutingTrace, TraceHeader, load_trace, save_trace
from traces.importers import import_jsonl, import_switch_csv, read_count_table, trace_from_counts
from traces.stats import TraceStats, format_stats, trace_stats
from traces.synth import SynthConfig, generate_trace, popularity_matrix, request_lengths

__all__ = ["RoutingTrace", "SynthConfig", "TraceError", "TraceHeader", "TraceStats", "format_stats",
           "import_jsonl", "import_switch_csv", "read_count_table", "trace_from_counts",
           "generate_trace", "load_trace", "popularity_matrix", "request_lengths", "save_trace", "trace_stats"]
