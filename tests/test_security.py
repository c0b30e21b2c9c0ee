"""Security: no remote code unless configured (and then a warning), weights from safetensors only
(nothing unpickled), safe YAML only, secrets never written into the run folder, and config paths
that cannot send a stage's writes outside its run folder.

The source rules are checked on the syntax tree of every Python file in rlhf/, stages/, bench/ and
data/, so a new call that breaks them fails here."""

from __future__ import annotations

import ast
import warnings

import pytest
import yaml

from rlhf.config import load_config
from tests.conftest import REPO, write_config

SOURCES = sorted(p for d in ("rlhf", "stages", "bench", "data") for p in (REPO / d).rglob("*.py"))
FAKE_SECRETS = {
    "WANDB_API_KEY": "wandbfakekey0123456789abcdef0123456789abcd",
    "HF_TOKEN": "hf_FakeTokenXyzzy0123456789abcdefghij",
    "HUGGING_FACE_HUB_TOKEN": "hf_FakeHubTokenPlugh9876543210zyxwv",
    "OPENAI_API_KEY": "sk-fake-judge-key-0123456789",
}


def calls(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def parsed():
    for path in SOURCES:
        yield path.relative_to(REPO), ast.parse(path.read_text(encoding="utf-8"))


def test_sources_are_found():
    assert len(SOURCES) > 20 and any(p.name == "config.py" for p in SOURCES)


def test_every_torch_load_is_weights_only():
    found = []
    for path, tree in parsed():
        for c in calls(tree):
            if dotted(c.func) == "torch.load":
                w = keyword(c, "weights_only")
                assert isinstance(w, ast.Constant) and w.value is True, f"{path}:{c.lineno}: torch.load without weights_only=True"
                found.append(path)
    assert found, "the PPO optimizer state is read with torch.load; the scan should see it"


def test_no_pickle_and_no_unsafe_yaml():
    import rlhf.config

    for path, tree in parsed():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n in ("pickle", "cPickle", "dill", "joblib") for n in names), f"{path}:{node.lineno}: pickle"
            if isinstance(node, ast.Attribute) and dotted(node) in (
                    "yaml.unsafe_load", "yaml.full_load", "yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader",
                    "yaml.load_all", "yaml.unsafe_load_all", "torch.serialization.add_safe_globals"):
                raise AssertionError(f"{path}:{node.lineno}: {dotted(node)}")
        for c in calls(tree):
            if dotted(c.func) == "yaml.load":
                loader = keyword(c, "Loader")
                assert loader is not None and dotted(loader) == "_SafeLoader", f"{path}:{c.lineno}: yaml.load without a SafeLoader"
    assert issubclass(rlhf.config._SafeLoader, yaml.SafeLoader)
    with pytest.raises(yaml.constructor.ConstructorError):  # python objects are refused, not built
        rlhf.config._safe_load("x: !!python/object/apply:os.system ['true']")


def test_models_load_from_safetensors_only():
    """Every model from_pretrained call passes use_safetensors=True, directly or through
    models.model_kwargs (tokenizers hold no weights; peft reads adapter_model.safetensors, and
    torch-loads a .bin adapter with weights_only=True; GGUF is not a pickle format)."""
    exempt = ("AutoTokenizer.from_pretrained", "PeftModel.from_pretrained")
    checked = 0
    for path, tree in parsed():
        if path.parts[0] != "rlhf":
            continue  # bench/ loads the folders rlhf wrote
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Module))]:
            from_kwargs = {t.id for n in ast.walk(fn) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                           and dotted(n.value.func) == "model_kwargs" for t in n.targets if isinstance(t, ast.Name)}
            for c in calls(fn):
                name = dotted(c.func)
                if not name.endswith(".from_pretrained") or name in exempt or keyword(c, "gguf_file") is not None:
                    continue
                safe = keyword(c, "use_safetensors")
                splats = [k.value for k in c.keywords if k.arg is None]
                ok = (isinstance(safe, ast.Constant) and safe.value is True) or any(
                    (isinstance(s, ast.Call) and dotted(s.func) == "model_kwargs") or (isinstance(s, ast.Name) and s.id in from_kwargs)
                    for s in splats)
                assert ok, f"{path}:{c.lineno}: {name} without use_safetensors=True"
                checked += 1
    assert checked >= 5


def test_trust_remote_code_off_unless_configured_then_warned():
    from rlhf.config import ModelConfig
    from rlhf.models import model_kwargs

    for path, tree in parsed():
        for c in calls(tree):
            value = keyword(c, "trust_remote_code")
            assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{c.lineno}: trust_remote_code=True"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kwargs = model_kwargs(ModelConfig(name_or_path="embedded:tiny-random-llama"))
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True
    with pytest.warns(UserWarning, match="model.trust_remote_code is true: code from owner/model will run on this machine"):
        assert model_kwargs(ModelConfig(name_or_path="owner/model", trust_remote_code=True))["trust_remote_code"] is True


def test_no_config_field_holds_a_secret():
    """Credentials come from the environment only: no config key could carry one into pipeline.yaml."""
    from rlhf.config import config_reference

    keys = [row.split("`")[1] for row in config_reference().splitlines()[2:]]
    not_credentials = {"ppo.stop_token"}  # a vocabulary token
    assert keys and not [k for k in keys if any(m in k.lower() for m in ("key", "token", "secret", "password", "auth"))
                         and k not in not_credentials]


# ---------------------------------------------------------------------------- secrets and paths in a real run


def test_secrets_never_reach_the_run_folder_and_writes_stay_inside_it(tmp_path, monkeypatch, capfd):
    """The whole tiny pipeline (W&B offline, the Trainer's W&B callback included), `rlhf eval` and
    `rlhf report`, with fake credentials in the environment: no file under the run folder holds
    one (manifests, logs, resolved pipeline.yaml, metrics, W&B run files, reports), nor does the
    console output; and nothing is written outside the run folder (cwd stays empty)."""
    from typer.testing import CliRunner

    from rlhf.cli import app

    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = write_config(tmp_path, {"tracking": {"backend": "wandb", "mode": "offline"},
                                     "eval": {"max_prompts": 2, "overopt_prompts": 2, "batch_size": 2}})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = {p for p in tmp_path.rglob("*")}
    run_dir = load_config(config).run_dir
    runner = CliRunner()
    outputs = []
    for command in ("sft", "rm", "ppo", "eval", "report"):
        result = runner.invoke(app, [command, "--config", str(config)])
        assert result.exit_code == 0, (command, result.output, result.exception)
        outputs.append(result.output)
    outputs.append(capfd.readouterr().err)

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files), "W&B offline run files should be among those scanned"
    assert (run_dir / "pipeline.yaml").is_file() and (run_dir / "eval").is_dir()
    for path in files:
        data = path.read_bytes()
        for name, secret in FAKE_SECRETS.items():
            assert secret.encode() not in data, f"{name} written to {path}"
    for text in outputs:
        assert not any(secret in text for secret in FAKE_SECRETS.values())
    assert list(cwd.iterdir()) == []
    new = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in new if run_dir not in p.parents and p != run_dir and p not in run_dir.parents]
    assert outside == [], outside


def test_run_name_cannot_leave_output_dir(tmp_path):
    """run_name is the only config value joined into output paths below output_dir (stage folder
    and file names are fixed); names with a separator, '.' and '..' are refused."""
    from rlhf.errors import UserError

    for bad in ("..", ".", "../x", "a/b", "/abs", "a\\b", ""):
        with pytest.raises(UserError, match="run_name"):
            load_config(write_config(tmp_path, {"run_name": bad}))
    cfg = load_config(write_config(tmp_path, {"run_name": "ok.name-1_x"}))
    for stage in ("sft", "rm", "ppo"):
        assert cfg.stage_dir(stage).resolve().parent == (tmp_path / "runs" / "ok.name-1_x").resolve()
