"""Discrete-event simulator of MoE inference on a GPU + CPU machine: specs, plans, policies, cost, engine."""
