"""The README matches the code: its config reference is the generated one, and the commands
it names exist."""

from pathlib import Path

from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import config_reference

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_readme_config_reference_is_current():
    assert config_reference() in README, "README config reference is stale: paste the output of `rlhf config-reference`"


def test_readme_opens_with_the_two_setup_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make run", "make test"]


def test_commands_named_in_readme_exist():
    result = CliRunner().invoke(app, ["--help"])
    for command in ("validate", "run-all", "sft", "rm", "ppo", "score", "config-reference", "status", "report", "eval",
                    "generate"):
        assert f"rlhf {command}" in README
        assert command in result.output
