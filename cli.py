"""The `dgan` command: a thin Typer front that parses, validates and calls one library function.

Heavy libraries (torch, mlflow, ray) are imported inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from dgan.errors import friendly
from jobs.cli import jobs_app  # the queue's commands import nothing heavy either

app = typer.Typer(
    help="Defect-GAN: synthesize and restore surface defects, and train defect inspectors.\n\n"
    "Example: dgan demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Make, check and prepare datasets.", no_args_is_help=True)
train_app = typer.Typer(help="Train Defect-GAN or the defect inspector.", no_args_is_help=True)
config_app = typer.Typer(help="Show resolved configs and presets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(config_app, name="config")
app.add_typer(jobs_app, name="jobs")

ConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--config",
        "-c",
        help="Preset name (demo, paper, table2/stargan...) or YAML file; repeatable, later wins.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: section.key=value; repeatable."),
]
PromoteOpt = Annotated[
    str | None,
    typer.Option(
        metavar="METRIC",
        help="Move alias 'champion' to the registered version only when METRIC improves on the "
        "champion's (log.promote_if_better; direction from dgan.metrics.registry or "
        "log.promote_mode). 'auto': realism_auc for Defect-GAN (fid with Inception weights), "
        "val_multi_target_accuracy for the inspector.",
    ),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
    ),
]


WorkersOpt = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        help="Run the job on N Ray Train workers of a Ray cluster (one process each, on any "
        "node): see --ray-address. Without it the job runs on this machine (--gpus).",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        metavar="ADDRESS",
        help="With --workers: the cluster's HOST:PORT, 'auto' (the one 'ray start' runs on this "
        "machine) or 'local' (start a Ray on 127.0.0.1 for this run). Default: $RAY_ADDRESS.",
    ),
]
GpusPerWorkerOpt = Annotated[
    int | None,
    typer.Option(
        metavar="G",
        help="With --workers: GPUs of each worker (nccl); 0 runs CPU workers (gloo). Default: 1 "
        "on a cluster with GPUs, else 0.",
    ),
]
StorageOpt = Annotated[
    str | None,
    typer.Option(
        metavar="PATH",
        help="With --workers: the run root (run directory, checkpoints) on storage every node "
        "mounts. Default: log.run_root when every node runs on this machine; required otherwise.",
    ),
]


def _ray_overrides(
    workers: int | None,
    gpus: int,
    ray_address: str | None,
    gpus_per_worker: int | None,
    storage: str | None,
) -> list[str]:
    """Check the Ray Train options before any work; --storage becomes the run root (so that
    --resume latest looks there)."""
    from dgan.errors import DganError

    if workers is None:
        given = [
            flag
            for flag, value in (
                ("--ray-address", ray_address),
                ("--gpus-per-worker", gpus_per_worker),
                ("--storage", storage),
            )
            if value is not None
        ]
        if given:
            raise DganError(
                f"{', '.join(given)} go{'es' * (len(given) == 1)} with --workers N (a Ray Train "
                "job); add --workers, or leave them out to train on this machine",
                exit_code=2,
            )
        return []
    from dgan.run.ray_train import check_scaling

    check_scaling(workers, gpus, gpus_per_worker)
    return [] if storage is None else [f"log.run_root={json.dumps(str(storage))}"]


def _train_on_ray(job_type, cfg, resume, workers, ray_address, gpus_per_worker, storage, **kw):
    from dgan.run.ray_train import train_on_ray

    return train_on_ray(
        job_type, cfg, resume=resume, workers=workers, gpus_per_worker=gpus_per_worker,
        address=ray_address, storage=storage, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# dgan data
# ---------------------------------------------------------------------------------------------


@data_app.command("demo")
@friendly
def data_demo(
    out: Annotated[Path, typer.Option(help="Directory to create (must not exist or be empty).")],
    n_normal: Annotated[int, typer.Option(help="Normal images.")] = 2000,
    n_defect: Annotated[int, typer.Option(help="Defect images.")] = 1000,
    size: Annotated[
        int,
        typer.Option(
            help="Image side in pixels. Draw at the size you train at: the demo presets train at "
            "32, and a set drawn larger and resized blurs the 1-2 px cracks."
        ),
    ] = 32,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
    workers: Annotated[int | None, typer.Option(help="Processes (default: all cores).")] = None,
) -> None:
    """Generate the procedural demo dataset (concrete surfaces, five CODEBRIM defect classes).

    Example: dgan data demo --out data/demo --n-normal 2000 --n-defect 1000 --size 32
    """
    import time

    from dgan.data.demo import generate_demo

    t0 = time.perf_counter()
    index = generate_demo(out, n_normal, n_defect, size, seed, workers)
    dt = time.perf_counter() - t0
    n = len(index.samples)
    typer.echo(f"wrote {n} images to {out} in {dt:.1f} s ({n / dt:.0f} images/s)")


@data_app.command("check")
@friendly
def data_check(
    root: Annotated[Path, typer.Argument(help="Dataset root: folder format or CODEBRIM.")],
    min_size: Annotated[int, typer.Option(help="Smallest acceptable image side.")] = 32,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON.")
    ] = None,
) -> None:
    """Report counts per class and split, co-occurrence, sizes, and every problem file.

    Exits 1 when the set is unusable for training.

    Example: dgan data check data/demo --json report.json
    """
    from dgan.data.check import check_dataset
    from dgan.io import atomic_write_text

    report = check_dataset(root, min_size=min_size)
    typer.echo(report.format())
    if json_out:
        atomic_write_text(json_out, json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.usable:
        raise typer.Exit(1)


@data_app.command("crop-normals")
@friendly
def data_crop_normals(
    src: Annotated[Path, typer.Argument(help="Directory of full-resolution normal images.")],
    out: Annotated[Path, typer.Option(help="Output dataset directory (folder format).")],
    n: Annotated[int, typer.Option(help="Number of patches.")] = 50_000,
    size: Annotated[int, typer.Option(help="Patch side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Same seed, same patches.")] = 0,
) -> None:
    """Crop random normal patches from full-resolution images (Sec. 4.1: 50,000 extra normals).

    Example: dgan data crop-normals photos/ --out data/extra-normals --n 50000 --size 128
    """
    from dgan.data.crop import crop_normals

    count = crop_normals(src, out, n, size, seed)
    typer.echo(f"wrote {count} normal patches to {out}")


@data_app.command("sheet")
@friendly
def data_sheet(
    root: Annotated[Path, typer.Argument(help="Dataset root in the folder format.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("contact_sheet.png"),
) -> None:
    """Write a contact sheet: normals per surface family, then examples of each class.

    Example: dgan data sheet data/demo --out sheet.png
    """
    from dgan.data.demo import contact_sheet

    typer.echo(f"wrote {contact_sheet(root, out)}")


# ---------------------------------------------------------------------------------------------
# dgan train / config / demo
# ---------------------------------------------------------------------------------------------


def _gan_config(config: list[str] | None, overrides: list[str] | None, resume: str | None):
    from dgan.config import load_config

    if resume is not None and not config:
        # Resuming continues the run's own config unless the user names another.
        from dgan.run.checkpoint import resolve_resume

        run_root = load_config("gan", None, overrides).log.run_root
        run_dir = resolve_resume(resume, run_root, "gan").parent.parent
        config = [str(run_dir / "config.yaml")]
    return load_config("gan", config or ["demo"], overrides)


@train_app.command("gan")
@friendly
def train_gan(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (default: the demo set).")] = None,
    gpus: Annotated[int, typer.Option(help="Processes; >1 runs DDP through Accelerate.")] = 1,
    resume: Annotated[
        str | None, typer.Option(help="'latest', a run directory or a checkpoint directory.")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    promote_if_better: PromoteOpt = None,
    name: Annotated[str, typer.Option(help="Suffix of the run directory name.")] = "gan",
    quiet: Annotated[bool, typer.Option(help="Plain progress lines, no live bar.")] = False,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Train Defect-GAN. With no arguments: the demo preset on the demo dataset (made if absent).

    A finished run registers its generator as a new version of the MLflow model defect-gan.
    With --workers N it runs as one Ray Train job on N workers of a Ray cluster.

    Example: dgan train gan --config demo --set train.iterations=2000 --gpus 2

    Example: dgan train gan --workers 8 --gpus-per-worker 1 --ray-address auto --storage /nfs/runs
    """
    overrides = _ray_overrides(workers, gpus, ray_address, gpus_per_worker, storage)
    overrides += list(set_ or [])
    if data is not None:
        overrides.append(f"data.root={data}")
    if tracking_uri is not None:
        overrides.append(f"log.tracking_uri={tracking_uri}")
    if promote_if_better is not None:
        overrides.append(f"log.promote_if_better={json.dumps(promote_if_better)}")
    cfg = _gan_config(config, overrides, resume)
    if workers is not None:
        from dgan.train.gan import GanJob

        result = _train_on_ray(
            GanJob, cfg, resume, workers, ray_address, gpus_per_worker, storage,
            quiet=quiet, run_name=name,
        )  # fmt: skip
    else:
        from dgan.train.gan import run_gan

        result = run_gan(cfg, resume=resume, gpus=gpus, quiet=quiet, run_name=name)
    if os.environ.get("RANK", "0") == "0":  # once, also under torchrun / accelerate launch
        typer.echo(f"run directory: {result.run_dir}")


@config_app.command("show")
@friendly
def config_show(
    job: Annotated[str, typer.Argument(help="gan, inspector, synth or tune.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved config of a job as YAML, after presets and overrides.

    Example: dgan config show gan --config demo --config table2/stargan --set train.batch_size=8
    """
    from dgan.config import JOB_CONFIGS, load_config, to_yaml
    from dgan.errors import DganError

    if job not in JOB_CONFIGS:
        raise DganError(f"unknown job {job!r}; choose one of {', '.join(JOB_CONFIGS)}", exit_code=2)
    typer.echo(to_yaml(load_config(job, config, set_)), nl=False)


@app.command("demo")
@friendly
def demo(
    iterations: Annotated[
        int | None, typer.Option(help="Defect-GAN iterations (default: the demo preset's).")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Inspector epochs (default: the inspector's demo preset).")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Synthesized defects per set (two sets).")] = 1000,
    eval_n: Annotated[
        int | None, typer.Option(help="Inputs per split of the evaluation (default up to 500).")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="The demo's state, summary and synthesized sets.")
    ] = Path("runs/demo"),
    data: Annotated[Path, typer.Option(help="Where the demo dataset is made (or found).")] = Path(
        "data/demo"
    ),
    realism: Annotated[
        bool, typer.Option(help="Run the realism test (a fresh classifier's AUC).")
    ] = True,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    db: Annotated[
        Path | None,
        typer.Option(envvar="DGAN_JOBS_DB", help="The job queue's database (runs/jobs.db)."),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Plain progress lines.")] = False,
) -> None:
    """The whole product end to end on 2 CPU cores: the demo set, Defect-GAN, its evaluation
    (realism, category control, background), the champion alias, synthesis from
    models:/defect-gan@champion (also onto a new surface's normals) and an inspector retrained on
    it through the job queue, both inspectors scored on the test split and the held-out family,
    and a summary table. A rerun skips every step whose output is there: an interrupted demo
    continues where it stopped.

    Example: dgan demo --iterations 2000 --n 500
    """
    from jobs.demo import Demo, DemoOptions

    options = DemoOptions(
        out=out, data=data, iterations=iterations, epochs=epochs, n=n, eval_n=eval_n,
        realism=realism, tracking_uri=tracking_uri, jobs_db=db, quiet=quiet,
    )  # fmt: skip
    run = Demo(options)
    typer.echo(run.run())
    typer.echo(run.where_to_look())


@app.command("ui")
@friendly
def ui(
    tracking_uri: Annotated[
        str | None, typer.Option(help="The store to show (default: the project's, mlflow.db).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the UI.")] = 5000,
) -> None:
    """The MLflow UI on the project's tracking store, with a link to each experiment's run table
    (the "Model training" view, where runs are compared). Ctrl-C stops it.

    Example: dgan ui --port 5000
    """
    from dgan.tracking.ui import serve_ui

    raise typer.Exit(serve_ui(tracking_uri, host, port, typer.echo))


# ---------------------------------------------------------------------------------------------
# dgan train inspector / dgan eval / dgan repro: the defect inspector (Sec. 3.2, 4.2, Table 3)
# ---------------------------------------------------------------------------------------------

eval_app = typer.Typer(help="Score trained models.", no_args_is_help=True)
repro_app = typer.Typer(help="Reproduce the paper's tables in miniature.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(repro_app, name="repro")

SyntheticOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--synthetic",
        help="Synthesized set in the folder format (defect/, normal/ restored normals, "
        "labels.csv) to mix into training; repeatable.",
    ),
]


def _inspector_config(
    config: list[str] | None, overrides: list[str], resume: str | None, preset: str = "demo"
):
    from dgan.config import load_config

    if resume is not None and not config:
        # Resuming continues the run's own config unless the user names another.
        from dgan.run.checkpoint import resolve_resume

        run_root = load_config("inspector", None, overrides).log.run_root
        run_dir = resolve_resume(resume, run_root, "inspector").parent.parent
        config = [str(run_dir / "config.yaml")]
    return load_config("inspector", config or [preset], overrides)


def _inspector_overrides(
    set_: list[str] | None,
    data: Path | None = None,
    synthetic: list[Path] | None = None,
    arch: str | None = None,
    pretrained: Path | None = None,
    grl: bool | None = None,
    defect_fraction: float | None = None,
    tracking_uri: str | None = None,
) -> list[str]:
    """Turn the inspector's CLI options into --set pairs (JSON is valid YAML, so paths survive)."""
    overrides = list(set_ or [])
    pairs = {
        "data.root": None if data is None else str(data),
        "data.synthetic": None if synthetic is None else [str(p) for p in synthetic],
        "model.arch": arch,
        "model.pretrained": None if pretrained is None else str(pretrained),
        "model.grl": grl,
        "data.defect_fraction": defect_fraction,
        "log.tracking_uri": tracking_uri,
    }
    overrides += [f"{k}={json.dumps(v)}" for k, v in pairs.items() if v is not None]
    return overrides


@train_app.command("inspector")
@friendly
def train_inspector(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: Annotated[
        Path | None, typer.Option(help="Real dataset root (default: demo set).")
    ] = None,
    synthetic: SyntheticOpt = None,
    arch: Annotated[str | None, typer.Option(help="resnet34, densenet121 or small.")] = None,
    pretrained: Annotated[
        Path | None,
        typer.Option(help="Local torchvision state dict for the backbone; nothing is downloaded."),
    ] = None,
    grl: Annotated[
        bool | None,
        typer.Option("--grl/--no-grl", help="Source classifier through a GRL (Sec. 3.2)."),
    ] = None,
    defect_fraction: Annotated[
        float | None, typer.Option(help="Keep real training defects at this share of normals.")
    ] = None,
    gpus: Annotated[int, typer.Option(help="Processes; >1 runs DDP through Accelerate.")] = 1,
    resume: Annotated[
        str | None, typer.Option(help="'latest', a run directory or a checkpoint directory.")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    promote_if_better: PromoteOpt = None,
    name: Annotated[str, typer.Option(help="Suffix of the run directory name.")] = "inspector",
    quiet: Annotated[bool, typer.Option(help="Plain progress lines, no live bar.")] = False,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Train the defect inspector on real images, optionally mixed with synthesized ones.

    With no arguments: the demo preset (small CNN, 32 px) on the demo dataset (made if absent).
    The best epoch by val multi-target accuracy is kept in RUN/inspector/, scored on test, and
    registered as a new version of the MLflow model defect-inspector.

    Example: dgan train inspector --promote-if-better val_multi_target_accuracy --gpus 2

    Example: dgan train inspector --config paper --workers 4 --ray-address auto --storage /nfs/runs
    """
    overrides = _ray_overrides(workers, gpus, ray_address, gpus_per_worker, storage)
    overrides += _inspector_overrides(
        set_, data, synthetic, arch, pretrained, grl, defect_fraction, tracking_uri
    )
    if promote_if_better is not None:
        overrides.append(f"log.promote_if_better={json.dumps(promote_if_better)}")
    cfg = _inspector_config(config, overrides, resume)
    if workers is not None:
        from dgan.train.inspector import InspectorJob

        result = _train_on_ray(
            InspectorJob, cfg, resume, workers, ray_address, gpus_per_worker, storage,
            quiet=quiet, run_name=name,
        )  # fmt: skip
    else:
        from dgan.train.inspector import run_inspector

        result = run_inspector(cfg, resume=resume, gpus=gpus, quiet=quiet, run_name=name)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"run directory: {result.run_dir}")


@eval_app.command("inspector")
@friendly
def eval_inspector(
    model: Annotated[
        str,
        typer.Argument(
            help="Inspector directory, its run directory, a checkpoint, or an MLflow model URI "
            "(models:/defect-inspector@champion, models:/defect-inspector/3, models:/m-...)."
        ),
    ],
    data: Annotated[Path, typer.Argument(help="Dataset root: folder format or CODEBRIM.")],
    split: Annotated[str, typer.Option(help="train, val, test or transfer.")] = "test",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the metrics as JSON.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Score a trained inspector on one split: multi-target accuracy, per-class P/R/F1/AP.

    Example: dgan eval inspector models:/defect-inspector@champion data/demo --json test.json
    """
    from dgan.io import atomic_write_text
    from dgan.train.inspector import evaluate_inspector

    report = evaluate_inspector(model, data, split, batch_size, tracking_uri)
    typer.echo(report.format())
    if json_out:
        result = {"model": str(model), "data": str(data), **report.to_dict()}
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")


InspectorSpecOpt = Annotated[
    str | None,
    typer.Option(
        "--inspector",
        help="Frozen inspector trained on real data: run dir, model dir or models:/NAME@alias.",
    ),
]
SplitOpt = Annotated[str, typer.Option(help="Split whose normals and defects are used.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")]


@eval_app.command("fid")
@friendly
def eval_fid(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="[MODEL] DATA",
            help="Generator (run dir, checkpoint, model dir or models:/ URI) and dataset root; "
            "DATA alone with --split-real.",
        ),
    ],
    n: Annotated[
        int | None,
        typer.Option(help="Images per set (default: every real defect of the split)."),
    ] = None,
    inspector: InspectorSpecOpt = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="Standard Inception weights (weights-inception-2015-12-05-6726825d.pth); "
            "default $DGAN_INCEPTION_WEIGHTS.",
        ),
    ] = None,
    split_real: Annotated[
        bool,
        typer.Option(help="Distance between two random halves of the real defects (the floor)."),
    ] = False,
    split: SplitOpt = "train",
    image_size: Annotated[
        int | None,
        typer.Option(help="Compare at this size (default: the generator's, else the inspector's)."),
    ] = None,
    cache_dir: Annotated[
        Path, typer.Option(help="Where reference statistics are cached (.npz).")
    ] = Path("runs/.cache/fid"),
    seed: Annotated[int, typer.Option(help="Same seed, same inputs, subsets and noise.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI for models:/ specs.")] = None,
    json_out: JsonOpt = None,
) -> None:
    """FID and KID between a generator's defects and real ones: standard FID with the Inception
    weights, else fid_inspector/kid_inspector on a frozen inspector's features (and says which).

    The generator defaces the split's normals with labels drawn from the dataset's label
    distribution; --split-real instead compares two random halves of the real defects.

    Example: dgan eval fid runs/gan/00000-gan data/demo --inspector runs/inspector/00000-inspector
    """
    from dgan.errors import DganError

    if len(paths) not in (1, 2) or (len(paths) == 1 and not split_real):
        raise DganError(
            f"expected MODEL DATA (or DATA alone with --split-real), got {len(paths)} "
            f"argument(s): {' '.join(paths)}",
            exit_code=2,
        )
    from dgan.evaluation.fid_report import evaluate_fid
    from dgan.events import ConsoleEvents
    from dgan.io import atomic_write_text

    model, data = (None, paths[0]) if len(paths) == 1 else paths
    report = evaluate_fid(
        Path(data), model, n, split, inspector, inception_weights, split_real, seed, batch_size,
        cache_dir, image_size, tracking_uri, events=ConsoleEvents(),
    )  # fmt: skip
    typer.echo(report.format())
    if json_out:
        atomic_write_text(json_out, json.dumps(report.to_dict(), indent=2) + "\n")


@eval_app.command("synth")
@friendly
def eval_synth(
    model: Annotated[str, typer.Argument(help="Generator: run dir, checkpoint or models:/ URI.")],
    data: Annotated[Path, typer.Argument(help="Dataset root whose normals are defaced.")],
    inspector: InspectorSpecOpt = None,
    n: Annotated[
        int | None, typer.Option(help="Inputs per split (default: up to 500 normals).")
    ] = None,
    split: SplitOpt = "train",
    seed: Annotated[int, typer.Option(help="Same seed, same inputs, boxes and noise.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI for models:/ specs.")] = None,
    realism: Annotated[
        bool,
        typer.Option(
            help="The realism test: a fresh classifier's held-out ROC-AUC telling G's images from "
            "real ones (0.5: it cannot tell them apart; 1.0: it always can)."
        ),
    ] = True,
    realism_repeats: Annotated[
        int,
        typer.Option(
            help="Classifier seeds per realism figure, averaged; the spread is printed too. Each "
            "costs one more classifier (about 10 s at 32 px on 2 CPU cores)."
        ),
    ] = 1,
    control_repeats: Annotated[
        int,
        typer.Option(
            help="With --inspector: defacements per real defect that it judges, each on other "
            "normals, so that rare label sets are judged on K times as many images."
        ),
    ] = 1,
    realism_n: Annotated[
        int | None,
        typer.Option(
            help="Real defects per realism test, at most (default: 600, the demo set's train "
            "split). The split needs two normals per defect used. More images, more power: point "
            "it at a larger real set than the one G trained on. Above 600, each classifier "
            "trains for proportionally more steps (3000: five times as long)."
        ),
    ] = None,
    realism_steps: Annotated[
        int | None,
        typer.Option(
            help="Adam steps of each realism classifier per 600 images it trains on (default: "
            "300, 32 passes over them). Fewer: a quick look; more: a test closer to finished, "
            "and slower in proportion."
        ),
    ] = None,
    realism_by_set: Annotated[
        bool,
        typer.Option(
            "--realism-by-set",
            help="Also give each label set of 40 real defects or more a classifier of its own, "
            "beside its floor (two halves of that set's real defects). About 10 s per set and "
            "split, and as much again for the floors the first time (cached).",
        ),
    ] = False,
    json_out: JsonOpt = None,
) -> None:
    """Synthesis quality: realism, category-control accuracy (with --inspector), background
    preservation, spatial-control precision and diversity, on the split and on the held-out
    surface family (split "transfer") when the dataset has one.

    Realism is a classifier two-sample test: a small CNN trained from scratch on half of the real
    defects and half of G's defacements (with the same label sets), scored by ROC-AUC on the
    other halves; 0.5 means it cannot tell them apart, 1.0 that it always can. The same test on
    two halves of the real data is printed as the floor. Restorations of real defects are tested
    against real normals the same way.

    With --inspector, each control figure has its ceiling beside it: the same inspector's calls
    on the real defects of that label set, and on the real normals. A ceiling far below 1 says the
    inspector, not G, is the weak link there. Under each label set's exact-match figure: its 95%
    Wilson interval and its number of images ("0.36-0.78 of 17"), then how its defacements miss
    it: the share called without each asked category, and the share called with one not asked.
    A label set as rare as 17 real defects gives a wide interval; --control-repeats K has the
    inspector judge K defacements per real defect, each on other normals.

    One classifier's AUC moves with its seed. --realism-repeats K averages K of them, each on its
    own halves, and prints their spread: compare two generators by figures whose difference
    exceeds it.

    The test can only see what its sample shows. One classifier for all label sets spends its
    steps on what tells most images apart, and a set of 40 real images gives it 20 to learn from:
    a flaw of one rare set can hide in that set's figure. --realism-by-set gives each set a
    classifier of its own; --realism-n N uses up to N real defects (two normals each). On a
    larger real set than the one G trained on, both see much more.

    Example: dgan eval synth runs/gan/00000-gan data/demo --inspector runs/inspector/00000-inspector

    Example: dgan eval synth runs/gan/00000-gan data/demo --realism-repeats 5

    Example: dgan eval synth runs/gan/00000-gan data/demo --control-repeats 5
    --inspector runs/inspector/00000-inspector

    Example: dgan data demo --out data/ref --n-normal 10000 --n-defect 5000 --seed 9 && dgan eval
    synth runs/gan/00000-gan data/ref --realism-n 3000 --realism-by-set

    Example: dgan eval synth runs/gan/00000-gan data/demo --realism-steps 1500
    """
    from dgan.evaluation.synth_report import evaluate_synthesis
    from dgan.io import atomic_write_text

    report = evaluate_synthesis(
        model, data, inspector, n, split, seed, batch_size, tracking_uri, realism,
        realism_repeats=realism_repeats, control_repeats=control_repeats, realism_n=realism_n,
        realism_by_set=realism_by_set, realism_steps=realism_steps,
    )  # fmt: skip
    typer.echo(report.format())
    if json_out:
        atomic_write_text(json_out, json.dumps(report.to_dict(), indent=2) + "\n")


@repro_app.command("table3")
@friendly
def repro_table3(
    synthetic: SyntheticOpt = None,
    data: Annotated[
        Path | None, typer.Option(help="Real dataset root (default: demo set).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Runs per row, seeds train.seed ... +K-1.")] = 3,
    defect_fraction: Annotated[
        float,
        typer.Option(help="Keep real training defects at this share of normals; 0 keeps all."),
    ] = 0.05,
    rows: Annotated[
        str, typer.Option(help="Comma-separated: real, grl, no-grl.")
    ] = "real,grl,no-grl",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Table 3 in miniature: real data only vs. mixed with a synthesized set, with and without GRL.

    Each row trains the inspector with K seeds and reports mean and std of test multi-target
    accuracy. By default the real set is the demo set with its training defects thinned to 5% of
    its normals. Every run is logged to MLflow (experiment defect-inspector) with tags
    dgan.repro=table3 and dgan.row=<row>, under one parent run.

    Example: dgan repro table3 --synthetic synth/demo --seeds 3 --defect-fraction 0.05
    """
    from dgan.events import ConsoleEvents
    from dgan.repro import parse_rows, run_table3

    chosen = parse_rows(rows)
    if defect_fraction < 0:
        from dgan.errors import DganError

        raise DganError("--defect-fraction must be 0 (keep all) or positive", exit_code=2)
    overrides = _inspector_overrides(
        set_, data, None, defect_fraction=defect_fraction or None, tracking_uri=tracking_uri
    )
    cfg = _inspector_config(config, overrides, None)
    table = run_table3(cfg, list(synthetic or []), seeds, chosen, events=ConsoleEvents())
    typer.echo(table.format())
    typer.echo(f"written to {table.out_dir}; compare the runs in the MLflow UI (dgan.repro=table3)")


# ---------------------------------------------------------------------------------------------
# dgan synth: synthesis at scale (Sec. 4.2)
# ---------------------------------------------------------------------------------------------


def _region_overrides(region: str) -> list[str]:
    """`full`, `random-box`, `boxes:FILE` or `masks:DIR` -> config overrides."""
    from dgan.errors import DganError

    kind, sep, path = region.replace("=", ":", 1).partition(":")
    if kind in ("full", "random-box") and not sep:
        return [f"region={kind}"]
    if kind in ("boxes", "masks") and path:
        return [f"region={kind}", f"region_path={json.dumps(path)}"]
    raise DganError(
        f"--region {region!r}: use full, random-box, boxes:FILE.csv or masks:DIR", exit_code=2
    )


@app.command("synth")
@friendly
def synth(
    n: Annotated[
        int | None, typer.Option("--n", help="Defect images to make (default 50,000, Sec. 4.2).")
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option(
            "--generator",
            "-g",
            help="Run dir, checkpoint, model dir or MLflow URI (models:/defect-gan@champion); "
            "default: the latest run under runs/gan.",
        ),
    ] = None,
    normals: Annotated[
        Path | None,
        typer.Option(help="Source normals: a dataset or a folder of images (default: G's data)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory (folder format).")] = Path("synth"),
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated categories every image gets.")
    ] = None,
    per_class: Annotated[
        int | None, typer.Option(help="Balanced: this many single-category images per class.")
    ] = None,
    region: Annotated[
        str, typer.Option(help="full, random-box, boxes:FILE.csv (x0,y0,x1,y1) or masks:DIR.")
    ] = "full",
    seed: Annotated[int, typer.Option(help="Image i depends only on (seed, i).")] = 0,
    batch_size: Annotated[int | None, typer.Option(help="Images per generator batch.")] = None,
    restored: Annotated[
        bool, typer.Option(help="Also write restored normals into normal/.")
    ] = True,
    gpus: Annotated[int, typer.Option(help="Processes; each takes every N-th chunk.")] = 1,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI for model URIs.")] = None,
    quiet: Annotated[bool, typer.Option(help="Plain progress lines.")] = False,
) -> None:
    """Synthesize a labelled defect set: defect/, masks/ (maps m), normal/, labels.csv, manifest.

    Labels follow the training set's label distribution unless --classes or --per-class is given.
    Interrupt it at any time (Ctrl-C, kill) and rerun the same command: it completes to exactly
    --n images. Rerunning a finished set writes nothing; other settings into the same --out are
    refused.

    Example: dgan synth --n 50000 --generator models:/defect-gan@champion --region random-box
    """
    # OpenMP threads that sleep when idle instead of spinning leave the cores to the loader and
    # PNG writers: on 2 CPU cores end-to-end synthesis went from 0.79-0.86 to 0.88-0.90 of the
    # bare generator rate. Set before torch is imported; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from dgan.errors import DganError

    if n is not None and n < 1:
        raise DganError(f"--n must be at least 1, got {n}", exit_code=2)
    if per_class is not None and per_class < 1:
        raise DganError(f"--per-class must be at least 1, got {per_class}", exit_code=2)
    values = {
        "n": n, "generator": generator, "normals": normals, "per_class": per_class,
        "batch_size": batch_size, "tracking_uri": tracking_uri, "seed": seed,
        "restored": restored, "out": out,
    }  # fmt: skip
    if classes is not None:
        values["classes"] = [c.strip() for c in classes.split(",") if c.strip()]
    # JSON values are YAML too, and keep strings strings (a run directory named 00042).
    overrides = _region_overrides(region) + [
        f"{k}={json.dumps(str(v) if isinstance(v, Path) else v)}"
        for k, v in values.items()
        if v is not None
    ]
    from dgan.config import load_config
    from dgan.synth.run import run_synth

    cfg = load_config("synth", config, [*overrides, *(set_ or [])])
    result = run_synth(cfg, gpus=gpus, quiet=quiet)
    written = result.metrics["written"]
    if written and os.environ.get("RANK", "0") == "0":  # once under torchrun
        typer.echo(
            f"wrote {written} images in {result.seconds:.1f} s "
            f"({result.metrics['images_per_second']:.1f} images/s); {result.run_dir} holds all "
            f"{result.total}"
        )


# ---------------------------------------------------------------------------------------------
# dgan tune: hyperparameter and loss-weight searches with Ray Tune
# ---------------------------------------------------------------------------------------------


@app.command("tune")
@friendly
def tune(
    trials: Annotated[
        int | None, typer.Option(help="Configurations to try (the population under PBT).")
    ] = None,
    space: Annotated[
        str | None,
        typer.Option(
            help="losses (Eq. 11-12 weights), optim (learning rates), all, or a YAML file of "
            "config keys with distributions."
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            metavar="METRIC",
            help="Registered metric to optimise, its direction from dgan.metrics.registry "
            "(default: realism_log_loss, the realism test's held-out log loss, ln 2 at chance; "
            "fid with Inception weights; fid_inspector with an inspector).",
        ),
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="asha, pbt or fifo.")] = None,
    search: Annotated[
        str | None, typer.Option(help="tpe (Optuna) or random; PBT samples at random.")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Trials at once (default: as many as fit).")
    ] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs each trial holds.")] = None,
    gpus_per_trial: Annotated[
        float | None, typer.Option(help="GPUs each trial holds; 0.25 packs four on one GPU.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Study name: runs/tune/NAME (default: numbered).")
    ] = None,
    resume: Annotated[
        str | None, typer.Option(metavar="NAME", help="Continue an interrupted study.")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Where Ray keeps checkpoints; on a cluster, shared storage (NFS, s3://)."
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="An existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)."),
    ] = None,
    register_best: Annotated[
        bool, typer.Option(help="Register the best trial's generator (defect-gan).")
    ] = False,
    promote_if_better: Annotated[
        bool, typer.Option(help="With --register-best: move @champion only on improvement.")
    ] = False,
    data: Annotated[Path | None, typer.Option(help="Dataset root (default: demo set).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="Tune preset or YAML file (default: demo)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override a tune key (grace_iterations=50) or a trial's GAN key "
            "(gan.train.iterations=400); repeatable.",
        ),
    ] = None,
) -> None:
    """Search loss weights and learning rates with Ray Tune; print the best trials, ranked.

    Each trial trains Defect-GAN in its Ray worker and reports at every periodic evaluation.
    ASHA stops poor trials early; PBT copies better trials' checkpoints into worse ones and
    perturbs their weights and learning rates. Results go to runs/tune/NAME, one MLflow parent
    run with a child run per trial, and best.yaml (a preset for 'dgan train gan --config').

    Example: dgan tune --trials 32 --scheduler asha --space all
    """
    from dgan.errors import DganError

    values = {
        "trials": trials, "space": space, "objective": objective, "scheduler": scheduler,
        "search": search, "max_concurrent": max_concurrent, "cpus_per_trial": cpus_per_trial,
        "gpus_per_trial": gpus_per_trial, "storage": storage, "address": address,
        "gan.data.root": None if data is None else str(data), "gan.log.tracking_uri": tracking_uri,
        "register_best": register_best or None, "promote_if_better": promote_if_better or None,
    }  # fmt: skip
    given = [k for k, v in values.items() if v is not None] + (["--config"] if config else [])
    given += ["--set"] if set_ else []
    if resume is not None and (given or name):
        raise DganError(
            f"--resume {resume} continues the study with its own saved config; drop "
            f"{', '.join(given + (['--name'] if name else []))}",
            exit_code=2,
        )
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items() if v is not None]
    from dgan.config import load_config
    from dgan.tune.study import run_study

    cfg = load_config("tune", config or ["demo"], [*overrides, *(set_ or [])])
    result = run_study(cfg, name=name, resume=resume)
    typer.echo(result.format())
    if result.best_config is not None:
        typer.echo(f"best config: {result.best_config}")
        typer.echo(f"  train it: dgan train gan --config {result.best_config}")
    typer.echo(
        f"compare the trials in the MLflow UI: the children of run {result.parent_run_id} "
        "(experiment defect-gan)"
    )


# ---------------------------------------------------------------------------------------------
# dgan models: the MLflow model registry
# ---------------------------------------------------------------------------------------------

models_app = typer.Typer(help="Registered model versions and their aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
@friendly
def models_list(
    name: Annotated[
        str | None, typer.Argument(help="Registered model (default: every one).")
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the versions as JSON to this file; '-': stdout."),
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Show the versions of registered models: aliases, creation time, run and key metrics.

    Example: dgan models list defect-inspector --json -
    """
    from dgan.tracking.registry import format_versions, list_versions
    from dgan.tracking.tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    rows = list_versions(name, uri)
    if json_out is not None:
        text = json.dumps({"tracking_uri": uri, "versions": [r.to_dict() for r in rows]}, indent=2)
        if str(json_out) == "-":
            typer.echo(text)
            return
        from dgan.io import atomic_write_text

        atomic_write_text(json_out, text + "\n")
    if not rows:
        typer.echo(
            f"no registered models at {uri}. A finished 'dgan train gan' or 'dgan train "
            "inspector' registers its model (log.log_model and log.registered_model)."
        )
        return
    typer.echo(format_versions(rows))


@models_app.command("promote")
@friendly
def models_promote(
    name: Annotated[str, typer.Argument(help="Registered model, e.g. defect-gan.")],
    version: Annotated[str, typer.Argument(help="Version number to point the alias at.")],
    alias: Annotated[str, typer.Option(help="Alias to set or move.")] = "champion",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point an alias (default: champion) at a version; models:/NAME@ALIAS then loads it.

    Example: dgan models promote defect-gan 3 --alias champion
    """
    from dgan.tracking.registry import promote

    previous = promote(name, version, alias, tracking_uri)
    was = f" (was version {previous})" if previous and previous != version else ""
    typer.echo(f"{name}@{alias} -> version {version}{was}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":
    sys.exit(app())
