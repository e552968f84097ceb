"""Cost of an op: its work (FLOPs, bytes) from the model, its time from a cost model of the machine."""

from sim.cost.roofline import CostModel, RooflineCostModel, seconds_to_ns
from sim.cost.work import OpWork, Work

__all__ = ["CostModel", "OpWork", "RooflineCostModel", "Work", "seconds_to_ns"]
