"""The job API: one library call per job, a typed result, a metrics callback that can stop it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import TINY_INSPECTOR, tiny_gan_config

from dgan.config import load_config
from dgan.events import CollectEvents
from dgan.run import checkpoint as ckpt
from dgan.run.result import Directive, Report
from dgan.train.gan import run_gan
from dgan.train.inspector import run_inspector

DGAN = Path(__file__).resolve().parents[1] / "dgan"


def state(checkpoint: Path, nets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    saved = torch.load(checkpoint / "state.pt", weights_only=True)
    return {f"{net}.{k}": v for net in nets for k, v in saved[net].items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class StopAt:
    """A callback that records every report and asks for a stop at the first `kind` >= step."""

    def __init__(self, step: int, kind: str = "log") -> None:
        self.step, self.kind = step, kind
        self.reports: list[Report] = []

    def __call__(self, report: Report) -> Directive | None:
        self.reports.append(report)
        if report.kind == self.kind and report.step >= self.step:
            return Directive.STOP
        return None


def test_a_gan_callback_stop_pauses_at_that_iteration_and_a_resume_equals_an_uninterrupted_run(
    tiny_folder, workdir, one_thread
):
    extra = ("train.iterations=10", "train.random_region_prob=0.5", "log.log_every=1")
    straight = run_gan(tiny_gan_config(tiny_folder, *extra), events=CollectEvents())
    stop = StopAt(4)
    paused = run_gan(tiny_gan_config(tiny_folder, *extra), events=CollectEvents(), callback=stop)
    assert (paused.state, paused.step, paused.total) == ("paused", 4, 10)
    assert [r.step for r in stop.reports if r.kind == "log"] == [1, 2, 3, 4]
    assert "d_total" in stop.reports[0].metrics and "g_total" not in stop.reports[0].metrics
    assert ckpt.checkpoint_iteration(paused.checkpoint) == 4
    assert ckpt.read_status(paused.run_dir)["state"] == "paused"
    # The stop's checkpoint is announced to the callback before the job returns.
    assert (
        stop.reports[-1].kind == "checkpoint" and stop.reports[-1].checkpoint == paused.checkpoint
    )

    resumed = run_gan(
        tiny_gan_config(tiny_folder, *extra), resume=str(paused.run_dir), events=CollectEvents()
    )
    assert (resumed.state, resumed.step, resumed.run_dir) == ("finished", 10, paused.run_dir)
    nets = ("G", "D", "G_ema")
    assert_same(state(straight.checkpoint, nets), state(resumed.checkpoint, nets))


def test_a_checkpoint_request_writes_one_at_that_step_and_the_run_goes_on(
    tiny_folder, workdir, one_thread
):
    seen: list[Report] = []

    def checkpoint_at_2(report: Report) -> Directive | None:
        seen.append(report)
        return Directive.CHECKPOINT if report.kind == "log" and report.step == 2 else None

    config = tiny_gan_config(tiny_folder, "train.iterations=6", "log.checkpoint_every=100")
    result = run_gan(config, events=CollectEvents(), callback=checkpoint_at_2)
    assert result.state == "finished"
    written = [r.checkpoint.name for r in seen if r.kind == "checkpoint"]
    assert written == ["iter-00000002", "iter-00000006"]


def test_an_inspector_callback_stop_after_its_first_validation_pauses_and_resumes_exactly(
    tiny_folder, workdir, one_thread
):
    def config():
        return load_config(
            "inspector", [], [*TINY_INSPECTOR, f"data.root={tiny_folder}", "train.epochs=3",
                              "log.log_model=false"],
        )  # fmt: skip

    straight = run_inspector(config(), events=CollectEvents())
    stop = StopAt(1, kind="eval")
    paused = run_inspector(config(), events=CollectEvents(), callback=stop)
    evals = [r for r in stop.reports if r.kind == "eval"]
    assert len(evals) == 1 and "val_multi_target_accuracy" in evals[0].metrics
    steps_per_epoch = straight.total // 3
    assert (paused.state, paused.step) == ("paused", steps_per_epoch)
    resumed = run_inspector(config(), resume=str(paused.run_dir), events=CollectEvents())
    assert (resumed.state, resumed.step) == ("finished", straight.total)
    assert_same(state(straight.checkpoint, ("model",)), state(resumed.checkpoint, ("model",)))
    assert resumed.metrics["test_multi_target_accuracy"] == pytest.approx(
        straight.metrics["test_multi_target_accuracy"]
    )


def test_the_result_carries_the_mlflow_run_id_the_metrics_mlflow_holds_and_the_registration(
    tiny_folder, workdir, one_thread
):
    import mlflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"  # absolute: MLflow caches a store per URI
    config = tiny_gan_config(
        tiny_folder, "train.iterations=6", "log.log_model=true", f"log.tracking_uri={uri}"
    )
    result = run_gan(config, events=CollectEvents())
    assert result.state == "finished" and result.kind == "gan"
    assert result.mlflow_run_id == ckpt.read_status(result.run_dir)["mlflow_run_id"]
    client = mlflow.MlflowClient(uri)
    held = client.get_run(result.mlflow_run_id).data.metrics
    assert result.metrics == held and "d_total" in held
    history = [m.value for m in client.get_metric_history(result.mlflow_run_id, "d_total")]
    assert len(history) == 3 and result.best["d_total"] == min(history)
    assert "mask_mean" not in result.best  # no registered direction: no "best"
    assert (result.registered_model, result.registered_version) == ("defect-gan", "1")
    assert (result.model_dir / "model.safetensors").is_file()
    assert result.model_uri.startswith("models:/")


def imports_of(path: Path) -> set[str]:
    """Every dgan module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "dgan" or m.startswith("dgan.")}


def module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in DGAN.rglob("*.py"):
        parts = path.relative_to(DGAN.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_dgan_modules_import_each_other_without_a_circle():
    graph = module_graph()
    assert len(graph) > 40
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_arrows_point_down_models_know_nothing_of_training_and_dgan_nothing_of_its_fronts():
    graph = module_graph()
    for name, imported in graph.items():
        if name.startswith("dgan.models"):
            assert not {m for m in imported if m.startswith(("dgan.train", "dgan.run"))}, name
    for path in DGAN.rglob("*.py"):
        text = path.read_text()
        assert "import cli" not in text and "from jobs" not in text, path
