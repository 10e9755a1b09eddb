"""Which queued jobs a worker starts, and which of its running jobs it preempts for them.

The policy, in one place and free of I/O:
- highest priority first, then first in, first out; a job starts when its GPUs (or slots) are
  free. The job at the head of the line that does not fit holds back every job behind it, so a
  stream of small jobs cannot starve a large one;
- preemption: when that head job cannot start for lack of GPUs, running jobs of lower priority
  are stopped for it (lowest priority first, then the most recently started, which loses the
  least work), but only as many as it needs, and only when stopping them is enough.

Free GPUs are counted per node: a local worker is one node; a Ray cluster has one per machine.
A job's GPUs must all be on one node, except a training job of several Ray Train workers, each
of whose workers may sit on a different node. Only victims on the nodes the job will use are
preempted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOCAL = ""  # the one node of a local worker


@dataclass(frozen=True)
class Waiting:
    job: int
    priority: int
    gpus: int  # per process when processes > 1
    processes: int = 1  # > 1: Ray Train workers of `gpus` each, placed on any nodes


@dataclass(frozen=True)
class Active:
    job: int
    priority: int
    gpus: int
    started: float
    stopping: bool  # already asked to stop (preempted, cancelled): its GPUs are on their way
    node: str | None = LOCAL  # where its GPUs are; None: spread or unknown (never a victim)


@dataclass
class Plan:
    start: list[int] = field(default_factory=list)
    preempt: list[int] = field(default_factory=list)
    preempt_for: int | None = None
    nodes: dict[int, list[str]] = field(default_factory=dict)  # job -> a node per process


def place(job: Waiting, free: dict[str, int]) -> list[str] | None:
    """A node for each of the job's processes (best fit: the fullest node that holds it, so
    large holes stay for large jobs), or None when it does not fit."""
    left, nodes = dict(free), []
    for _ in range(job.processes):
        fits = [n for n, units in left.items() if units >= job.gpus]
        if not fits:
            return None
        node = min(fits, key=lambda n: (left[n], n))
        left[node] -= job.gpus
        nodes.append(node)
    return nodes


def plan(
    waiting: list[Waiting], free: int | dict[str, int], active: list[Active], preempt: bool = True
) -> Plan:
    """What to do now. `waiting` is in queue order (priority, then age) and holds only jobs
    that could start here once GPUs are free; `free` is the number of free GPUs or slots, or
    that number for each node."""
    free = {LOCAL: free} if isinstance(free, int) else dict(free)
    decided = Plan()
    for job in waiting:
        nodes = place(job, free)
        if nodes is not None:
            decided.start.append(job.job)
            decided.nodes[job.job] = nodes
            for node in nodes:
                free[node] -= job.gpus
            continue
        if preempt:
            decided.preempt = _victims(job, free, active)
            decided.preempt_for = job.job if decided.preempt else None
        break  # strict order: nothing behind the head job starts before it
    return decided


def _victims(job: Waiting, free: dict[str, int], active: list[Active]) -> list[int]:
    """The fewest lower-priority jobs, lowest priority and newest first, whose stop lets `job`
    start; [] when GPUs already on their way suffice, or when stopping them all is not enough."""
    trial = dict(free)
    for a in active:
        if a.stopping and a.node is not None:
            trial[a.node] = trial.get(a.node, 0) + a.gpus
    if place(job, trial) is not None:
        return []  # wait for the jobs that are stopping
    candidates = sorted(
        (a for a in active if a.priority < job.priority and not a.stopping and a.node is not None),
        key=lambda a: (a.priority, -a.started),
    )
    chosen: list[Active] = []
    for victim in candidates:
        chosen.append(victim)
        trial[victim.node] = trial.get(victim.node, 0) + victim.gpus
        nodes = place(job, trial)
        if nodes is not None:
            return [v.job for v in chosen if v.node in nodes]
    return []
