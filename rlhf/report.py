"""`rlhf report`: PNG plots and one HTML page of a run, for people without W&B.

Reads each stage's metrics.jsonl (rlhf.tracking.read_metrics) and writes into runs/<name>/eval/:
- ppo_reward.png   RM score per PPO step (`objective/scores`) with a rolling mean, and the total
                   reward PPO maximised (`objective/rlhf_reward` = score − β·KL);
- ppo_kl.png       KL(policy ‖ SFT) per response (`objective/kl`);
- ppo_length.png   mean response length in tokens, and the share of responses that ended;
- rm_accuracy.png  RM pair accuracy over training steps (per training batch, on held-out pairs
                   when evaluated during training) and the final held-out accuracy;
- sft_loss.png     SFT training and held-out loss;
- report.html      those plots (relative links, so the folder can be copied or zipped whole), any
                   other eval/*.png (`rlhf eval` writes rm_calibration.png, overoptimisation.png), the
                   stage table of `rlhf status`, a summary of eval/eval.json, and a samples table
                   (eval/samples.jsonl from `rlhf eval`, else the last step of ppo/samples.jsonl).
A stage without metrics is skipped with a note, never an error.

Every plot of the project is drawn here: also the two `rlhf eval` writes from its own figures,
rm_calibration.png (plot_calibration) and overoptimisation.png (plot_overoptimisation).
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhf.config import PipelineConfig
from rlhf.atomic import save_figure, write_file_atomically
from rlhf.tracking import METRICS_FILE, read_metrics

REPORT_DIR = "eval"
REPORT_FILE = "report.html"
PLOTS = {  # file name: (stage, title shown in the HTML)
    "ppo_reward.png": ("ppo", "PPO reward"),
    "ppo_kl.png": ("ppo", "PPO KL to the SFT model"),
    "ppo_length.png": ("ppo", "PPO response length"),
    "rm_accuracy.png": ("rm", "Reward model accuracy"),
    "sft_loss.png": ("sft", "SFT loss"),
}
MAX_SAMPLES = 24  # rows in the HTML samples table
MAX_CELL = 600  # characters per text cell


# ---------------------------------------------------------------------------- pure helpers


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): (N,) -> (N,)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def rolling_window(n: int) -> int:
    """A smoothing window for n points: none (1) below 6 points, else about a tenth of the run,
    3 to 25 points."""
    return 1 if n < 6 else max(3, min(25, round(n / 10)))


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that hold a finite number under `key`."""
    steps, values = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(int(row.get("step", len(steps))))
            values.append(float(v))
    return steps, values


# ---------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    save_figure(fig, path)
    _pyplot().close(fig)


def _axes(title: str, xlabel: str, ylabel: str):
    fig, ax = _pyplot().subplots(figsize=(6.4, 4))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return fig, ax


def _marker(n: int) -> str:
    return "o" if n <= 40 else ""  # dots help on short runs and clutter long ones


def plot_ppo_reward(rows: list[dict[str, Any]], path: Path) -> bool:
    steps, scores = series(rows, "objective/scores")
    if not steps:
        return False
    window = rolling_window(len(scores))
    fig, ax = _axes(f"PPO: reward-model score per step ({len(steps)} steps)", "PPO step",
                    "RM score (mean over the batch)")
    # the raw curve is faint only when a rolling mean is drawn over it
    ax.plot(steps, scores, marker=_marker(len(steps)), ms=3, lw=0.8, alpha=0.45 if window > 1 else 1.0, color="tab:blue",
            label="RM score per step")
    if window > 1:
        ax.plot(steps, rolling_mean(scores, window), lw=2.2, color="tab:blue", label=f"rolling mean ({window} steps)")
    r_steps, rlhf = series(rows, "objective/rlhf_reward")
    if r_steps:
        ax.plot(r_steps, rolling_mean(rlhf, window), lw=1.4, ls="--", color="tab:orange",
                label="reward PPO maximises: centred score − β·KL" + (", rolling" if window > 1 else ""))
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    return True


def plot_ppo_kl(rows: list[dict[str, Any]], path: Path) -> bool:
    steps, kl = series(rows, "objective/kl")
    if not steps:
        return False
    fig, ax = _axes("PPO: KL(policy ‖ SFT) per response", "PPO step", "KL (nats per response)")
    ax.plot(steps, kl, marker=_marker(len(steps)), ms=3, color="tab:red", label="mean over the batch")
    window = rolling_window(len(kl))
    if window > 1:
        ax.plot(steps, rolling_mean(kl, window), lw=2, color="darkred", label=f"rolling mean ({window} steps)")
    ax.axhline(0, color="black", lw=0.6)
    _, coef = series(rows, "objective/kl_coef")
    ax.legend(fontsize=8, loc="lower right", title=f"KL coefficient β = {coef[-1]:.3g}" if coef else None,
              title_fontsize=8)
    _save(fig, path)
    return True


def plot_ppo_length(rows: list[dict[str, Any]], path: Path) -> bool:
    steps, length = series(rows, "response/length_mean")
    if not steps:
        return False
    fig, ax = _axes("PPO: response length", "PPO step", "mean response length (tokens)")
    ax.plot(steps, length, marker=_marker(len(steps)), ms=3, color="tab:green", label="mean length (left)")
    ax.set_ylim(bottom=0)
    e_steps, eos = series(rows, "response/eos_fraction")
    if e_steps:
        ax2 = ax.twinx()
        ax2.plot(e_steps, eos, lw=1, ls="--", color="grey", label="share ending with the stop token (right)")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("share of responses that ended")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    else:
        ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return True


def plot_rm_accuracy(rows: list[dict[str, Any]], path: Path, final: dict[str, Any] | None) -> bool:
    """Per-batch training accuracy (TRL's `accuracy`, ties count 0), held-out accuracy when the
    Trainer evaluated during training (`eval_pairs_accuracy` rows before the last, ties 0.5),
    and the held-out accuracy of the exported model (rm/eval.json) at its step."""
    t_steps, train = series([r for r in rows if "loss" in r], "accuracy")
    # held-out evaluations during training; the final one (written with train_pairs_* beside it) is the star
    e_steps, held = series([r for r in rows if "train_pairs_accuracy" not in r], "eval_pairs_accuracy")
    final_acc = (final or {}).get("accuracy")
    if isinstance(final_acc, (int, float)) and not math.isfinite(final_acc):
        final_acc = None
    if not t_steps and not e_steps and final_acc is None:
        return False
    fig, ax = _axes("Reward model: pair accuracy", "RM training step", "share of pairs ranked correctly")
    if t_steps:
        window = rolling_window(len(train))
        ax.plot(t_steps, train, marker=_marker(len(t_steps)), ms=3, lw=0.8, alpha=0.45 if window > 1 else 1.0,
                color="tab:purple", label="training batch")
        if window > 1:
            ax.plot(t_steps, rolling_mean(train, window), lw=2, color="tab:purple",
                    label=f"training, rolling mean ({window} steps)")
    if e_steps:
        ax.plot(e_steps, held, "s-", color="tab:green", label="held-out pairs")
    if final_acc is not None:
        # the exported model is the best evaluated checkpoint's (rlhf.best_checkpoint), not the last step's
        best = (final or {}).get("best_step")
        x = best or (final or {}).get("global_step") or (e_steps or t_steps or [0])[-1]
        n = (final or {}).get("n_pairs")
        ax.plot([x], [final_acc], "*", ms=14, color="darkgreen", zorder=5,
                label=(f"exported (step {best})" if best else "final") + f" held-out: {final_acc:.3f}"
                + (f" ({n} pairs)" if n else ""))
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance (0.5)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return True


def plot_sft_loss(rows: list[dict[str, Any]], path: Path) -> bool:
    t_steps, train = series([r for r in rows if "train_runtime" not in r], "loss")
    e_steps, held = series(rows, "eval_loss")
    if not t_steps and not e_steps:
        return False
    fig, ax = _axes("SFT: loss", "SFT training step", "cross-entropy loss (nats per token)")
    if t_steps:
        ax.plot(t_steps, train, marker=_marker(len(t_steps)), ms=3, color="tab:blue", label="training")
    if e_steps:
        ax.plot(e_steps, held, "s-", ms=6, color="tab:orange", label="held-out")
        ax.annotate(f"{held[-1]:.3f}", (e_steps[-1], held[-1]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)
    return True


def plot_calibration(bins: list[dict[str, float]], rm: dict[str, Any], path: Path) -> None:
    """`rlhf eval`'s rm_calibration.png: per bin of |score difference| (stats.calibration_bins), the
    held-out accuracy beside the Bradley-Terry prediction σ(|diff|)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = [b["abs_diff_mean"] for b in bins]
    ax.plot(x, [b["accuracy"] for b in bins], "o-", label="held-out accuracy in bin")
    ax.plot(x, [b["predicted"] for b in bins], "s--", color="grey", label="Bradley-Terry σ(|diff|)")
    for b, xi in zip(bins, x):
        ax.annotate(f"n={b['n']}", (xi, b["accuracy"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.axhline(0.5, color="black", lw=0.6, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("|score(chosen) − score(rejected)| (bin mean)")
    ax.set_ylabel("share of pairs ranked correctly")
    ax.set_title(f"RM calibration: accuracy {rm['accuracy']:.2f} on {rm['n_pairs']} {rm['split']} pairs", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_overoptimisation(points: list[dict[str, Any]], path: Path, judge: str | None) -> None:
    """`rlhf eval`'s overoptimisation.png: mean RM score (and judge score) against mean KL at step 0
    and every PPO checkpoint, one panel each."""
    plt = _pyplot()
    panels = [("rm_score_mean", "mean RM score")] + ([("judge_mean", f"mean judge score ({judge})")] if judge else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    kl = [p["kl_mean"] for p in points]
    for ax, (key, label) in zip(axes[0], panels):
        y = [p[key] for p in points]
        ax.plot(kl, y, "o-")
        for p, xi, yi in zip(points, kl, y):
            ax.annotate(f"step {p['step']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("KL(policy ‖ SFT), nats per response")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    n = points[0]["n_prompts"] if points else 0
    fig.suptitle(f"Reward vs KL along PPO ({n} held-out prompts per point)", fontsize=10)
    _save(fig, path)


# ---------------------------------------------------------------------------- the report


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:+.3f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        value = json.dumps(value, ensure_ascii=False)
    text = str(value)
    if len(text) > MAX_CELL:
        text = text[:MAX_CELL] + " …"
    return html.escape(text)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def samples_section(cfg: PipelineConfig, out_dir: Path) -> str:
    eval_rows = _read_jsonl(out_dir / "samples.jsonl")
    if eval_rows:
        preferred = ["prompt", "sample", "sft_response", "ppo_response", "sft_score", "ppo_score", "kl", "sft_judge", "ppo_judge"]
        columns = [c for c in preferred if c in eval_rows[0]]
        first = [r for r in eval_rows if r.get("sample", 0) == 0]  # one row per prompt: its first sample
        return (f"<h2>Samples: SFT vs PPO on held-out prompts</h2><p>From <code>eval/samples.jsonl</code> "
                f"(<code>rlhf eval</code>); the first sample of the first {min(len(first), MAX_SAMPLES)} of "
                f"{len(first)} prompts ({len(eval_rows)} samples in all).</p>"
                + _table(first[:MAX_SAMPLES], columns))
    ppo_rows = _read_jsonl(cfg.stage_dir("ppo") / "samples.jsonl")
    if ppo_rows:
        last = max(r.get("step", 0) for r in ppo_rows)
        rows = [r for r in ppo_rows if r.get("step", 0) == last]
        return (f"<h2>Samples: PPO step {last}</h2><p>From <code>ppo/samples.jsonl</code> (training prompts; "
                "run <code>rlhf eval</code> for SFT vs PPO on held-out prompts).</p>"
                + _table(rows[:MAX_SAMPLES], ["prompt", "response", "score", "has_stop"]))
    return "<h2>Samples</h2><p class='note'>No samples yet (PPO has not written ppo/samples.jsonl).</p>"


def eval_section(out_dir: Path) -> str:
    report = _read_json(out_dir / "eval.json")
    if report is None:
        return ("<h2>Evaluation</h2><p class='note'>No eval/eval.json: run <code>rlhf eval</code> for RM accuracy, "
                "PPO-vs-SFT win rate and KL on held-out data.</p>")
    try:
        from rlhf.eval_results import summary_lines

        lines = summary_lines(report, out_dir)[:-1]  # the last line names the files, shown here anyway
        body = "<ul>" + "".join(f"<li>{html.escape(line.strip())}</li>" for line in lines) + "</ul>"
    except (ImportError, KeyError, TypeError, ValueError):
        body = f"<pre>{html.escape(json.dumps(report, indent=2)[:20000])}</pre>"
    return f"<h2>Evaluation (eval/eval.json)</h2>{body}"


def status_section(cfg: PipelineConfig) -> str:
    from rlhf.status import SHOWN, stage_rows

    rows = []
    for r in stage_rows(cfg):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
        rows.append({"stage": r.stage, "state": SHOWN.get(r.state, r.state), "why": r.reason,
                     "checkpoint": r.checkpoint, "metrics": metrics})
    return "<h2>Stages</h2>" + _table(rows, ["stage", "state", "why", "checkpoint", "metrics"])


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { width: 520px; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; text-align: left; white-space: pre-wrap; }
th { background: #f3f3f3; } .note { color: #8a6d00; }
"""


def write_report(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> Path:
    """Write the plots and report.html into runs/<name>/eval/; returns the HTML path."""
    out_dir = cfg.run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {stage: read_metrics(cfg.stage_dir(stage) / METRICS_FILE) for stage in ("sft", "rm", "ppo")}
    makers = {
        "ppo_reward.png": lambda p: plot_ppo_reward(rows["ppo"], p),
        "ppo_kl.png": lambda p: plot_ppo_kl(rows["ppo"], p),
        "ppo_length.png": lambda p: plot_ppo_length(rows["ppo"], p),
        "rm_accuracy.png": lambda p: plot_rm_accuracy(rows["rm"], p, _read_json(cfg.stage_dir("rm") / "eval.json")),
        "sft_loss.png": lambda p: plot_sft_loss(rows["sft"], p),
    }
    figures, notes = [], []
    for name, make in makers.items():
        stage, title = PLOTS[name]
        path = out_dir / name
        if make(path):
            figures.append((name, title))
            echo(f"wrote {path}")
        else:
            path.unlink(missing_ok=True)  # never leave a plot of an earlier run beside this report
            notes.append(f"{title}: skipped, no metrics in {cfg.stage_dir(stage) / METRICS_FILE}")
            echo(f"{title}: skipped (no metrics in {cfg.stage_dir(stage) / METRICS_FILE})")
    others = sorted(p.name for p in out_dir.glob("*.png") if p.name not in PLOTS)
    figures += [(name, name.removesuffix(".png").replace("_", " ")) for name in others]

    plots = "".join(f"<figure><img src='{html.escape(name)}' alt='{html.escape(title)}'>"
                    f"<figcaption>{html.escape(title)} ({html.escape(name)})</figcaption></figure>"
                    for name, title in figures)
    notes_html = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>rlhf report: {html.escape(cfg.run_name)}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>rlhf report: {html.escape(cfg.run_name)}</h1>"
        f"<p>Run folder <code>{html.escape(str(cfg.run_dir))}</code>; written {time.strftime('%Y-%m-%d %H:%M')} "
        f"by <code>rlhf report</code>.</p>"
        + status_section(cfg) + eval_section(out_dir)
        + f"<h2>Plots</h2>{notes_html}<div class='plots'>{plots}</div>"
        + samples_section(cfg, out_dir) + "</body></html>"
    )
    target = out_dir / REPORT_FILE
    write_file_atomically(target, lambda f: f.write(page))
    return target
