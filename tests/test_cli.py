"""The installed commands (beit3.cli) and the package as a wheel, used from outside the checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from beit3 import cli
from beit3.package_files import CONFIG_DIR, find_config_file

ROOT = Path(__file__).resolve().parent.parent


def test_packaged_configs_are_found_from_any_directory_and_a_missing_one_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("configs/tasks/vqa_base.yaml", "tasks/vqa_base.yaml"):
        assert find_config_file(name) == CONFIG_DIR / "tasks" / "vqa_base.yaml"
    (tmp_path / "configs" / "tasks").mkdir(parents=True)
    (tmp_path / "configs" / "tasks" / "vqa_base.yaml").write_text("train: {}\n")  # the user's own file comes first
    assert find_config_file("configs/tasks/vqa_base.yaml") == Path("configs/tasks/vqa_base.yaml")
    with pytest.raises(FileNotFoundError, match=r"No config file at configs/tasks/nope.yaml .*packaged ones are under"):
        find_config_file("configs/tasks/nope.yaml")


def test_the_command_names_its_commands_and_tasks(capsys):
    with pytest.raises(SystemExit, match="unknown command 'fly'; the commands are pretrain, finetune, train-tokenizer"):
        cli.main(["fly"])
    with pytest.raises(
        SystemExit,
        match="the first argument names the task, one of captioning, classification, nlvr2, retrieval, vqa; got .vqa2.",
    ):
        cli.main(["finetune", "vqa2", "--config", "x.yaml"])
    with pytest.raises(SystemExit) as ended:
        cli.main(["finetune", "vqa", "--print-config", "--config", "configs/tasks/vqa_base.yaml"])
    assert ended.value.code == 0 and "answer_min_count" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_command_helps_under_the_name_it_was_called_by(command, capsys):
    with pytest.raises(SystemExit) as ended:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert ended.value.code == 0 and out.startswith(f"usage: beit3 {command} "), out[:200]
    if command == "finetune":  # the tasks, and where each task's options are
        assert "{captioning,classification,nlvr2,retrieval,vqa}" in out and "beit3 finetune <task> --help" in out
    with pytest.raises(SystemExit) as ended:
        getattr(cli, command.replace("-", "_"))(["--help"])  # the installed beit3-<command>
    assert ended.value.code == 0 and capsys.readouterr().out.startswith(f"usage: beit3-{command} ")


@pytest.mark.e2e
def test_the_wheel_works_from_outside_the_checkout(tmp_path):
    """pip install of the built wheel (not editable) into a folder of its own; presets, packaged run configs and the
    console scripts work from another directory, with the checkout nowhere on the path."""
    source = tmp_path / "source"  # built from a copy: the build leaves nothing in the checkout
    shutil.copytree(ROOT / "beit3", source / "beit3", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("beit3-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import beit3; from beit3 import Beit3Config; from beit3.configuration_beit3 import list_presets; "
        "config = Beit3Config.from_preset('beit3_base_patch16_224'); "
        "print(beit3.__file__, config.hidden_size, len(list_presets()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0].startswith(str(site)) and out[1] == "768" and int(out[2]) > 10
    for command in (
        ["beit3-pretrain", "--help"],
        ["beit3", "export", "--help"],
        ["beit3-finetune", "captioning", "--help"],
    ):
        result = subprocess.run(
            [sys.executable, str(site / "bin" / command[0]), *command[1:]],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and ("--config" in result.stdout or "--checkpoint-dir" in result.stdout), (
            result.stderr
        )
    shown = subprocess.run(
        [
            sys.executable,
            str(site / "bin" / "beit3"),
            "finetune",
            "nlvr2",
            "--print-config",
            "--config",
            "configs/tasks/nlvr2_base.yaml",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and "head_lr_scale" in shown.stdout, shown.stderr
