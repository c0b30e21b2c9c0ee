"""The `rlhf` command: validate a pipeline file and run its stages.

User mistakes (UserError) print one line per problem and exit with status 2, no traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from rlhf.config import PipelineConfig, load_config
from rlhf.errors import UserError

EXIT_STATUSES = """Exit status: 0 done; 1 a crash (a bug: it keeps its traceback) or a stage killed by a signal;
2 a user mistake (config, data, arguments, a missing upstream stage, a reward model that fails the gate before
PPO: one `error:` line per problem);
3 training diverged (NaN/inf; the last good checkpoint is kept). run-all exits with the failed stage's status."""

app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="RLHF pipeline: SFT -> reward model -> PPO, on LoRA adapters.\n\n"
         "Every command reads ./pipeline.yaml unless --config names another file.",
    epilog=EXIT_STATUSES,
)
DEFAULT_CONFIG = "pipeline.yaml"
STAGE_CHOICES = ("sft", "rm", "ppo")


def _complete_stage(incomplete: str) -> list[str]:
    return [s for s in STAGE_CHOICES if s.startswith(incomplete)]


ConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", "-c", metavar="FILE", help=f"Pipeline file (YAML). Default: ./{DEFAULT_CONFIG} when it exists.",
    show_default=False)]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a config field, e.g. --set ppo.kl_coef=0.02 (repeatable).")
]


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("RLHF_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) > 0:
        logging.getLogger("rlhf").setLevel(logging.WARNING)  # multi-process: the main process tells the story
    import warnings

    # peft's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` property
    # (every time we wrap a model in LoRA); nothing in our code or config can avoid that read.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _end_progress_line() -> None:
    """A progress bar that an error interrupted leaves the cursor at the end of its line: start the
    `error:` lines on a line of their own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and len(getattr(tqdm.tqdm, "_instances", ())):
        sys.stderr.write("\n")


def friendly_errors(fn: Callable) -> Callable:
    """Print a UserError as 'error: ...' lines and exit 2 (shared by the CLI and stages/ scripts)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _end_progress_line()
            # One write: the processes of a multi-process stage share one pipe, and separate writes of
            # text and newline would interleave their lines.
            sys.stderr.write("".join(f"error: {line}\n" for line in str(e).splitlines()))
            sys.stderr.flush()
            raise SystemExit(e.exit_code) from None
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            _end_progress_line()
            # A full disk is the user's to fix, not a bug; every write is atomic, so nothing half-written
            # is marked done and the rerun resumes from the last complete checkpoint.
            where = f" while writing {e.filename}" if e.filename else ""
            print(f"error: no space left on the device{where}; free some space (or point output_dir elsewhere) "
                  "and rerun: it resumes from the last complete checkpoint", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def config_file(config: str | None) -> str:
    """The --config value, or ./pipeline.yaml when none was given and it exists."""
    if config is not None:
        return config
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG
    raise UserError(f"no --config given and no {DEFAULT_CONFIG} in {Path.cwd()}; pass --config FILE "
                    "(e.g. --config configs/tiny.yaml)")


def _load(config: str | None, overrides: list[str] | None) -> PipelineConfig:
    setup_logging()
    return load_config(config_file(config), overrides or [])


def _version(value: bool) -> None:
    if value:
        from rlhf import __version__

        typer.echo(f"rlhf {__version__}")
        raise typer.Exit()


@app.callback(epilog=EXIT_STATUSES)
def _main(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None) -> None:
    """RLHF pipeline: SFT -> reward model -> PPO, on LoRA adapters.

    Every command reads ./pipeline.yaml unless --config names another file."""


@app.command(epilog=EXIT_STATUSES)
@friendly_errors
def validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check the config, the data sets' columns and the model reference, without training."""
    cfg = _load(config, set_)
    check_all(cfg, config_file(config), typer.echo)


def check_all(cfg: PipelineConfig, config: str, echo: Callable[[str], None]) -> None:
    """What `rlhf validate` checks (and `run-all` first, when a stage or the evaluation will run, before
    any stage loads a model): the data sets' columns and types, the model reference, a chat template
    where the data needs one, and that the run folder can be written."""
    from rlhf.config import STAGES
    from rlhf.data import needs_chat_template
    from rlhf.data.prepare import check_data, filter_preferences
    from rlhf.data.read import is_local
    from rlhf.data.records import preference_records, prompt_records, sft_records
    from rlhf.models import EMBEDDED_PREFIX, check_model_reference, load_tokenizer

    warning = check_model_reference(cfg.model)
    conversational: list[bool] = []
    checks = {"sft": lambda rows: sft_records(rows, cfg.sft.completion_only_loss), "rm": preference_records,
              "ppo": prompt_records}
    if cfg.rm is not None:
        checks["rm"] = lambda rows: preference_records(rows, cfg.rm.margin_column)
    for stage in STAGES:
        section = getattr(cfg, stage)
        if section is None:
            continue
        data = section.data
        if not is_local(data.path):
            echo(f"{stage}: hub data set {data.path} (split {data.split}); columns are checked when the stage loads it")
            continue
        # the row rules that need no model (RM: an empty side, chosen == rejected); lengths need the tokenizer
        keep = (lambda recs, labels: filter_preferences(recs, labels, None, 0)) if stage == "rm" else None
        n = check_data(data, cfg.seed, checks[stage], keep, stage.upper())
        conversational.append(needs_chat_template(data, cfg.seed))
        echo(f"{stage}: {data.path}: {n} training rows, columns and types OK")
    local_model = Path(cfg.model.name_or_path).expanduser()
    if any(conversational) and not cfg.model.name_or_path.startswith(EMBEDDED_PREFIX) and local_model.is_dir():
        load_tokenizer(cfg.model, str(local_model), need_chat_template=True)  # raises if it has no template
    if cfg.eval.judge:
        from rlhf.judges import load_judge

        load_judge(cfg.eval.judge)  # a judge that cannot be imported fails now, not after the training
        echo(f"eval.judge: {cfg.eval.judge} imports")
    check_writable(cfg)
    if warning:
        echo(f"warning: {warning}")
    echo(f"{config}: valid (model {cfg.model.name_or_path}, run folder {cfg.run_dir})")


def check_writable(cfg: PipelineConfig) -> None:
    """The run folder must be creatable: its nearest existing ancestor is a writable folder."""
    path = cfg.run_dir.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        why = "is not a folder" if not path.is_dir() else "is not writable"
        raise UserError(f"output_dir: {cfg.output_dir} cannot hold the run folder ({path} {why}); "
                        "choose a writable output_dir")


def _writing(cfg: PipelineConfig, command: str):
    """The run folder's lock, held while a command writes into it (rlhf.runlock): a second writer
    stops at once with one line naming this one."""
    from rlhf.runlock import run_lock

    return run_lock(cfg.run_dir, command)


def _stage_command(stage: str) -> Callable:
    @friendly_errors
    def command(config: ConfigOpt = None, set_: SetOpt = None) -> None:
        from rlhf.launch import run_stage

        cfg = _load(config, set_)
        with _writing(cfg, f"rlhf {stage}"):
            run_stage(stage, cfg, config_file(config), set_ or [])

    command.__doc__ = {
        "sft": "Stage 1: supervised fine-tuning (LoRA), resuming from its last checkpoint if interrupted.",
        "rm": "Stage 2: the reward model (LoRA + score head, Bradley-Terry loss) on the merged SFT model.",
    }[stage]
    return command


app.command("sft", epilog=EXIT_STATUSES)(_stage_command("sft"))
app.command("rm", epilog=EXIT_STATUSES)(_stage_command("rm"))


@app.command(epilog=EXIT_STATUSES)
@friendly_errors
def ppo(config: ConfigOpt = None, set_: SetOpt = None,
        fresh: Annotated[bool, typer.Option("--fresh", help="Discard PPO checkpoints and start from step 0.")] = False) -> None:
    """Stage 3: PPO against the reward model, resuming from its latest checkpoint unless --fresh."""
    import shutil

    from rlhf.launch import run_stage

    cfg = _load(config, set_)
    with _writing(cfg, "rlhf ppo"):
        if fresh:
            shutil.rmtree(cfg.stage_dir("ppo") / "checkpoints", ignore_errors=True)
        run_stage("ppo", cfg, config_file(config), set_ or [])


@app.command("run-all", epilog=EXIT_STATUSES)
@friendly_errors
def run_all(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    from_: Annotated[Optional[str], typer.Option(
        "--from", metavar="[sft|rm|ppo]", autocompletion=_complete_stage,
        help="Rerun from this stage on: sft, rm or ppo.")] = None,
    only: Annotated[Optional[str], typer.Option(
        "--only", metavar="[sft|rm|ppo]", autocompletion=_complete_stage,
        help="Run only this stage: sft, rm or ppo.")] = None,
    force: Annotated[bool, typer.Option("--force", help=(
        "Rerun every stage (from --from on), ignoring manifests; a stage still resumes from checkpoints "
        "of its current config, so training done already is not redone."))] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help=(
        "Start every stage (from --from on) over: delete its checkpoints, then rerun as --force does, "
        "training from step 0."))] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=(
        "Show every library's output live (warnings, progress bars, banners); by default it goes to "
        "runs/<name>/<stage>/log.txt and the terminal gets our lines only."))] = False,
) -> None:
    """Run sft -> rm -> ppo, each in a fresh process, skipping stages that are up to date."""
    from rlhf.pipeline import nothing_to_run, plan
    from rlhf.pipeline import run_all as run_pipeline

    cfg = _load(config, set_)
    config = config_file(config)
    if not nothing_to_run(cfg, from_, only, force or fresh):  # up to date: nothing will read the data or the model
        check_all(cfg, config, typer.echo)  # a mistake costs seconds: found before any stage loads a model
    with _writing(cfg, "rlhf run-all"):
        if fresh:  # under the lock: never delete checkpoints another run is writing
            import shutil

            for stage, _ in plan(cfg, from_, only, force=True):
                shutil.rmtree(cfg.stage_dir(stage) / "checkpoints", ignore_errors=True)
        run_pipeline(cfg, config, set_ or [], start=from_, only=only, force=force or fresh, echo=typer.echo,
                     verbose=verbose)


@app.command(epilog=EXIT_STATUSES)
@friendly_errors
def score(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user turn for conversational RMs).")],
    response: Annotated[list[str], typer.Option("--response", "-r", help="A response to score (repeatable).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the reward model's score (rm/model) for each response to a prompt."""
    from rlhf.rm import score_lines

    for line in score_lines(_load(config, set_), prompt, response):
        typer.echo(line)


@app.command(epilog=EXIT_STATUSES)
@friendly_errors
def status(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Show each stage: done / stale (which keys changed) / missing / running or interrupted, with metrics."""
    from rlhf.status import print_status

    print_status(_load(config, set_))


@app.command(epilog=EXIT_STATUSES)
@friendly_errors
def report(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Write PNG plots (reward, KL, response length, RM accuracy, SFT loss) and eval/report.html."""
    from rlhf.report import write_report

    cfg = _load(config, set_)
    with _writing(cfg, "rlhf report"):
        out = write_report(cfg, echo=typer.echo)
    typer.echo(f"report: {out}")


@app.command("eval", epilog=EXIT_STATUSES)
@friendly_errors
def eval_(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Evaluate the finished stages: RM held-out accuracy, PPO vs SFT win rate and KL, over-optimisation curve."""
    import json

    from rlhf.eval_results import EVAL_FILE, summary_lines
    from rlhf.evaluate import run

    cfg = _load(config, set_)
    with _writing(cfg, "rlhf eval"):
        out_dir = run(cfg)
    for line in summary_lines(json.loads((out_dir / EVAL_FILE).read_text(encoding="utf-8")), out_dir):
        typer.echo(line)


@app.command(epilog=EXIT_STATUSES)
@friendly_errors
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user turn when the model has a chat template).")],
    stage: Annotated[str, typer.Option("--stage", metavar="[sft|ppo]", autocompletion=lambda incomplete: [
        s for s in ("sft", "ppo") if s.startswith(incomplete)], help="Which stage's model: sft or ppo.")] = "ppo",
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Default: ppo.response_length.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy. Default: ppo.temperature.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed. Default: the config's seed.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print one response from a stage's merged model (sft/model or ppo/model) to a prompt."""
    from rlhf.generate import generate_text

    typer.echo(generate_text(_load(config, set_), stage, prompt, max_new_tokens, temperature, seed))


@app.command(epilog=EXIT_STATUSES)
@friendly_errors
def export(
    stage: Annotated[str, typer.Option("--stage", metavar="[sft|rm|ppo]", autocompletion=_complete_stage,
                                       help="Which stage's merged model: sft, rm or ppo.")],
    to: Annotated[str, typer.Option("--to", help="A new (or empty) folder for the copy.")],
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", metavar="REPO", help="Also upload the copy to this hub model repo (needs the network and a token).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the hub repo as private.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Copy a stage's merged model (runs/<name>/<stage>/model) with its model card, optionally to the hub."""
    from rlhf.export import export_stage

    if stage not in STAGE_CHOICES:
        raise UserError(f"--stage {stage}: choose one of {', '.join(STAGE_CHOICES)}")
    out = export_stage(_load(config, set_), stage, to, push_to_hub, private=private)
    typer.echo(f"export: {out}" + (f" (pushed to https://huggingface.co/{push_to_hub})" if push_to_hub else ""))


@app.command("config-reference")
def config_reference() -> None:
    """Print the config reference (every key, default and meaning) as a markdown table."""
    from rlhf.config import config_reference as table

    typer.echo(table())


def main() -> None:
    from rlhf.allocator import restart_with_tuned_allocator

    restart_with_tuned_allocator()  # before anything allocates much: glibc reads its settings at start
    app()


if __name__ == "__main__":
    main()
