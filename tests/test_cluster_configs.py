"""The deployment configs under cluster/ parse, and every `dgan` command in them exists.

A command is found wherever `dgan` stands as a word followed by another word: in comments, in
shell lines (backslash continuations joined), and in YAML strings (a RayJob's entrypoint, the
launcher's commands). In these files, then, `dgan WORD` is always a command; prose says "the
project" instead. `$(which dgan)` counts as `dgan`. Each command is walked down the Typer app of
cli.py, and each `--flag` it is given must be an option of the command it reaches.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SHELL_SUFFIXES = {".sh", ".sbatch"}
YAML_SUFFIXES = {".yaml", ".yml"}

# ---------------------------------------------------------------------------------------------
# Finding commands
# ---------------------------------------------------------------------------------------------

ENDS_COMMAND = {";", "&&", "||", "|", "&", ")", "<", ">"}
SUBSTITUTION = re.compile(r"\$\(\([^()]*\)\)|\$\([^()]*\)")  # $((arithmetic)), $(command)
TOKEN = re.compile(r"&&|\|\||[;|&()<>]|[^\s;|&()<>]+")
WORD = re.compile(r"[a-z][a-z0-9-]*")
FLAG = re.compile(r"--?[A-Za-z][\w-]*")


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, line) with backslash continuations joined; a continued comment's
    next line loses its leading '#'."""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if pending:
            line = line.lstrip()
            if pending.lstrip().startswith("#"):
                line = line.removeprefix("#")
        else:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def tokens_of(line: str) -> list[str]:
    body = line.strip().lstrip("#")
    body = re.sub(r"\$\(which dgan\)", "dgan", body)
    body = SUBSTITUTION.sub("VALUE", body)
    return [t.strip("\"'`") for t in TOKEN.findall(body)]


def commands_in(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, the words after `dgan`) for each dgan command in `text`."""
    for number, line in logical_lines(text):
        tokens = tokens_of(line)
        for i, token in enumerate(tokens[:-1]):
            if token != "dgan" or not WORD.fullmatch(tokens[i + 1]):
                continue
            command = []
            for word in tokens[i + 1 :]:
                if word in ENDS_COMMAND or word.startswith("#"):
                    break
                command.append(word)
            yield number, command


def yaml_strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from yaml_strings(key)
            yield from yaml_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from yaml_strings(value)


def commands_in_file(path: Path) -> list[tuple[str, list[str]]]:
    """('file:line', command words) for every dgan command in one file of cluster/."""
    text = path.read_text()
    where = path.relative_to(REPO)
    if path.suffix not in YAML_SUFFIXES:
        return [(f"{where}:{n}", c) for n, c in commands_in(text)]
    comments = "\n".join(line if line.lstrip().startswith("#") else "" for line in text.split("\n"))
    found = [(f"{where}:{n}", c) for n, c in commands_in(comments)]
    for document in yaml.safe_load_all(text):
        for string in yaml_strings(document):
            found += [(f"{where} (a YAML string)", c) for _, c in commands_in(string)]
    return found


# ---------------------------------------------------------------------------------------------
# Checking a command against the Typer app
# ---------------------------------------------------------------------------------------------


# Typer 0.29 carries its own copy of click, so commands and options are told by their attributes.


def dgan_command():
    """The click command behind `dgan`, as Typer builds it from cli.py."""
    import cli

    return typer.main.get_command(cli.app)


def is_group(command) -> bool:
    return hasattr(command, "commands")


def options(command) -> list:
    return [p for p in command.params if p.param_type_name == "option"]


def option_names(command) -> set[str]:
    names = {"--help"}
    for option in options(command):
        names |= set(option.opts) | set(option.secondary_opts)
    return names


def takes_value(command, flag: str) -> bool:
    return any(flag in option.opts and not option.is_flag for option in options(command))


def submitted_kind(submit, args: list[str]) -> tuple[str | None, int]:
    """The KIND of `dgan jobs submit [its options] KIND ...` and its position in `args`."""
    skip = False
    for i, word in enumerate(args):
        if skip:
            skip = False
        elif FLAG.fullmatch(word.split("=")[0]):
            skip = "=" not in word and takes_value(submit, word)
        else:
            return word, i
    return None, len(args)


def kind_command(kind: str):
    """The command whose options `dgan jobs submit KIND` takes (as jobs/spec.py resolves it)."""
    from jobs.kinds import KINDS

    if kind not in KINDS:
        return None
    if kind in ("tune", "noop"):
        from jobs.options import own_kinds

        return typer.main.get_command(own_kinds).commands[kind]
    command = dgan_command()
    for part in KINDS[kind].command.split()[1:]:
        command = command.commands[part]
    return command


def check_command(words: list[str], root=None) -> str | None:
    """None when `dgan WORDS...` names an existing command with options it accepts, else why."""
    command = root or dgan_command()
    path = ["dgan"]
    rest = list(words)
    while is_group(command):
        if not rest or rest[0] not in command.commands:
            name = " ".join([*path, *rest[:1]])
            return f"{name}: no such command; {' '.join(path)} has {', '.join(command.commands)}"
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    allowed = option_names(command)
    if path[1:] == ["jobs", "submit"]:
        kind, at = submitted_kind(command, rest)
        kind_cmd = kind_command(kind) if kind else None
        if kind_cmd is None:
            return f"dgan jobs submit {kind or ''}: no such job kind"
        allowed |= option_names(kind_cmd)
        path.append(kind)
        rest = rest[:at] + rest[at + 1 :]
    unknown = [
        w for w in rest if FLAG.fullmatch(w.split("=")[0]) and w.split("=")[0] not in allowed
    ]
    if unknown:
        return f"{' '.join(path)}: no option {', '.join(unknown)}"
    return None


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def header(path: Path) -> str:
    """The comment block a file opens with (after a shebang)."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("#!") and not lines:
            continue
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_every_file_under_cluster_parses():
    files = cluster_files()
    assert len(files) >= 8
    for path in files:
        if path.suffix in YAML_SUFFIXES:
            assert [d for d in yaml.safe_load_all(path.read_text()) if d], path
        elif path.suffix in SHELL_SUFFIXES:
            result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert result.returncode == 0, f"{path}: {result.stderr}"
            assert path.read_text().startswith("#!/bin/bash\n"), path
        elif path.name == "Dockerfile":
            assert re.search(r"^FROM \S+", path.read_text(), re.M), path
        else:
            pytest.fail(f"{path}: not a kind of file this test knows how to check")


def test_every_file_opens_with_a_header_naming_the_command_that_uses_it():
    for path in cluster_files():
        text = header(path)
        assert len(text.splitlines()) >= 3, f"{path}: no header comment"
        assert str(path.relative_to(REPO)) in text, f"{path}: its header never names the file"


def test_every_dgan_command_in_the_configs_exists_and_takes_its_flags():
    root = dgan_command()
    found = [(where, words) for path in cluster_files() for where, words in commands_in_file(path)]
    problems = [f"{w}: {msg}" for w, words in found if (msg := check_command(words, root))]
    assert not problems, "\n".join(problems)
    # The finder finds: every file that runs dgan names at least one command.
    with_commands = {where.split(":")[0].split(" ")[0] for where, _ in found}
    expected = {
        "cluster/ray/cluster.yaml",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob.yaml",
        "cluster/accelerate/one-node-4gpu.yaml",
        "cluster/accelerate/two-nodes-8gpu.yaml",
        "cluster/slurm/train-multinode.sbatch",
        "cluster/slurm/ray-cluster.sbatch",
    }
    assert expected <= with_commands, expected - with_commands


def test_the_checker_rejects_a_made_up_command_a_made_up_flag_and_a_made_up_kind():
    root = dgan_command()
    assert check_command(["train", "gan", "--config", "paper", "--set", "a.b=1"], root) is None
    assert check_command(["jobs", "submit", "--priority", "5", "synth", "--n", "9"], root) is None
    assert "no such command" in check_command(["trian", "gan"], root)
    assert "no such command" in check_command(["train", "gam"], root)
    assert "no option --iters" in check_command(["train", "gan", "--iters=5"], root)
    assert "no option --bogus" in check_command(["jobs", "submit", "train-gan", "--bogus"], root)
    assert "no such job kind" in check_command(["jobs", "submit", "train-gann"], root)
    # ... and finds commands where they hide: a continued comment, $(which dgan), a YAML string.
    text = (
        "#   accelerate launch $(which dgan) train gan \\\n#     --bogus 1\n"
        'srun "$(which dgan)" synth --n $((4 * N)) --out x && echo done\n'
        "name: dgan\n"
    )
    assert list(commands_in(text)) == [
        (1, ["train", "gan", "--bogus", "1"]),
        (3, ["synth", "--n", "VALUE", "--out", "x"]),
    ]
    assert [c for _, c in commands_in("dgan trian gan --x")] == [["trian", "gan", "--x"]]


def test_kuberay_manifests_are_a_raycluster_and_a_rayjob_of_gpu_workers():
    def only(path: str, kind: str) -> dict:
        documents = [d for d in yaml.safe_load_all((CLUSTER / path).read_text()) if d]
        assert [(d["apiVersion"], d["kind"]) for d in documents] == [("ray.io/v1", kind)]
        return documents[0]

    cluster = only("kuberay/raycluster.yaml", "RayCluster")["spec"]
    job = only("kuberay/rayjob.yaml", "RayJob")["spec"]
    assert job["entrypoint"].startswith("dgan ")
    assert check_command(job["entrypoint"].split()[1:]) is None
    for spec in (cluster, job["rayClusterSpec"]):
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:  # KubeRay reads rayStartParams as a map of strings
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group
        for worker in spec["workerGroupSpecs"]:
            assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
            [container] = worker["template"]["spec"]["containers"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for g in groups
            for v in g["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {"dgan-shared"}  # every pod mounts the one shared volume
    [claim] = yaml.safe_load_all((CLUSTER / "kuberay/shared-storage.yaml").read_text())
    assert (claim["kind"], claim["metadata"]["name"]) == ("PersistentVolumeClaim", "dgan-shared")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_ray_launcher_yaml_has_what_rays_launcher_requires():
    config = yaml.safe_load((CLUSTER / "ray/cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert all(t.get("min_workers", 0) <= t["max_workers"] for t in workers)
    assert sum(t.get("min_workers", 0) for t in workers) <= config["max_workers"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers)
    assert config["setup_commands"] and config["head_start_ray_commands"]
    # Ray's own schema of the launcher's config, read from the installed package (no Ray start).
    import jsonschema

    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_accelerate_configs_load_with_accelerates_parser_as_bf16_multi_gpu():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    expected = {"one-node-4gpu.yaml": (1, 4), "two-nodes-8gpu.yaml": (2, 8)}
    assert {p.name for p in (CLUSTER / "accelerate").iterdir()} == set(expected)
    for name, (machines, processes) in expected.items():
        config = ClusterConfig.from_yaml_file(str(CLUSTER / "accelerate" / name))
        assert config.distributed_type == DistributedType.MULTI_GPU, name
        assert (config.num_machines, config.num_processes) == (machines, processes), name
        assert config.mixed_precision == "bf16" and config.main_process_port, name
        assert machines == 1 or config.main_process_ip, name


def test_literal_global_batches_divide_over_the_processes_that_share_them():
    """train.batch_size counts both halves of the global batch: a multiple of 2 x processes."""
    checked = 0
    for path in cluster_files():
        processes = None
        if path.parent.name == "accelerate":
            processes = yaml.safe_load(path.read_text())["num_processes"]
        for where, words in commands_in_file(path):
            batch = [w.split("=", 1)[1] for w in words if w.startswith("train.batch_size=")]
            workers = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--workers"]
            count = workers[0] if workers else processes
            if batch and batch[0].isdigit() and count and str(count).isdigit():
                assert int(batch[0]) % (2 * int(count)) == 0, f"{where}: {words}"
                checked += 1
    assert checked >= 4
