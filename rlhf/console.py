"""What `run-all` shows on the terminal: our lines, progress, a closing line per stage and a summary.

Each stage runs in its own process (rlhf.pipeline); `run_logged` reads that process's stdout and
stderr, writes all of it to runs/<name>/<stage>/log.txt, and passes on to the terminal only:
- our own log lines (`INFO rlhf.*: ...`, any `WARNING`/`ERROR` logger line) and `error:` lines;
- on a terminal, the progress bars of our phases (training steps, PPO steps, eval scoring) redrawn
  on one line, and not other libraries' bars (data set maps, weight loading, shard writing);
- when the process fails without an `error:` line (a crash), the end of its output (the traceback),
  so an error is never hidden.
With `verbose` everything passes through as it comes, as before.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rlhf.config import PipelineConfig
from rlhf.stats import binomial_se

LOG_FILE = "log.txt"
OUR_LINE = re.compile(r"^(INFO|WARNING|ERROR|CRITICAL) rlhf[\w.]*: |^(WARNING|ERROR|CRITICAL) |^error: |^warning: |^launching: ")
BAR = re.compile(r"^\s*(?P<desc>[^|\r\n]*?):?\s*\d+%\|")
# Other libraries' bars: datasets' map/filter passes, weight loading and shard writing.
FOREIGN_BARS = re.compile(r"dataset|^Map|^Filter|Loading|Writing|shards|checkpoint|Generating|Fetching", re.I)
CRASH_TAIL = 40  # lines of a crashed process's output shown on the terminal


def is_our_line(line: str) -> bool:
    return bool(OUR_LINE.match(line))


def shown_line(line: str) -> str:
    """Our logger's lines without the logger name, indented under their stage's start line."""
    m = re.match(r"^(INFO|WARNING|ERROR|CRITICAL) rlhf[\w.]*: (.*)$", line)
    if not m:
        return line
    return "  " + (m.group(2) if m.group(1) == "INFO" else f"{m.group(1).lower()}: {m.group(2)}")


def is_our_bar(fragment: str) -> bool:
    """A tqdm fragment of one of our phases (the Trainer's step bar has no description)."""
    m = BAR.match(fragment)
    return bool(m) and not FOREIGN_BARS.search(m.group("desc"))


def run_logged(cmd: list[str], log_path: Path, verbose: bool = False, out=None, pass_fds=()) -> int:
    """Run `cmd`, all its output appended to `log_path`; show the terminal what the module says.
    Returns the exit status."""
    out = out or sys.stderr
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tty = hasattr(out, "isatty") and out.isatty()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)
        pending = b""
        lines: list[str] = []
        saw_error = False
        bar_shown = False
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            log.write(chunk)
            log.flush()
            if verbose:
                out.write(chunk.decode(errors="replace"))
                out.flush()
                continue
            pending += chunk
            *parts, pending = re.split(rb"(?<=[\r\n])", pending)
            for raw in parts:
                text = raw.decode(errors="replace")
                body = text.rstrip("\r\n")
                if text.endswith("\r") or (BAR.match(body) and not text.endswith("\n")):
                    if tty and is_our_bar(body):  # redraw our bar on one line
                        out.write("\r\x1b[2K" + body[:max(20, _width() - 1)])
                        out.flush()
                        bar_shown = True
                    continue
                lines.append(body)
                del lines[:-CRASH_TAIL]
                saw_error = saw_error or body.startswith("error: ")
                if is_our_line(body):
                    if bar_shown:
                        out.write("\r\x1b[2K")
                        bar_shown = False
                    out.write(shown_line(body) + "\n")
                    out.flush()
        status = proc.wait()
        if bar_shown:
            out.write("\r\x1b[2K")
        if status != 0 and not saw_error and not verbose:
            out.write("".join(f"  {line}\n" for line in lines if line and not is_our_line(line)))
        if status != 0 and not verbose:
            out.write(f"full output: {log_path}\n")
        out.flush()
    return status


def _width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 20)).columns


# ---------------------------------------------------------------------------- headline figures


def headline(cfg: PipelineConfig, stage: str) -> str:
    """The figure that matters for a finished stage, from its manifest (and eval/eval.json)."""
    from rlhf.staleness import read_manifest

    if stage == "eval":
        return eval_headline(cfg)
    m = (read_manifest(cfg.stage_dir(stage)) or {}).get("metrics") or {}
    if stage == "sft" and isinstance(m.get("eval_loss"), (int, float)):
        return f"held-out loss {m['eval_loss']:.3f}"
    if stage == "rm" and isinstance(m.get("eval_accuracy"), (int, float)):
        n = int(m.get("eval_n_pairs") or 0)
        return f"held-out accuracy {m['eval_accuracy']:.3f} ± {binomial_se(m['eval_accuracy'], n):.3f} ({n} pairs)"
    if stage == "ppo":
        parts = [f"{label} {m[k]:+.3f}" for k, label in (("objective/scores", "RM score"), ("scores", "RM score"))
                 if isinstance(m.get(k), (int, float))][:1]
        parts += [f"KL {m[k]:.3f}" for k in ("objective/kl", "kl") if isinstance(m.get(k), (int, float))][:1]
        return ", ".join(parts) + (" at the last step" if parts else "")
    return ""


def eval_headline(cfg: PipelineConfig) -> str:
    from rlhf.model_card import _read_json

    report = _read_json(cfg.stage_dir("eval") / "eval.json") or {}
    parts = []
    p = report.get("policy")
    if p:
        parts.append(f"PPO win rate {p['win_rate']:.3f} ± {p['win_rate_stderr']:.3f}, KL {p['kl_mean']:.3f}")
    j = report.get("judge")
    if j:
        parts.append(f"judge win rate {j['win_rate']:.3f} ± {j['win_rate_stderr']:.3f}")
    return "; ".join(parts)


def closing_line(cfg: PipelineConfig, stage: str, seconds: float) -> str:
    figure = headline(cfg, stage)
    return f"{stage}: done in {format_seconds(seconds)}" + (f": {figure}" if figure else "")


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def summary_lines(cfg: PipelineConfig, results: list[dict[str, Any]]) -> list[str]:
    """The closing table of run-all: one row per stage (ran / skipped / failed, time, figure) and
    where to look next. results: {"stage", "state", "seconds" (or None)} in order."""
    rows = [("stage", "state", "time", "headline")]
    for r in results:
        figure = headline(cfg, r["stage"]) if r["state"] != "failed" else f"see {cfg.stage_dir(r['stage']) / LOG_FILE}"
        rows.append((r["stage"], r["state"], format_seconds(r["seconds"]) if r.get("seconds") is not None else "-",
                     figure))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["", "summary:"]
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths) + "  " + "-" * len(row[3]))
    report = cfg.stage_dir("eval") / "report.html"
    lines.append(f"next: rlhf report --config {cfg.source} -> {report}" if not report.is_file() else f"next: {report}")
    lines += tracking_hint(cfg)
    return lines


def tracking_hint(cfg: PipelineConfig) -> list[str]:
    if cfg.tracking.backend == "tensorboard":
        return [f"tensorboard: tensorboard --logdir {cfg.run_dir}"]
    if cfg.tracking.backend != "wandb" or cfg.tracking.mode == "disabled":
        return []
    offline = sorted({str(p) for p in [*cfg.run_dir.glob("**/wandb/offline-run-*"), *Path("wandb").glob("offline-run-*")]})
    if offline:
        return [f"W&B (offline): wandb sync {' '.join(offline[-4:])}"]
    entity = f"{cfg.tracking.entity}/" if cfg.tracking.entity else ""
    return [f"W&B: https://wandb.ai/{entity}{cfg.tracking.project}/groups/{cfg.run_name}"
            + ("" if entity else " (under your default entity)")]


def print_lines(lines: list[str], echo: Callable[[str], None]) -> None:
    for line in lines:
        echo(line)
