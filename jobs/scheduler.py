"""Which queued jobs a worker starts, and which of its running jobs it preempts for them.

The policy, in one place and free of I/O:
- highest priority first, then first in, first out; a job starts when its GPUs (or slots) are
  free. The job at the head of the line that does not fit holds back every job behind it, so a
  stream of small jobs cannot starve a large one;
- preemption: when that head job cannot start for lack of GPUs, running jobs of lower priority
  are stopped for it (lowest priority first, then the most recently started, which loses the
  least work), but only as many as it needs, and only when stopping them is enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Waiting:
    job: int
    priority: int
    gpus: int


@dataclass(frozen=True)
class Active:
    job: int
    priority: int
    gpus: int
    started: float
    stopping: bool  # already asked to stop (preempted, cancelled): its GPUs are on their way


@dataclass
class Plan:
    start: list[int] = field(default_factory=list)
    preempt: list[int] = field(default_factory=list)
    preempt_for: int | None = None


def plan(waiting: list[Waiting], free: int, active: list[Active], preempt: bool = True) -> Plan:
    """What to do now. `waiting` is in queue order (priority, then age) and holds only jobs
    that could start here once GPUs are free; `free` is the number of free GPUs or slots."""
    decided = Plan()
    for job in waiting:
        if job.gpus <= free:
            decided.start.append(job.job)
            free -= job.gpus
            continue
        if preempt:
            coming = sum(a.gpus for a in active if a.stopping)
            victims = sorted(
                (a for a in active if a.priority < job.priority and not a.stopping),
                key=lambda a: (a.priority, -a.started),
            )
            need, chosen = job.gpus - free - coming, []
            for victim in victims:
                if need <= 0:
                    break
                chosen.append(victim.job)
                need -= victim.gpus
            if need <= 0 and chosen:
                decided.preempt, decided.preempt_for = chosen, job.job
        break  # strict order: nothing behind the head job starts before it
    return decided
