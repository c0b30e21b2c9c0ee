"""Config loading: unknown keys with line numbers and suggestions, types and ranges, --set
overrides, and stage hashes (what makes a stage stale and what does not)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_config
from rlhf.config import load_config, validate_config
from rlhf.staleness import stage_hash
from rlhf.errors import UserError

SFT_DATA = str(REPO / "data" / "demo" / "sft_train.jsonl")


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    return str(info.value)


def minimal(**sft_fields) -> str:
    extra = "".join(f"  {k}: {v}\n" for k, v in sft_fields.items())
    return f"run_name: t\nsft:\n  data:\n    path: {SFT_DATA}\n{extra}"


# ---------------------------------------------------------------------------- unknown keys


def test_valid_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, minimal()))
    assert cfg.sft.learning_rate == 2e-4
    assert cfg.sft.data.eval_split == 0.05
    assert cfg.rm is None and cfg.ppo is None
    assert cfg.model.name_or_path == "embedded:smollm2-135m-instruct"
    assert cfg.source == str(tmp_path / "pipeline.yaml")


def test_unknown_top_level_key_names_line_and_closest_key(tmp_path):
    path = write(tmp_path, "run_name: t\nmodle:\n  dtype: float32\n" + minimal().split("\n", 1)[1])
    msg = error_of(path)
    assert msg.count("\n") == 0, msg
    assert f"{path}:2:" in msg
    assert "'modle'" in msg and "did you mean 'model'" in msg


def test_unknown_nested_key_names_line_and_closest_key(tmp_path):
    path = write(tmp_path, minimal(learnig_rate=0.001))
    msg = error_of(path)
    assert msg == f"{path}:5: unknown key 'sft.learnig_rate'; did you mean 'learning_rate'?"


def test_unknown_key_two_levels_down(tmp_path):
    path = write(tmp_path, f"""
        sft:
          data:
            path: {SFT_DATA}
            eval_spilt: 0.1
    """)
    msg = error_of(path)
    assert f"{path}:4:" in msg and "'sft.data.eval_spilt'" in msg and "did you mean 'eval_split'" in msg


def test_unknown_key_without_a_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path, minimal() + "lora:\n  zzzz: 1\n")
    msg = error_of(path)
    assert "unknown key 'lora.zzzz'" in msg
    assert "valid keys here: r, alpha, dropout, target_modules" in msg


def test_several_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, f"""
        run_name: t
        lora:
          r: 0
        sft:
          data:
            path: {SFT_DATA}
            eval_split: 0.9
          learnig_rate: 0.001
          batch_size: 0
          learning_rate: -1.0
    """)
    lines = error_of(path).splitlines()
    assert len(lines) == 5, lines
    by_key = {key: line for line in lines for key in ("lora.r", "eval_split", "learnig_rate", "batch_size", "sft.learning_rate") if key in line}
    assert by_key["lora.r"].startswith(f"{path}:3:")
    assert by_key["eval_split"].startswith(f"{path}:7:")
    assert by_key["learnig_rate"].startswith(f"{path}:8:")
    assert by_key["batch_size"].startswith(f"{path}:9:") and "greater than or equal to 1" in by_key["batch_size"]
    assert by_key["sft.learning_rate"].startswith(f"{path}:10:") and "greater than 0" in by_key["sft.learning_rate"]


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"learning_rate": -0.1}, "sft.learning_rate"),
        ({"learning_rate": 0}, "sft.learning_rate"),
        ({"batch_size": 0}, "sft.batch_size"),
        ({"max_steps": -2}, "sft.max_steps"),
        ({"epochs": "[1]"}, "sft.epochs"),
        ({"warmup_ratio": 1.0}, "sft.warmup_ratio"),  # transformers reads warmup_steps >= 1 as a step count
        ({"completion_only_loss": "maybe"}, "sft.completion_only_loss"),
    ],
)
def test_wrong_types_and_ranges(tmp_path, fields, key):
    msg = error_of(write(tmp_path, minimal(**fields)))
    assert f": {key}:" in msg, msg
    assert "\n" not in msg


def test_lora_rank_zero_and_bad_dtype(tmp_path):
    msg = error_of(write(tmp_path, minimal() + "lora:\n  r: 0\nmodel:\n  dtype: float8\n"))
    assert "lora.r: Input should be greater than or equal to 1 (got 0)" in msg
    assert "model.dtype" in msg and "'float32'" in msg


@pytest.mark.parametrize("value, ok", [("0.9", False), ("0", False), ("-0.1", False), ("0.5", True), ("0.01", True),
                                       ("1e-1", True), ("test", True), ("null", True)])
def test_eval_split_range(tmp_path, value, ok):
    path = write(tmp_path, f"sft:\n  data:\n    path: {SFT_DATA}\n    eval_split: {value}\n")
    if ok:
        loaded = load_config(path).sft.data.eval_split
        assert loaded == yaml.safe_load(value.replace("1e-1", "0.1"))
    else:
        assert "held-out fraction must be in (0, 0.5]" in error_of(path)


def test_union_field_error_is_one_line_without_branch_names(tmp_path):
    msg = error_of(write(tmp_path, f"sft:\n  data:\n    path: {SFT_DATA}\n    eval_split: [1]\n"))
    assert msg.count("\n") == 0, msg
    assert ": sft.data.eval_split: " in msg and "eval_split.float" not in msg


def test_missing_required_section(tmp_path):
    msg = error_of(write(tmp_path, "run_name: t\n"))
    assert "'sft' is required" in msg


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, f"run_name: t\nsft:\n  data:\n\tpath: {SFT_DATA}\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:4: malformed YAML")


def test_malformed_yaml_unclosed_flow(tmp_path):
    path = write(tmp_path, "run_name: t\nsft:\n  data: {path: a\n  max_steps: 3\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:4: malformed YAML")


def test_top_level_must_be_a_mapping_and_file_must_exist(tmp_path):
    assert "top level must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "no such config file" in error_of(tmp_path / "nope.yaml")


def test_ppo_without_rm_is_an_error(tmp_path):
    path = write(tmp_path, minimal() + f"ppo:\n  data:\n    path: {SFT_DATA}\n")
    assert "ppo section needs an rm section" in error_of(path)


# ---------------------------------------------------------------------------- --set


def test_set_overrides_coerce_types(tmp_path):
    path = write_config(tmp_path)
    cfg = load_config(path, [
        "sft.learning_rate=3e-4",       # float, YAML 1.2 style
        "sft.max_steps=7",              # int
        "sft.completion_only_loss=false",  # bool
        "lora.target_modules=[q_proj, v_proj]",  # list
        "rm.center_rewards_coefficient=null",
        "sft.data.eval_split=5e-2",     # a float, not the split name '5e-2'
        "run_name=other",
    ])
    assert cfg.sft.learning_rate == pytest.approx(3e-4) and isinstance(cfg.sft.learning_rate, float)
    assert cfg.sft.max_steps == 7
    assert cfg.sft.completion_only_loss is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.rm.center_rewards_coefficient is None
    assert cfg.sft.data.eval_split == pytest.approx(0.05)
    assert cfg.run_name == "other"


def test_set_new_nested_key_is_an_unknown_key_error(tmp_path):
    msg = error_of(write_config(tmp_path), ["sft.learnig_rate=1e-4"])
    assert msg == "--set: unknown key 'sft.learnig_rate'; did you mean 'learning_rate'?"
    msg = error_of(write_config(tmp_path), ["ppo.foo.bar=1"])
    assert "unknown key 'ppo.foo'" in msg


def test_set_bad_value_is_attributed_to_the_command_line(tmp_path):
    msg = error_of(write_config(tmp_path), ["ppo.kl_coef=abc"])
    assert msg.startswith("--set: ppo.kl_coef:") and "'abc'" in msg


def test_set_without_equals_sign(tmp_path):
    assert "expected KEY=VALUE" in error_of(write_config(tmp_path), ["sft.max_steps"])


# ---------------------------------------------------------------------------- stage hashes


def hashes(cfg) -> dict[str, str]:
    return {s: stage_hash(cfg, s) for s in ("sft", "rm", "ppo")}


@pytest.fixture
def base_hashes(tmp_path):
    path = write_config(tmp_path)
    return path, hashes(load_config(path))


def changed(path: Path, base: dict[str, str], *overrides: str) -> set[str]:
    now = hashes(load_config(path, list(overrides)))
    return {s for s in now if now[s] != base[s]}


def test_stage_hash_is_stable(base_hashes):
    path, base = base_hashes
    assert hashes(load_config(path)) == base
    assert len(set(base.values())) == 3


@pytest.mark.parametrize(
    "override, stale",
    [
        ("sft.learning_rate=5e-4", {"sft", "rm", "ppo"}),
        ("sft.data.max_rows=16", {"sft", "rm", "ppo"}),
        ("rm.learning_rate=5e-4", {"rm", "ppo"}),
        # the evaluations choose the exported checkpoint
        ("rm.eval_steps=1", {"rm", "ppo"}),
        ("sft.early_stopping_patience=2", {"sft", "rm", "ppo"}),
        ("ppo.kl_coef=0.1", {"ppo"}),
        ("model.dtype=bfloat16", {"sft", "rm", "ppo"}),
        ("lora.r=4", {"sft", "rm", "ppo"}),
        ("seed=1", {"sft", "rm", "ppo"}),
        # fields that do not change what a stage produces
        ("sft.logging_steps=3", set()),
        ("sft.save_steps=7", set()),
        ("rm.save_steps=3", set()),
        ("rm.save_total_limit=1", set()),
        ("rm.min_accuracy=0.9", set()),  # gates PPO, changes no stage's output: nothing goes stale
        ("rm.min_accuracy=null", set()),
        ("ppo.sample_every=1", set()),
        ("tracking.backend=wandb", set()),
        ("tracking.project=other", set()),
        ("launcher.num_processes=2", set()),
        ("model.compile=true", set()),  # how the passes run, not what they compute (to a rounding)
    ],
)
def test_stage_hash_follows_own_and_upstream_sections(base_hashes, override, stale):
    path, base = base_hashes
    assert changed(path, base, override) == stale


def test_stage_hash_changes_with_local_data_contents(tmp_path):
    data = tmp_path / "sft.jsonl"
    lines = Path(SFT_DATA).read_text().splitlines()[:20]
    data.write_text("\n".join(lines) + "\n")
    path = write_config(tmp_path, {"sft": {"data": {"path": str(data)}}})
    before = hashes(load_config(path))
    data.write_text("\n".join(lines[:-1]) + "\n")
    after = hashes(load_config(path))
    assert before["sft"] != after["sft"] and before["rm"] != after["rm"] and before["ppo"] != after["ppo"]
    # the hash reads the file's bytes, not its name or timestamp
    data.write_text("\n".join(lines) + "\n")
    assert hashes(load_config(path)) == before


def test_stage_hash_changes_with_the_files_of_a_data_folder(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    lines = Path(SFT_DATA).read_text().splitlines()
    (folder / "a.jsonl").write_text("\n".join(lines[:10]) + "\n")
    path = write_config(tmp_path, {"sft": {"data": {"path": str(folder)}}})
    before = stage_hash(load_config(path), "sft")
    (folder / "notes.txt").write_text("not data")  # ignored by the readers, so by the hash too
    assert stage_hash(load_config(path), "sft") == before
    (folder / "b.jsonl").write_text("\n".join(lines[10:12]) + "\n")
    after_add = stage_hash(load_config(path), "sft")
    (folder / "b.jsonl").write_text("\n".join(lines[10:13]) + "\n")
    after_edit = stage_hash(load_config(path), "sft")
    assert len({before, after_add, after_edit}) == 3


def test_stage_hash_of_missing_section_is_an_error(tmp_path):
    cfg = validate_config(yaml.safe_load(minimal()), "x.yaml")
    with pytest.raises(UserError, match="no 'rm' section"):
        stage_hash(cfg, "rm")
