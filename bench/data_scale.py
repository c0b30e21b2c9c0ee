"""Data preparation at scale: `rlhf validate` and each stage's data preparation on synthetic sets of
hub size, with the real tokenizer, at a few sizes to show how the cost grows.

    python bench/data_scale.py                       # 25 %, 50 % and 100 % of 200k / 60k / 50k rows
    python bench/data_scale.py --scales 0.05,0.1 --stages sft --processes 1
    python bench/data_scale.py --model embedded:tiny-random-llama --scales 0.01   # a quick smoke run

What it builds (in a temporary folder, removed afterwards unless --keep): SFT conversations
(`messages`: a user turn and an assistant reply, one in five with a second exchange; a few hundred
tokens each), preference pairs (`prompt`, `chosen`, `rejected` as message lists) and PPO prompts
(`prompt` as a user turn), drawn from the words of data/demo with their frequencies, so the token
counts per word are those of English chat. Each set holds out `eval_split` 0.05, and a few per cent of
its rows are longer than the stage's max_length, so every drop rule and the held-out carve run.

What it times, each in a fresh subprocess (so that its peak resident memory is its own):
- validate: `rlhf validate --config ...` as a user runs it (start-up and imports included);
- sft, rm, ppo: from the tokenizer being loaded to the data set the trainer starts training on:
  the stage's data function (`rlhf.data.sft_data` / `rm_data` / `ppo_data`: reading, checking, the
  held-out carve, the drop rules, tokenizing) and then what the trainer still does to it before
  its first step: `RewardTrainer._prepare_dataset` run on a stand-in trainer (the code path its
  `__init__` runs, without loading the model; SFTTrainer skips its preparation, since the stage hands
  it the labels, truncated: `rlhf.sft.TRL_DATASET_KWARGS`), and for PPO the prompt
  token ids the stage hands its loop. The tokenizer is the config's model's (the embedded SmolLM2
  by default). The data cache starts empty for every timed run (a fresh RLHF_CACHE).

Figures per run: wall seconds, CPU seconds (user + system of the process and its children: the
tokenizer's threads included), rows per CPU second (`rows/s/core`, the figure that does not depend
on how many cores were free), and peak resident memory above what the process held before the data
work started (`/proc/self/clear_refs` resets the peak there). With --processes 1,2 the SFT
preparation of the largest size also runs in 2 processes (a gloo group, as `accelerate launch` on a
CPU makes it), and the table gives each process's peak.

The last line is one JSON object with every run. On a machine shared with other jobs, times are
upper bounds: run it under `nice` and compare CPU seconds rather than wall seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FULL = {"sft": 200_000, "rm": 60_000, "ppo": 50_000}
MAX_LENGTH = {"sft": 512, "rm": 512, "ppo": 128}
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


# ---------------------------------------------------------------------------- synthetic data


def vocabulary() -> tuple[list[str], list[int]]:
    """The words of the demo data's messages with their counts (cumulative, for random.choices)."""
    counts: collections.Counter[str] = collections.Counter()
    for path in sorted((REPO / "data" / "demo").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            for value in json.loads(line).values():
                for message in value if isinstance(value, list) else ():
                    counts.update(message["content"].split())
    cum, total = [], 0
    for c in counts.values():
        total += c
        cum.append(total)
    return list(counts), cum


class Words:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words, self.cum = vocabulary()

    def text(self, mean_words: float, long: bool = False) -> str:
        n = max(3, int(self.rng.lognormvariate(0, 0.5) * mean_words * (4 if long else 1)))
        return " ".join(self.rng.choices(self.words, cum_weights=self.cum, k=n))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_sets(folder: Path, scale: float, seed: int = 0) -> dict[str, int]:
    """sft.jsonl, rm.jsonl, ppo.jsonl with `scale` × FULL rows; returns the row counts."""
    w = Words(seed)
    n = {stage: max(40, int(FULL[stage] * scale)) for stage in FULL}
    with open(folder / "sft.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n["sft"]):
            long = w.rng.random() < 0.03
            conv = [user(w.text(30)), bot(w.text(110, long))]
            if w.rng.random() < 0.2:
                conv += [user(w.text(15)), bot(w.text(60))]
            f.write(json.dumps({"messages": conv}) + "\n")
    with open(folder / "rm.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n["rm"]):
            long = w.rng.random() < 0.03
            f.write(json.dumps({"prompt": [user(w.text(30))], "chosen": [bot(w.text(90, long))],
                                "rejected": [bot(w.text(90))]}) + "\n")
    with open(folder / "ppo.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n["ppo"]):
            f.write(json.dumps({"prompt": [user(w.text(30, w.rng.random() < 0.03))]}) + "\n")
    return n


def write_config(folder: Path, model: str) -> Path:
    import yaml

    raw = {
        "run_name": "data-scale", "output_dir": str(folder / "runs"), "seed": 0,
        "model": {"name_or_path": model},
        "sft": {"data": {"path": str(folder / "sft.jsonl")}, "max_length": MAX_LENGTH["sft"]},
        "rm": {"data": {"path": str(folder / "rm.jsonl")}, "max_length": MAX_LENGTH["rm"]},
        "ppo": {"data": {"path": str(folder / "ppo.jsonl")}, "max_prompt_length": MAX_LENGTH["ppo"]},
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- one timed run (a subprocess)


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def trl_prepare(stage: str, dataset, tokenizer, cfg):
    """What the trainer does to a train set before the first step. SFTTrainer: nothing, the SFT
    stage hands it input_ids and labels, truncated, with its preparation skipped
    (`rlhf.sft.TRL_DATASET_KWARGS`). RewardTrainer: its _prepare_dataset, on a stand-in for the
    trainer (the attributes that method reads, as the trainer sets them)."""
    if stage == "sft":
        return dataset
    from types import SimpleNamespace

    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(Path(cfg.run_dir) / "bench-trl"), max_length=None, dataset_num_proc=None,
                        report_to="none", bf16=False)
    return RewardTrainer._prepare_dataset(SimpleNamespace(), dataset, tokenizer, args, "train")


def tokenizer_alone(cfg, tokenizer) -> tuple[int, int]:
    """The floor: every SFT conversation rendered by the chat template and encoded once, in
    batches of 1,000, with nothing else (no checks, no Arrow). Returns (rows, tokens)."""
    rows = [json.loads(line)["messages"] for line in open(cfg.sft.data.path, encoding="utf-8")]
    tokens = 0
    for i in range(0, len(rows), 1000):
        texts = tokenizer.apply_chat_template(rows[i:i + 1000], tokenize=False)
        tokens += sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return len(rows), tokens


def worker(stage: str, config: str) -> dict:
    """Prepare one stage's data as the stage does; prints what it measured as one JSON line."""
    from rlhf import data as D
    from rlhf.data import prepare
    from rlhf.config import load_config
    from rlhf.models import load_tokenizer, resolve_model
    from rlhf.stage_script import init_processes

    state = init_processes()  # as stages/<stage>.py joins the group under `accelerate launch`
    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg.model, resolve_model(cfg.model))
    if stage == "ppo":
        tokenizer.padding_side = "left"
    state.wait_for_everyone()
    built = []  # whether this process prepared the data or loaded what another one prepared
    real_build = prepare._build
    prepare._build = lambda *a, **k: built.append(True) or real_build(*a, **k)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before, cpu0, t0 = rss_mb(), cpu_seconds(), time.perf_counter()
    if stage == "encode":
        rows, tokens = tokenizer_alone(cfg, tokenizer)
        return {"stage": stage, "rank": 0, "processes": 1, "rows": rows, "tokens": tokens,
                "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu_seconds() - cpu0, 2),
                "peak_mb": round(rss_mb("VmHWM") - before, 1)}
    data = {"sft": D.sft_data, "rm": D.rm_data, "ppo": D.ppo_data}[stage](cfg, tokenizer)
    data_cpu = cpu_seconds() - cpu0
    if stage == "ppo":  # what rlhf/ppo/stage.py hands its loop
        n_train = len(data.train_ids["prompt_ids"][:])
    else:
        n_train = len(trl_prepare(stage, data.train_ids, tokenizer, cfg))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    rows = sum(r["kept"] + sum(r["dropped"].values()) for r in data.report.values())
    return {"stage": stage, "rank": state.process_index, "processes": state.num_processes, "rows": rows,
            "train_rows": n_train, "prepared": bool(built), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "data_cpu_s": round(data_cpu, 2),
            "peak_mb": round(rss_mb("VmHWM") - before, 1), "base_mb": round(before, 1)}


def fresh_cache(models: Path, folder: Path) -> Path:
    """An RLHF_CACHE holding the built models of `models` (linked) and no prepared data."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for entry in models.iterdir() if models.is_dir() else ():
        if entry.is_dir() and entry.name != "data":
            (folder / entry.name).symlink_to(entry)
    return folder


def run_worker(stage: str, config: Path, processes: int, models: Path) -> list[dict]:
    cache = fresh_cache(models, config.parent / "cache")
    env = dict(os.environ, RLHF_CACHE=str(cache))
    cmd = ["nice", sys.executable, __file__, "--worker", stage, "--config", str(config)]
    if processes == 1:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        outs = [out]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(cmd, env=dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                                                LOCAL_RANK=str(r), WORLD_SIZE=str(processes), ACCELERATE_USE_CPU="1"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(processes)]
        outs = []
        for p in procs:
            stdout, stderr = p.communicate()
            outs.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    results = []
    for out in outs:
        if out.returncode != 0:
            raise SystemExit(f"{stage} worker failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def run_validate(config: Path, models: Path) -> dict:
    """`rlhf validate` in a subprocess (start-up included); wall, CPU and peak memory from its rusage."""
    exe = Path(sys.executable).with_name("rlhf")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(["nice", str(exe), "validate", "--config", str(config)],
                                env=dict(os.environ, RLHF_CACHE=str(fresh_cache(models, config.parent / "cache"))),
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            err.seek(0)
            raise SystemExit(f"rlhf validate failed:\n{err.read().decode()[-3000:]}")
    return {"stage": "validate", "rank": 0, "processes": 1, "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_mb": round(usage.ru_maxrss / 1024, 1)}


# ---------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="0.25,0.5,1", help="fractions of 200k SFT / 60k RM / 50k PPO rows")
    ap.add_argument("--stages", default="validate,encode,sft,rm,ppo",
                    help="encode: the tokenizer alone on the SFT set (the floor the sft figure compares with)")
    ap.add_argument("--processes", default="1,2", help="process counts for the SFT preparation of the largest size")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--workdir", default=None, help="where to build the sets (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated sets")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.config)))
        return

    stages = args.stages.split(",")
    scales = [float(s) for s in args.scales.split(",")]
    processes = [int(p) for p in args.processes.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="rlhf-data-scale-"))
    models = Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")  # the built models, linked
    runs: list[dict] = []
    try:
        for scale in scales:
            folder = root / f"scale-{scale:g}"
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            counts = write_sets(folder, scale)
            config = write_config(folder, args.model)
            print(f"scale {scale:g}: {counts} written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for stage in stages:
                if stage == "validate":
                    runs.append({**run_validate(config, models), "rows": sum(counts.values()), "scale": scale})
                else:
                    for n in (processes if stage == "sft" and scale == max(scales) else [1]):
                        for r in run_worker(stage, config, n, models):
                            runs.append({**r, "scale": scale})
                print(json.dumps(runs[-1]), file=sys.stderr)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    print(f"{'stage':9} {'procs':>5} {'rank':>4} {'rows':>8} {'wall s':>7} {'CPU s':>7} {'rows/s/core':>11} {'peak MB':>8}")
    for r in runs:
        rate = r["rows"] / r["cpu_s"] if r["cpu_s"] else float("nan")
        print(f"{r['stage']:9} {r['processes']:>5} {r['rank']:>4} {r['rows']:>8} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} "
              f"{rate:>11.0f} {r['peak_mb']:>8.0f}")
    print(json.dumps({"data_scale": runs, "model": args.model}))


if __name__ == "__main__":
    main()
