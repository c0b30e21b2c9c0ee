"""Bad input: every user mistake exits with status 2 and one `error:` line naming the file, line,
key or flag, with no traceback and no stage marked done, and, where it can be, before any model
is loaded.

Config and data mistakes are checked twice, through `rlhf validate` and through `rlhf run-all`
(which validates first, so no stage starts and no run folder appears). Mistakes only a stage can
see (tokenizer contents, upstream stages, token lengths, a full disk, the evaluation judge) run
that stage in-process with model loading patched to fail the test, except where the mistake
comes after loading (disk full, judge)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import yaml
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from tests.conftest import write_config


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def done_stages(root: Path) -> list[str]:
    found = []
    for manifest in Path(root).rglob("manifest.json"):
        try:
            if json.loads(manifest.read_text()).get("status") == "done":
                found.append(str(manifest.parent))
        except ValueError:
            pass
    return found


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, exactly one `error:` line holding every fragment, no traceback; returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def line_of(path: Path, needle: str) -> int:
    return next(n for n, text in enumerate(path.read_text().splitlines(), 1) if needle in text)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sft_data(tmp_path: Path, path: Path) -> dict:
    return {"sft": {"data": {"path": str(path), "eval_path": None, "eval_split": None}}}


def rm_data(tmp_path: Path, path: Path) -> dict:
    return {"rm": {"data": {"path": str(path), "eval_path": None, "eval_split": None}}}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model weights are loaded (the mistake must surface before)."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"a model was loaded ({cls.__name__}) before the mistake was reported")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def tiny_model_copy(tmp_path: Path) -> Path:
    from rlhf.config import ModelConfig
    from rlhf.models import resolve_model

    dst = tmp_path / "model"
    shutil.copytree(resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama")), dst)
    return dst


# ---------------------------------------------------------------------------- config and data (validate, run-all)

# Each case: (tmp_path) -> (config path, extra CLI args, fragments the error line must hold).
Case = Callable[[Path], tuple[Path, list[str], list[str]]]


def malformed_yaml(tmp):
    p = tmp / "pipeline.yaml"
    p.write_text("run_name: tiny\nsft:\n  data: [unclosed\n  max_steps: 4\n")
    return p, [], [f"{p}:", "malformed YAML"]


def top_level_not_mapping(tmp):
    p = tmp / "pipeline.yaml"
    p.write_text("- sft\n- rm\n")
    return p, [], [str(p), "top level must be a mapping"]


def misspelt_key(tmp):
    p = write_config(tmp, {"sft": {"learnig_rate": 0.001}})
    return p, [], [f"{p}:{line_of(p, 'learnig_rate')}:", "unknown key 'sft.learnig_rate'", "did you mean 'learning_rate'"]


def unknown_section(tmp):
    p = write_config(tmp, {"ppoo": {"steps": 3}})
    return p, [], [f"{p}:{line_of(p, 'ppoo')}:", "unknown key 'ppoo'", "did you mean 'ppo'"]


def wrong_type(tmp):
    p = write_config(tmp, {"sft": {"batch_size": "four"}})
    return p, [], [f"{p}:{line_of(p, 'four')}:", "sft.batch_size", "'four'"]


def negative_lr(tmp):
    p = write_config(tmp, {"sft": {"learning_rate": -0.001}})
    return p, [], [f"{p}:{line_of(p, '-0.001')}:", "sft.learning_rate", "greater than 0"]


def batch_zero(tmp):
    p = write_config(tmp, {"rm": {"batch_size": 0}})
    return p, [], [str(p), "rm.batch_size", "greater than or equal to 1", "(got 0)"]


def lora_r_zero(tmp):
    p = write_config(tmp, {"lora": {"r": 0}})
    return p, [], [f"{p}:{line_of(p, 'r: 0')}:", "lora.r", "(got 0)"]


def dropout_out_of_range(tmp):
    p = write_config(tmp, {"lora": {"dropout": 1.5}})
    return p, [], [str(p), "lora.dropout", "less than 1"]


def ppo_batches_do_not_divide(tmp):
    p = write_config(tmp, {"ppo": {"num_mini_batches": 3}})
    return p, [], [str(p), "ppo", "multiple of num_mini_batches"]


def ppo_without_rm(tmp):
    p = write_config(tmp, {"rm": None})
    return p, [], [str(p), "ppo section needs an rm section"]


def missing_sft_section(tmp):
    p = write_config(tmp)
    raw = yaml.safe_load(p.read_text())
    del raw["sft"]
    p.write_text(yaml.safe_dump(raw))
    return p, [], [str(p), "'sft' is required"]


def run_name_dotdot(tmp):
    p = write_config(tmp, {"run_name": ".."})
    return p, [], [f"{p}:{line_of(p, 'run_name')}:", "run_name", "not run names"]


def run_name_with_slash(tmp):
    p = write_config(tmp, {"run_name": "../elsewhere"})
    return p, [], [f"{p}:{line_of(p, 'run_name')}:", "run_name", "should match pattern"]


def set_without_equals(tmp):
    return write_config(tmp), ["--set", "ppo.kl_coef"], ["--set 'ppo.kl_coef'", "KEY=VALUE"]


def set_misspelt_key(tmp):
    return write_config(tmp), ["--set", "ppo.kl_cof=0.1"], ["--set: unknown key 'ppo.kl_cof'", "did you mean 'kl_coef'"]


def config_file_missing(tmp):
    p = tmp / "nope.yaml"
    return p, [], [str(p), "no such config file"]


def config_not_utf8(tmp):
    p = tmp / "pipeline.yaml"
    p.write_bytes(b"run_name: caf\xe9\n")
    return p, [], [str(p), "not UTF-8"]


def data_file_missing(tmp):
    p = write_config(tmp, sft_data(tmp, tmp / "missing.jsonl"))
    return p, [], [str(tmp / "missing.jsonl"), "data file not found"]


def data_file_empty(tmp):
    data = tmp / "empty.jsonl"
    data.write_text("")
    return write_config(tmp, sft_data(tmp, data)), [], [str(data), "the data set is empty"]


def malformed_jsonl_line(tmp):
    data = jsonl(tmp / "sft.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c"', {"text": "d"}])
    return write_config(tmp, sft_data(tmp, data)), [], [f"{data}, line 3: malformed JSON"]


def jsonl_line_not_object(tmp):
    data = jsonl(tmp / "sft.jsonl", [{"text": "a"}, ["text", "b"]])
    return write_config(tmp, sft_data(tmp, data)), [], [f"{data}, line 2: expected a JSON object per line, got list"]


def missing_columns(tmp):
    data = jsonl(tmp / "sft.jsonl", [{"question": "q", "answer": "a"}])
    return write_config(tmp, sft_data(tmp, data)), [], [f"{data}, line 1", "SFT data needs columns", "found: question, answer"]


def wrong_column_type(tmp):
    data = jsonl(tmp / "rm.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": 5}])
    return write_config(tmp, rm_data(tmp, data)), [], [f"{data}, line 2: column 'rejected' must be a string or a list of messages, got int"]


def data_not_utf8(tmp):
    data = tmp / "sft.jsonl"
    data.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    return write_config(tmp, sft_data(tmp, data)), [], [f"{data}, line 2: not UTF-8"]


def unknown_role(tmp):
    data = jsonl(tmp / "sft.jsonl", [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    return write_config(tmp, sft_data(tmp, data)), [], [f"{data}, line 1: messages[0] has role 'human'"]


def unsupported_file_type(tmp):
    data = tmp / "sft.txt"
    data.write_text("hello\n")
    return write_config(tmp, sft_data(tmp, data)), [], [str(data), "unsupported file type '.txt'"]


def empty_eval_file(tmp):
    held = tmp / "eval.jsonl"
    held.write_text("\n")
    p = write_config(tmp, {"sft": {"data": {"eval_path": str(held)}}})
    return p, [], [str(held), "held-out data set is empty"]


def margin_column_missing(tmp):
    data = jsonl(tmp / "rm.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    p = write_config(tmp, {**rm_data(tmp, data), "rm": {**rm_data(tmp, data)["rm"], "margin_column": "margin"}})
    return p, [], [f"{data}, line 1: margin column 'margin' must hold a number"]


def every_pair_chosen_equals_rejected(tmp):
    """A row rule that needs no model: validate applies it, not only the RM stage."""
    data = jsonl(tmp / "rm.jsonl", [{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(3)])
    return write_config(tmp, rm_data(tmp, data)), [], [
        str(data), "no usable train rows left", "3 dropped (chosen == rejected; first: line 1, line 2, line 3)"]


def every_pair_has_an_empty_side(tmp):
    data = jsonl(tmp / "rm.jsonl", [{"prompt": "q", "chosen": "a", "rejected": " "}, {"prompt": "q", "chosen": "", "rejected": "b"}])
    return write_config(tmp, rm_data(tmp, data)), [], [
        str(data), "no usable train rows left", "2 dropped (chosen or rejected is empty; first: line 1, line 2)"]


def unknown_local_model(tmp):
    p = write_config(tmp, {"model": {"name_or_path": str(tmp / "no-model")}})
    return p, [], ["model.name_or_path", str(tmp / "no-model"), "neither a local model folder nor a hub id"]


def model_folder_without_config(tmp):
    (tmp / "m").mkdir()
    p = write_config(tmp, {"model": {"name_or_path": str(tmp / "m")}})
    return p, [], ["model.name_or_path", "has no config.json"]


def unknown_embedded_model(tmp):
    p = write_config(tmp, {"model": {"name_or_path": "embedded:gpt-9"}})
    return p, [], ["model.name_or_path", "unknown embedded model 'gpt-9'"]


def pickle_only_model(tmp):
    model = tiny_model_copy(tmp)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    p = write_config(tmp, {"model": {"name_or_path": str(model)}})
    return p, [], ["model.name_or_path", "has no .safetensors weights"]


def tokenizer_without_chat_template(tmp):
    model = tiny_model_copy(tmp)
    for f in model.glob("chat_template.*"):
        f.unlink()
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    p = write_config(tmp, {"model": {"name_or_path": str(model)}})  # the demo data is conversational
    return p, [], ["has no chat template and the data is conversational", "model.chat_template: chatml"]


def output_dir_not_writable(tmp):
    blocker = tmp / "a-file"
    blocker.write_text("")
    p = write_config(tmp, {"output_dir": str(blocker / "runs")})
    return p, [], ["output_dir:", str(blocker), "is not a folder", "choose a writable output_dir"]


CONFIG_CASES: list[Case] = [
    malformed_yaml, top_level_not_mapping, misspelt_key, unknown_section, wrong_type, negative_lr, batch_zero,
    lora_r_zero, dropout_out_of_range, ppo_batches_do_not_divide, ppo_without_rm, missing_sft_section,
    run_name_dotdot, run_name_with_slash, set_without_equals, set_misspelt_key, config_file_missing, config_not_utf8,
    data_file_missing, data_file_empty, malformed_jsonl_line, jsonl_line_not_object, missing_columns,
    wrong_column_type, data_not_utf8, unknown_role, unsupported_file_type, empty_eval_file, margin_column_missing,
    every_pair_chosen_equals_rejected, every_pair_has_an_empty_side, unknown_local_model, model_folder_without_config, unknown_embedded_model, pickle_only_model,
    tokenizer_without_chat_template, output_dir_not_writable,
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.__name__)
def test_config_and_data_mistakes(case: Case, tmp_path, no_model_loads):
    config, extra, fragments = case(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = assert_user_error(cli("validate", "--config", str(config), *extra), *fragments)
    # run-all validates first: the same line, and no stage starts (no run folder, nothing loaded)
    assert assert_user_error(cli("run-all", "--config", str(config), *extra), *fragments) == line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert done_stages(tmp_path) == []


# ---------------------------------------------------------------------------- mistakes a stage sees


def _copy_stages(src_config: Path, tmp_path: Path, stages: tuple[str, ...], overrides: dict | None = None) -> Path:
    path = write_config(tmp_path, overrides)
    src, dst = load_config(src_config), load_config(path)
    for stage in stages:
        shutil.copytree(src.stage_dir(stage), dst.stage_dir(stage), ignore=shutil.ignore_patterns("checkpoints"))
    return path


def _not_done(config: Path, stage: str) -> None:
    manifest = load_config(config).stage_dir(stage) / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "done"


def test_unknown_hub_model_id(tmp_path, monkeypatch, no_model_loads):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail fast
    config = write_config(tmp_path, {"model": {"name_or_path": "no-such-owner/no-such-model"}})
    assert_user_error(cli("sft", "--config", str(config)), "model.name_or_path",
                      "cannot load the tokenizer of 'no-such-owner/no-such-model'")
    _not_done(config, "sft")


def test_missing_upstream_stage(tmp_path, no_model_loads):
    config = write_config(tmp_path)
    assert_user_error(cli("rm", "--config", str(config)), "the rm stage needs a finished sft stage",
                      f"`rlhf sft --config {config}` first")
    assert done_stages(tmp_path) == []


def test_ppo_without_finished_rm(tiny_rm_run, tmp_path, no_model_loads):
    config = _copy_stages(tiny_rm_run, tmp_path, ("sft",))
    assert_user_error(cli("ppo", "--config", str(config)), "the ppo stage needs a finished rm stage", "(missing: never run)")
    _not_done(config, "ppo")


def test_rm_trained_on_a_different_base(tiny_rm_run, tmp_path, no_model_loads):
    """sft/model changed after the RM was trained (e.g. `run-all --only sft --force` on a GPU, not
    bit-reproducible): config hashes still match, the recorded weights fingerprint does not."""
    import torch
    from safetensors.torch import load_file, save_file

    config = _copy_stages(tiny_rm_run, tmp_path, ("sft", "rm"))
    weights = load_config(config).stage_dir("sft") / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3 * torch.ones_like(tensors[first])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    line = assert_user_error(cli("ppo", "--config", str(config)), "the reward model was trained on other SFT weights",
                             "rlhf run-all --from rm")
    assert str(load_config(config).stage_dir("rm") / "manifest.json") in line
    _not_done(config, "ppo")


def test_chosen_equal_rejected_rows_are_dropped_and_none_left_is_an_error(tiny_rm_run, tmp_path, no_model_loads):
    """data.py's documented rule: chosen == rejected rows are dropped (counted in the log and the
    manifest); a data set with nothing left is a user error naming the rule."""
    data = jsonl(tmp_path / "rm.jsonl", [{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(3)])
    config = _copy_stages(tiny_rm_run, tmp_path, ("sft",), rm_data(tmp_path, data))
    assert_user_error(cli("rm", "--config", str(config)), str(data), "no usable train rows left",
                      "3 dropped (chosen == rejected; first: line 1, line 2, line 3)")
    _not_done(config, "rm")


def test_some_chosen_equal_rejected_rows_are_dropped_with_a_count(tmp_path):
    from rlhf.config import ModelConfig
    from rlhf.data import rm_data as build
    from rlhf.models import load_tokenizer

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "same", "rejected": "same"}]
    cfg = load_config(write_config(tmp_path, rm_data(tmp_path, jsonl(tmp_path / "rm.jsonl", rows))))
    data = build(cfg, load_tokenizer(ModelConfig(name_or_path="embedded:tiny-random-llama")))
    assert data.report["train"] == {"kept": 1, "dropped": {"chosen == rejected": 1}}


def test_every_sft_row_longer_than_max_length(tmp_path, no_model_loads):
    config = write_config(tmp_path, {"sft": {"max_length": 8}})
    assert_user_error(cli("sft", "--config", str(config)), "sft_train.jsonl", "no usable train rows left",
                      "longer than max_length=8 tokens")
    assert done_stages(tmp_path) == []


def test_every_ppo_prompt_longer_than_max_prompt_length(tiny_rm_run, tmp_path, no_model_loads):
    config = _copy_stages(tiny_rm_run, tmp_path, ("sft", "rm"), {"ppo": {"max_prompt_length": 1}})
    assert_user_error(cli("ppo", "--config", str(config)), "ppo_train.jsonl", "no usable train rows left",
                      "prompt longer than max_prompt_length=1 tokens")
    _not_done(config, "ppo")


def test_stage_output_dir_not_writable(tmp_path, no_model_loads):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(tmp_path, {"output_dir": str(blocker / "runs")})
    assert_user_error(cli("sft", "--config", str(config)), "output_dir: cannot write to", str(blocker),
                      "choose a writable output_dir")


def test_disk_full_while_saving_a_checkpoint(tmp_path, monkeypatch):
    """ENOSPC from the first checkpoint write: one clear line, exit 2, the stage marked failed."""
    from peft import PeftModel

    def full(self, save_directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(save_directory) / "adapter_model.safetensors"))

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    config = write_config(tmp_path)
    stage = load_config(config).stage_dir("sft")
    assert_user_error(cli("sft", "--config", str(config)), "no space left on the device while writing",
                      str(stage / "checkpoints" / "checkpoint-2"), "rerun: it resumes from the last complete checkpoint")
    assert json.loads((stage / "manifest.json").read_text())["status"] == "failed"
    assert done_stages(tmp_path) == []


def test_judge_that_raises(tiny_ppo_run, tmp_path, monkeypatch):
    (tmp_path / "bad_judge_mod.py").write_text("def score(prompt, response):\n    raise RuntimeError('judge is down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write_config(tmp_path, {"eval": {"judge": "bad_judge_mod:score", "max_prompts": 2, "overopt_prompts": 0,
                                              "batch_size": 2}})
    cfg = load_config(config)
    shutil.copytree(load_config(tiny_ppo_run).run_dir, cfg.run_dir)
    assert_user_error(cli("eval", "--config", str(config)), "eval.judge 'bad_judge_mod:score' raised RuntimeError: judge is down",
                      "set eval.judge: null")
    assert not (cfg.stage_dir("eval") / "eval.json").exists()
