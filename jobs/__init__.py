"""dgan's job queue: durable, GPU-aware, crash-safe, with priorities and preemption.

- `store`: the SQLite database (jobs, dependencies, attempts, workers);
- `spec`: a job as a typed spec, validated at submit time by the CLI's own parsers and configs;
- `scheduler`: which jobs start and which are preempted;
- `worker`: claims jobs, holds their leases, runs them through a `backend`;
- `runner`: a job's own process, one call of the job API;
- `cli`: `dgan jobs ...`.

`dgan/` never imports this package: the queue calls the library, not the other way round.
"""
