"""Cost of an op: its work (FLOPs, bytes) from the model, its time from a cost model of the machine."""

from sim.cost.roofline import CostModel, RooflineCostModel, seconds_to_ns
from sim.cost.work import OpWork, Work
from sim.plan import Op, member_op, member_ops


def op_time_ns(cost: CostModel, op: Op) -> int:
    """An op's time under `cost`; a grouped expert op's is the sum of its members' prices, each priced as the op
    it stands for (so a group costs what its experts run one after another would, overheads included)."""
    if not op.members:
        return cost.op_time_ns(op)
    price = cost.op_time_ns
    return sum([price(m) for m in member_ops(op)])


class GroupPrices:
    """`op_time_ns(cost, op)` for the ops of one plan, with members priced once per distinct shape: a member's
    price is taken to depend on what cost models price ops by (kind, stream, phase, micro-batch, scope, payload,
    KV entries, tokens, FLOPs, bytes), not on its expert id, layer or step, which no cost model reads. Plans of
    many small experts (Qwen3-30B-A3B: millions of members) repeat a few token counts. The memos are two-level,
    the group's shape then the member's (tokens, FLOPs, bytes), so a member look-up hashes three ints."""

    def __init__(self, cost: CostModel):
        self.cost = cost
        self.parts_memo: dict[tuple, dict[tuple, tuple[int, tuple[float, float]]]] = {}  # -> (time, usage)
        self.times_memo: dict[tuple, dict[tuple, int]] = {}  # the same, time only (an uncontended group's need)

    @staticmethod
    def _shape(op: Op) -> tuple:
        return op.kind, op.stream, op.phase, op.micro_batch, op.scope, op.payload, op.kv_tokens

    def parts(self, op: Op) -> list[tuple[int, tuple[float, float]]]:
        """(time, usage) of each member of a grouped op, in order: what the engine runs one after another on a
        stream that shares its resource group (each member at its own fair rate, as its own op would)."""
        shape = self._shape(op)
        memo = self.parts_memo.get(shape)
        if memo is None:
            memo = self.parts_memo[shape] = {}
        cost = self.cost
        out = []
        for member in op.members:
            work = member[1:]
            hit = memo.get(work)
            if hit is None:
                single = member_op(op, member)
                hit = memo[work] = (cost.op_time_ns(single), cost.usage(single))
            out.append(hit)
        return out

    def __call__(self, op: Op) -> int:
        if not op.members:
            return self.cost.op_time_ns(op)
        shape = self._shape(op)
        memo = self.times_memo.get(shape)
        if memo is None:
            memo = self.times_memo[shape] = {}
        price = self.cost.op_time_ns
        total = 0
        for member in op.members:
            work = member[1:]
            time = memo.get(work)
            if time is None:
                time = memo[work] = price(member_op(op, member))
            total += time
        return total


__all__ = ["CostModel", "GroupPrices", "OpWork", "RooflineCostModel", "Work", "op_time_ns", "seconds_to_ns"]
