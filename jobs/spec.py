"""A queued job is a typed spec: one call of the job API, validated when it is submitted.

`dgan jobs submit KIND [options]` takes the options of the command KIND stands for (`train-gan`
takes those of `dgan train gan`). They are parsed by that command's own parser and turned into
its config by the CLI's own functions, so a bad option or key is refused at submit time with the
message the command itself would print, and the stored spec holds the resolved, validated config:
a preset edited later does not change a queued job. The queue never runs a shell string.

A spec may name an output of an earlier job as ${JOB.output} (${12.model}, or ${gan.model} in a
pipeline file); the worker fills it in from that job's result when it claims the job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from dgan.config import (
    MAX_CONTROL_REPEATS,
    MAX_REALISM_REPEATS,
    GanConfig,
    InspectorConfig,
    SynthConfig,
    TuneConfig,
    check_control_repeats,
    check_realism_options,
    check_realism_repeats,
    load_config,
)
from dgan.errors import DganError
from jobs.kinds import KINDS, kind_names
from jobs.store import REFERENCE, NewJob

# Environment a job takes from where it was submitted, as the command would have seen it there.
SUBMIT_ENV = ("MLFLOW_TRACKING_URI", "DGAN_INCEPTION_WEIGHTS", "DGAN_MODEL_CACHE")


class SpecBase(BaseModel):
    """What every job carries besides its own settings."""

    model_config = ConfigDict(extra="forbid")

    name: str  # the job's name; for training, the run directory's suffix
    gpus: int = Field(1, ge=1)  # GPUs (or CPU slots) it holds; processes for training and synth
    workdir: str  # it runs here, as the command would have where it was submitted
    env: dict[str, str] = {}
    argv: list[str] = []  # the command's options as submitted (shown by `dgan jobs show`)


class RayTrainFields(BaseModel):
    """A training job on a Ray cluster (`--workers N`, dgan.run.ray_train): with `workers` set
    (2 or more) the job runs as one Ray Train job whose workers Ray places and reserves on the
    cluster, so it holds no GPU (`gpus` 0) of the machine that dispatches it."""

    workers: int | None = Field(None, ge=2)  # None: `gpus` processes on the dispatching machine
    gpus_per_worker: int | None = Field(None, ge=0)  # None: 1 on a cluster with GPUs, else 0
    ray_address: str | None = None  # None: $RAY_ADDRESS where the job runs
    storage: str | None = None  # shared run root; each job's runs go to STORAGE/<job dir name>


class TrainGanSpec(RayTrainFields, SpecBase):
    kind: Literal["train-gan"] = "train-gan"
    gpus: int = Field(1, ge=0)  # 0 for a Ray Train job
    config: GanConfig


class TrainInspectorSpec(RayTrainFields, SpecBase):
    kind: Literal["train-inspector"] = "train-inspector"
    gpus: int = Field(1, ge=0)  # 0 for a Ray Train job
    config: InspectorConfig


class SynthSpec(SpecBase):
    kind: Literal["synth"] = "synth"
    config: SynthConfig


class TuneSpec(SpecBase):
    kind: Literal["tune"] = "tune"
    config: TuneConfig


class EvalInspectorSpec(SpecBase):
    """`dgan eval inspector`'s arguments."""

    kind: Literal["eval-inspector"] = "eval-inspector"
    model: str
    data: str
    split: str = "test"
    batch_size: int = 64
    tracking_uri: str | None = None
    json_out: str | None = None


class EvalFidSpec(SpecBase):
    """`dgan eval fid`'s arguments."""

    kind: Literal["eval-fid"] = "eval-fid"
    paths: list[str]
    n: int | None = None
    inspector: str | None = None
    inception_weights: str | None = None
    split_real: bool = False
    split: str = "train"
    image_size: int | None = None
    cache_dir: str = "runs/.cache/fid"
    seed: int = 0
    batch_size: int = 64
    tracking_uri: str | None = None
    json_out: str | None = None


class EvalSynthSpec(SpecBase):
    """`dgan eval synth`'s arguments."""

    kind: Literal["eval-synth"] = "eval-synth"
    model: str
    data: str
    inspector: str | None = None
    n: int | None = None
    split: str = "train"
    seed: int = 0
    batch_size: int = 64
    tracking_uri: str | None = None
    realism: bool = True
    realism_repeats: int = Field(1, ge=1, le=MAX_REALISM_REPEATS)
    control_repeats: int = Field(1, ge=1, le=MAX_CONTROL_REPEATS)
    realism_n: int | None = Field(None, ge=4)  # real defects per realism test, at most
    realism_by_set: bool = False  # a classifier of its own per label set, too
    realism_steps: int | None = Field(None, ge=1)  # per 600 training images (None: 300)
    json_out: str | None = None


class NoopSpec(SpecBase):
    """A job that does nothing: for checking a worker, timing the queue and trying retries."""

    kind: Literal["noop"] = "noop"
    seconds: float = Field(0.0, ge=0)  # sleep this long (interruptible)
    mark: str | None = None  # append one line per run (job, attempt, pid, devices) to this file
    fail_attempts: int = Field(0, ge=0)  # fail the first N attempts, then succeed


JobSpec = Annotated[
    TrainGanSpec
    | TrainInspectorSpec
    | SynthSpec
    | TuneSpec
    | EvalInspectorSpec
    | EvalFidSpec
    | EvalSynthSpec
    | NoopSpec,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter = TypeAdapter(JobSpec)


def parse_spec(data: str | dict[str, Any]) -> SpecBase:
    """A stored spec (JSON text or its dict) as its typed model."""
    if isinstance(data, str):
        return _ADAPTER.validate_json(data)
    return _ADAPTER.validate_python(data)


# ---------------------------------------------------------------------------------------------
# The options of each kind: the real commands' parsers
# ---------------------------------------------------------------------------------------------


def _command(kind: str):
    """The click command whose options `kind` takes, and how the CLI names it."""
    import typer

    if kind in ("tune", "noop"):
        from jobs.options import own_kinds

        return typer.main.get_command(own_kinds).commands[kind], f"dgan jobs submit {kind}"
    import cli  # the `dgan` command itself: its parsers and its option-to-config functions

    command = typer.main.get_command(cli.app)
    for part in KINDS[kind].command.split()[1:]:
        command = command.commands[part]
    return command, KINDS[kind].command


def parse_options(kind: str, args: list[str]) -> dict[str, Any]:
    """Parse `args` as the options of `kind`'s command, with that command's parser."""
    import typer

    command, prog = _command(kind)
    try:
        ctx = command.make_context(prog, list(args))
    except typer.Exit:
        raise DganError(f"{prog}: see '{prog} --help'", exit_code=2) from None
    except typer.exceptions.TyperException as err:  # click's usage errors
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise DganError(f"{prog}: {message}", exit_code=2) from None
    return dict(ctx.params)


def _plain(value: Any) -> Any:
    """Paths and tuples as JSON-friendly strings and lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _no_resume(params: dict[str, Any]) -> None:
    if params.get("resume") is not None:
        raise DganError(
            "--resume: a queued job resumes by itself from its latest checkpoint (each job has "
            "its own run root); submit it without --resume",
            exit_code=2,
        )


def _ray_train(params: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train fields of a training spec, checked as the command checks them; with
    `--workers` the job holds no GPU of the dispatching machine (Ray reserves the workers')."""
    import cli

    p = params
    storage = p.get("storage")
    # The queue's --gpus is what the job holds; with --workers only its default (1) makes sense.
    cli._ray_overrides(p.get("workers"), common["gpus"], p.get("ray_address"),
                       p.get("gpus_per_worker"), storage)  # fmt: skip
    if p.get("workers") is None:
        return {}
    if p["workers"] == 1:  # one process: a plain job on one GPU (or slot) of the dispatcher
        given = [f for f in ("ray_address", "gpus_per_worker", "storage") if p.get(f) is not None]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise DganError(
                f"{flags}: a queued job with --workers 1 runs on the machine that dispatches "
                "it; ask for more workers to run it on the Ray cluster, or leave them out",
                exit_code=2,
            )
        return {}
    if p.get("ray_address") == "local":
        raise DganError(
            "--ray-address local: a queued job with --workers runs on a Ray cluster (RAY_ADDRESS "
            "where the queue's worker runs, or --ray-address HOST:PORT); to train on the "
            "dispatching machine, give the queue's --gpus N instead of --workers",
            exit_code=2,
        )
    common["gpus"] = 0
    return {
        "workers": p["workers"],
        "gpus_per_worker": p.get("gpus_per_worker"),
        "ray_address": p.get("ray_address"),
        "storage": None if storage is None else str(Path(storage).expanduser().resolve()),
    }


def _train_gan(params: dict[str, Any], common: dict[str, Any]) -> TrainGanSpec:
    import cli

    _no_resume(params)
    ray = _ray_train(params, common)
    # As `dgan train gan` turns its options into overrides.
    overrides = list(params["set_"] or [])
    if params["data"] is not None:
        overrides.append(f"data.root={params['data']}")
    if params["tracking_uri"] is not None:
        overrides.append(f"log.tracking_uri={params['tracking_uri']}")
    if params["promote_if_better"] is not None:
        overrides.append(f"log.promote_if_better={json.dumps(params['promote_if_better'])}")
    config = cli._gan_config(params["config"], overrides, None)
    return TrainGanSpec(config=config, **ray, **common)


def _train_inspector(params: dict[str, Any], common: dict[str, Any]) -> TrainInspectorSpec:
    import cli

    _no_resume(params)
    ray = _ray_train(params, common)
    p = params
    overrides = cli._inspector_overrides(
        p["set_"], p["data"], p["synthetic"], p["arch"], p["pretrained"], p["grl"],
        p["defect_fraction"], p["tracking_uri"],
    )  # fmt: skip
    if p["promote_if_better"] is not None:
        overrides.append(f"log.promote_if_better={json.dumps(p['promote_if_better'])}")
    config = cli._inspector_config(p["config"], overrides, None)
    return TrainInspectorSpec(config=config, **ray, **common)


def _synth(params: dict[str, Any], common: dict[str, Any]) -> SynthSpec:
    import cli

    p = params
    # As `dgan synth` checks its options and turns them into overrides.
    if p["n"] is not None and p["n"] < 1:
        raise DganError(f"--n must be at least 1, got {p['n']}", exit_code=2)
    if p["per_class"] is not None and p["per_class"] < 1:
        raise DganError(f"--per-class must be at least 1, got {p['per_class']}", exit_code=2)
    values = {
        k: p[k]
        for k in ("n", "generator", "normals", "per_class", "batch_size", "tracking_uri",
                  "seed", "restored", "out")
    }  # fmt: skip
    if p["classes"] is not None:
        values["classes"] = [c.strip() for c in p["classes"].split(",") if c.strip()]
    overrides = cli._region_overrides(p["region"]) + [
        f"{k}={json.dumps(_plain(v))}" for k, v in values.items() if v is not None
    ]
    config = load_config("synth", list(p["config"] or []), [*overrides, *(p["set_"] or [])])
    return SynthSpec(config=config, **common)


def _eval(model: type[SpecBase], drop: tuple[str, ...] = ()):
    def build(params: dict[str, Any], common: dict[str, Any]) -> SpecBase:
        if common["gpus"] != 1:
            raise DganError(f"--gpus {common['gpus']}: an evaluation runs on one device", 2)
        values = {k: _plain(v) for k, v in params.items() if k not in drop}
        return model(**values, **common)

    return build


def _eval_fid(params: dict[str, Any], common: dict[str, Any]) -> EvalFidSpec:
    paths = params["paths"]
    # As `dgan eval fid` checks its arguments.
    if len(paths) not in (1, 2) or (len(paths) == 1 and not params["split_real"]):
        raise DganError(
            f"expected MODEL DATA (or DATA alone with --split-real), got {len(paths)} "
            f"argument(s): {' '.join(paths)}",
            exit_code=2,
        )
    return _eval(EvalFidSpec)(params, common)


def _eval_synth(params: dict[str, Any], common: dict[str, Any]) -> EvalSynthSpec:
    check_realism_repeats(params["realism_repeats"])  # as `dgan eval synth` checks them
    check_control_repeats(params["control_repeats"], params["inspector"], params["realism"])
    check_realism_options(
        params["realism_n"], params["realism"], params["realism_by_set"], params["realism_steps"]
    )
    return _eval(EvalSynthSpec)(params, common)


def _tune(params: dict[str, Any], common: dict[str, Any]) -> TuneSpec:
    return TuneSpec(config=load_config("tune", params["config"], params["set_"]), **common)


def _noop(params: dict[str, Any], common: dict[str, Any]) -> NoopSpec:
    return NoopSpec(**params, **common)


BUILDERS = {
    "train-gan": _train_gan,
    "train-inspector": _train_inspector,
    "synth": _synth,
    "eval-inspector": _eval(EvalInspectorSpec),
    "eval-fid": _eval_fid,
    "eval-synth": _eval_synth,
    "tune": _tune,
    "noop": _noop,
}


def build_spec(
    kind: str, args: list[str], gpus: int = 1, name: str | None = None, workdir: Path | None = None
) -> SpecBase:
    """The validated spec of a `kind` job with the command options `args`; DganError (exit
    code 2) names an unknown kind, an option its command does not take, or a bad config key."""
    if kind not in KINDS:
        raise DganError(f"unknown kind {kind!r}; choose one of {kind_names()}", exit_code=2)
    if gpus < 1:
        raise DganError(f"--gpus must be at least 1, got {gpus}", exit_code=2)
    params = parse_options(kind, args)
    params.pop("quiet", None)  # a queued job's output goes to its log either way
    params.pop("name", None)  # the queue's --name is the job's name and its run's suffix
    if "gpus" in params:
        params.pop("gpus")  # the queue's --gpus is both what the job holds and its processes
    common = {
        "name": name or KINDS[kind].run_name,
        "gpus": gpus,
        "workdir": str(Path(workdir or Path.cwd()).resolve()),
        "env": {k: os.environ[k] for k in SUBMIT_ENV if k in os.environ},
        "argv": list(args),
    }
    try:
        return BUILDERS[kind](params, common)
    except ValidationError as err:  # a value the command's parser let through
        raise DganError(f"{KINDS[kind].command}: {err}", exit_code=2) from None


def new_job(
    spec: SpecBase,
    queue: str = "default",
    priority: int = 0,
    max_retries: int = 0,
    after: list[int] | None = None,
) -> NewJob:
    """A spec and its scheduling, ready for Store.submit."""
    if max_retries < 0:
        raise DganError(f"--max-retries must be 0 or more, got {max_retries}", exit_code=2)
    return NewJob(
        kind=spec.kind, name=spec.name, spec=spec.model_dump_json(), argv=spec.argv,
        queue=queue, priority=priority, gpus=spec.gpus, max_retries=max_retries,
        after=list(after or []),
    )  # fmt: skip


def resolve_references(spec_text: str, outputs: dict[int, dict[str, str]]) -> SpecBase:
    """The spec with every ${JOB.output} replaced by that job's output."""

    def fill(match: re.Match) -> str:
        job, name = int(match.group(1)), match.group(2)
        value = outputs.get(job, {}).get(name)
        if value is None:
            raise DganError(f"${{{job}.{name}}}: job {job} left no {name} behind")
        return value

    data = json.loads(spec_text)

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return REFERENCE.sub(fill, value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return parse_spec(walk(data))


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

STEP_NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"
STEP_REFERENCE = re.compile(r"\$\{([A-Za-z][A-Za-z0-9_-]*)\.([a-z_]+)\}")


class PipelineStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STEP_NAME)
    kind: str
    args: list[str | int | float | bool] | str = []
    after: list[str] = []
    gpus: int = Field(1, ge=1)
    priority: int | None = None
    max_retries: int | None = Field(None, ge=0)
    queue: str | None = None


class PipelineFile(BaseModel):
    """A DAG of jobs: steps in order; a step runs after the steps it names in `after` and
    those whose outputs its args name (${step.output})."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    queue: str = "default"
    priority: int = 0
    max_retries: int = Field(0, ge=0)
    steps: list[PipelineStep] = Field(min_length=1)


def read_pipeline(path: Path, workdir: Path | None = None) -> list[NewJob]:
    """The jobs of a pipeline file, each validated as `dgan jobs submit` validates one;
    DganError names the step for a bad kind or option, a cycle, or an output no earlier step
    makes."""
    import yaml

    from dgan.config import format_validation_error

    path = Path(path)
    if not path.is_file():
        raise DganError(f"pipeline file {path} does not exist", exit_code=2)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DganError(f"{path} is not valid YAML: {err}", exit_code=2) from None
    try:
        pipeline = PipelineFile.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        text = format_validation_error(PipelineFile, err)
        text = text.replace("invalid configuration:", f"invalid pipeline {path}:")
        raise DganError(text, exit_code=2) from None
    steps = pipeline.steps
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.name in index:
            raise DganError(f"{path}: two steps are called {step.name!r}", exit_code=2)
        if step.kind not in KINDS:
            raise DganError(
                f"{path}: step {step.name!r}: unknown kind {step.kind!r}; choose one of "
                f"{kind_names()}",
                exit_code=2,
            )
        index[step.name] = i

    edges: dict[int, set[int]] = {i: set() for i in range(len(steps))}
    local_args = []
    for i, step in enumerate(steps):
        args = shlex.split(step.args) if isinstance(step.args, str) else [str(a) for a in step.args]
        for ref, output in STEP_REFERENCE.findall(" ".join(args)):
            where = f"{path}: step {step.name!r} names ${{{ref}.{output}}}"
            if ref not in index:
                raise DganError(f"{where}, but no step is called {ref!r}", exit_code=2)
            k = index[ref]
            if k >= i:
                raise DganError(
                    f"{where}, but {ref!r} is not an earlier step: a step may name only the "
                    "outputs of steps before it",
                    exit_code=2,
                )
            makes = KINDS[steps[k].kind].outputs
            if output not in makes:
                raise DganError(
                    f"{where}, but {ref!r} ({steps[k].kind}) makes "
                    f"{', '.join(makes) or 'no outputs'}",
                    exit_code=2,
                )
            edges[i].add(k)
        for name in step.after:
            if name not in index:
                raise DganError(
                    f"{path}: step {step.name!r} runs after {name!r}, but no step is called that",
                    exit_code=2,
                )
            edges[i].add(index[name])
        # ${step.output} -> ${@i.output}: the store turns it into the job id it gives step i.
        local_args.append(
            [STEP_REFERENCE.sub(lambda m: f"${{@{index[m[1]]}.{m[2]}}}", a) for a in args]
        )
    cycle = find_cycle(edges)
    if cycle:
        names = " -> ".join(steps[i].name for i in cycle)
        raise DganError(f"{path}: the steps wait on each other in a circle: {names}", exit_code=2)

    jobs = []
    for i, step in enumerate(steps):
        try:
            spec = build_spec(step.kind, local_args[i], step.gpus, step.name, workdir)
        except DganError as err:
            raise DganError(f"{path}: step {step.name!r}: {err}", err.exit_code) from None
        job = new_job(
            spec,
            step.queue or pipeline.queue,
            pipeline.priority if step.priority is None else step.priority,
            pipeline.max_retries if step.max_retries is None else step.max_retries,
        )
        job.after_new = sorted(edges[i])
        job.pipeline, job.step = pipeline.name or path.stem, step.name
        jobs.append(job)
    return jobs


def find_cycle(edges: dict[int, set[int]]) -> list[int] | None:
    """A circle in `edges` (node -> the nodes it waits on), as a path back to its start."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    path: list[int] = []

    def visit(node: int) -> list[int] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None
