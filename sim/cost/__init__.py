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
    the group's shape then the member, keyed by the member tuple itself (plans store each distinct member once,
    and a key made of its (tokens, FLOPs, bytes) cost a new tuple per look-up); members of other experts with the
    same work share one pricing through a third memo."""

    def __init__(self, cost: CostModel):
        self.cost = cost
        self.times_memo: dict[tuple, dict[tuple, int]] = {}  # group shape -> member -> time
        self.parts_memo: dict[tuple, dict[tuple, tuple[int, tuple[float, float]]]] = {}  # -> (time, usage)
        self.work_memo: dict[tuple, dict[tuple, int]] = {}  # group shape -> member work -> time

    @staticmethod
    def _memo(table: dict[tuple, dict], op: Op) -> dict:
        """The member memo of `op`'s group shape in `table` (made on first use)."""
        shape = (op.kind, op.stream, op.phase, op.micro_batch, op.scope, op.payload, op.kv_tokens)
        memo = table.get(shape)
        if memo is None:
            memo = table[shape] = {}
        return memo

    def _time(self, op: Op, member: tuple[int, int, int, int], by_work: dict[tuple, int]) -> int:
        """A member's price, shared by members of the same work."""
        work = member[1:]
        time = by_work.get(work)
        if time is None:
            time = by_work[work] = self.cost.op_time_ns(member_op(op, member))
        return time

    def parts(self, op: Op) -> list[tuple[int, tuple[float, float]]]:
        """(time, usage) of each member of a grouped op, in order: what the engine runs one after another on a
        stream that shares its resource group (each member at its own fair rate, as its own op would)."""
        memo = self._memo(self.parts_memo, op)
        try:  # every member seen before: one C-level pass
            return list(map(memo.__getitem__, op.members))
        except KeyError:
            pass
        by_work, cost = self._memo(self.work_memo, op), self.cost
        out = []
        for member in op.members:
            hit = memo.get(member)
            if hit is None:
                hit = memo[member] = (self._time(op, member, by_work), cost.usage(member_op(op, member)))
            out.append(hit)
        return out

    def __call__(self, op: Op) -> int:
        if not op.members:
            return self.cost.op_time_ns(op)
        memo = self._memo(self.times_memo, op)
        try:  # every member priced before: one C-level pass (plans repeat a few token counts)
            return sum(map(memo.__getitem__, op.members))
        except KeyError:
            pass
        by_work = self._memo(self.work_memo, op)
        total = 0
        for member in op.members:
            time = memo.get(member)
            if time is None:
                time = memo[member] = self._time(op, member, by_work)
            total += time
        return total


__all__ = ["CostModel", "GroupPrices", "OpWork", "RooflineCostModel", "Work", "op_time_ns", "seconds_to_ns"]
