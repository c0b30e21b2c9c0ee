"""The quiet console of run-all: other libraries' output to log.txt, our lines and errors on the
terminal, -v for everything; the closing lines and summary table read the stages' manifests."""

from __future__ import annotations

import io
import sys
import textwrap

from rlhf.config import load_config
from rlhf.console import closing_line, is_our_bar, run_logged, summary_lines
from tests.conftest import write_config

NOISY = textwrap.dedent("""
    import sys, warnings, logging
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    warnings.warn("some library is deprecated", FutureWarning)
    sys.stderr.write("Tokenizing train dataset: 100%|##########| 32/32 [00:00<00:00]\\r")
    print("wandb: Syncing run tiny-sft")
    logging.getLogger("rlhf.sft").info("sft: 32 rows, 4 steps")
    logging.getLogger("transformers.trainer").info("***** Running training *****")
    sys.stderr.write(" 50%|#####     | 2/4 [00:01<00:01]\\r")
""")


def test_only_our_lines_reach_the_terminal_and_everything_the_log(tmp_path):
    out, log = io.StringIO(), tmp_path / "sft" / "log.txt"
    assert run_logged([sys.executable, "-c", NOISY], log, out=out) == 0
    assert out.getvalue() == "  sft: 32 rows, 4 steps\n"
    text = log.read_text()
    for piece in ("FutureWarning", "Tokenizing train dataset", "wandb: Syncing", "Running training", "sft: 32 rows"):
        assert piece in text
    verbose = io.StringIO()
    run_logged([sys.executable, "-c", NOISY], log, verbose=True, out=verbose)
    assert "FutureWarning" in verbose.getvalue() and "wandb: Syncing" in verbose.getvalue()


def test_errors_are_never_hidden(tmp_path):
    out = io.StringIO()
    status = run_logged([sys.executable, "-c", "import sys; print('noise'); sys.stderr.write('error: bad data\\n'); sys.exit(2)"],
                        tmp_path / "log.txt", out=out)
    assert status == 2 and out.getvalue().splitlines() == ["error: bad data", f"full output: {tmp_path / 'log.txt'}"]
    out = io.StringIO()
    status = run_logged([sys.executable, "-c", "print('noise'); raise RuntimeError('a bug')"], tmp_path / "log.txt", out=out)
    shown = out.getvalue()
    assert status == 1 and "Traceback (most recent call last):" in shown and "RuntimeError: a bug" in shown


def test_our_bars_are_told_from_other_libraries_bars():
    assert is_our_bar(" 50%|#####     | 2/4 [00:01<00:01]")  # the Trainer's step bar
    assert is_our_bar("PPO:  25%|##        | 1/4 [00:03<00:09, reward=0.1]")
    for foreign in ("Tokenizing train dataset: 100%|###| 32/32", "Loading weights: 100%|###| 20/20",
                    "Writing model shards: 100%|###| 1/1", "Map: 100%|###| 8/8"):
        assert not is_our_bar(foreign)


def test_closing_lines_and_summary_from_the_manifests(tiny_eval_run):
    cfg = load_config(tiny_eval_run)
    from rlhf.staleness import read_manifest

    rm = read_manifest(cfg.stage_dir("rm"))["metrics"]
    assert closing_line(cfg, "sft", 75).startswith("sft: done in 1m15s: held-out loss ")
    assert f"held-out accuracy {rm['eval_accuracy']:.3f} ± " in closing_line(cfg, "rm", 3)
    lines = summary_lines(cfg, [{"stage": "sft", "state": "skipped", "seconds": None},
                                {"stage": "rm", "state": "ran", "seconds": 12.0},
                                {"stage": "ppo", "state": "ran", "seconds": 30.0},
                                {"stage": "eval", "state": "ran", "seconds": 5.0}])
    table = "\n".join(lines)
    assert "sft    skipped  -" in table and "rm     ran      12s" in table
    assert "PPO win rate" in table and "KL" in table
    assert f"next: rlhf report --config {cfg.source}" in table


def test_run_all_prints_our_lines_and_a_summary(tmp_path, monkeypatch, capfd):
    """run-all on the tiny config, SFT only (the other stages' code paths are the same)."""
    from typer.testing import CliRunner

    from rlhf.cli import app

    config = write_config(tmp_path, {"rm": None, "ppo": None})
    result = CliRunner().invoke(app, ["run-all", "--config", str(config)])
    assert result.exit_code == 0, result.output
    terminal = result.output + capfd.readouterr().err
    cfg = load_config(config)
    log = (cfg.stage_dir("sft") / "log.txt").read_text()
    # other libraries (the Trainer's metrics dicts, transformers' loading bars): the log only
    assert "'train_runtime'" in log and "Loading weights" in log
    assert "'train_runtime'" not in terminal and "Loading weights" not in terminal
    assert "FutureWarning" not in log  # peft's read of is_gradient_checkpointing is silenced
    assert "sft: done in " in terminal and "held-out loss" in terminal and "summary:" in terminal
    assert len(terminal.strip().splitlines()) < 20, terminal
