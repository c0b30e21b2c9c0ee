"""Model cards in every model/ and adapter/ folder, and `rlhf export` (the hub mocked at HTTP)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from rlhf.staleness import read_manifest

runner = CliRunner()


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_sft_stage_writes_cards_for_model_and_adapter(tiny_sft_run):
    cfg = load_config(tiny_sft_run)
    manifest = read_manifest(cfg.stage_dir("sft"))
    model = _card(cfg.stage_dir("sft") / "model")
    assert model.data.library_name == "transformers"
    assert "sft" in model.data.tags and model.data.pipeline_tag == "text-generation"
    assert model.data.base_model is None  # the tiny base is random and local: no hub base to name
    text = model.text
    assert "held-out loss" in text and f"{manifest['metrics']['eval_loss']:.4g}" in text
    assert f"| {manifest['metrics']['data']['train']['kept']} |" in text  # row count from the manifest
    assert str(Path(cfg.sft.data.path)) in text and "AutoModelForCausalLM.from_pretrained" in text
    assert "max_steps: 4" in text  # the training config that produced it
    adapter = _card(cfg.stage_dir("sft") / "adapter")
    assert adapter.data.library_name == "peft" and "PeftModel.from_pretrained" in adapter.text


def test_rm_cards_show_the_held_out_accuracy_and_the_classifier(tiny_rm_run):
    cfg = load_config(tiny_rm_run)
    m = read_manifest(cfg.stage_dir("rm"))["metrics"]
    card = _card(cfg.stage_dir("rm") / "model")
    assert card.data.pipeline_tag == "text-classification" and "reward-model" in card.data.tags
    assert f"{m['eval_accuracy']:.3f} ± " in card.text and f"over {m['eval_n_pairs']} pairs" in card.text
    assert "AutoModelForSequenceClassification.from_pretrained" in card.text
    adapter = _card(cfg.stage_dir("rm") / "adapter")
    assert str(cfg.stage_dir("sft") / "model") in adapter.text  # the RM adapter sits on sft/model


def test_front_matter_names_a_known_base_its_licence_and_hub_data(tmp_path, tiny_sft_run):
    from rlhf.model_card import card_text
    from rlhf.staleness import stage_config

    cfg = load_config(tiny_sft_run, ["model.name_or_path=embedded:smollm2-135m-instruct",
                                     "sft.data.path=HuggingFaceH4/no_robots"])
    manifest = dict(read_manifest(load_config(tiny_sft_run).stage_dir("sft")), config=stage_config(cfg, "sft"))
    (tmp_path / "README.md").write_text(card_text(cfg, "sft", "model", manifest))
    meta = _card(tmp_path).data
    assert meta.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta.license == "apache-2.0"
    assert meta.datasets == ["HuggingFaceH4/no_robots"]


def test_export_copies_the_model_with_its_card(tiny_rm_run, tmp_path):
    cfg = load_config(tiny_rm_run)
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--stage", "rm", "--to", str(out), "--config", str(tiny_rm_run)])
    assert result.exit_code == 0, result.output
    src = cfg.stage_dir("rm") / "model"
    for f in src.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    assert f'from_pretrained("{out}")' in (out / "README.md").read_text()  # names the copy, not the run folder
    again = runner.invoke(app, ["export", "--stage", "rm", "--to", str(out), "--config", str(tiny_rm_run)])
    assert again.exit_code == 2 and "not an empty folder" in again.output
    unfinished = runner.invoke(app, ["export", "--stage", "ppo", "--to", str(tmp_path / "p"), "--config", str(tiny_rm_run)])
    assert unfinished.exit_code == 2 and "--stage ppo: the stage is missing" in unfinished.output


@pytest.fixture
def mock_hub(monkeypatch):
    """huggingface_hub's HTTP client answered by a fake hub: records each request and answers the
    endpoints create_repo + upload_folder use (repo creation, YAML check, preupload, commit)."""
    import httpx2
    from huggingface_hub.utils import _http

    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen: dict[str, object] = {"paths": []}

    def handler(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        seen["paths"].append((request.method, path))
        if path == "/api/repos/create":
            body = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if path.endswith("/commit/main"):
            lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
            seen["files"] = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                             for x in lines if x["key"] == "file"}
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny-sft/commit/abc",
                                              "commitOid": "a" * 40})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})

    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    yield seen
    _http.set_client_factory(_http.default_client_factory)


def test_export_pushes_the_folder_to_the_hub(tiny_sft_run, tmp_path, mock_hub):
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--stage", "sft", "--to", str(out), "--push-to-hub", "me/tiny-sft",
                                 "--config", str(tiny_sft_run)])
    assert result.exit_code == 0, result.output
    assert ("POST", "/api/repos/create") in mock_hub["paths"]
    sent = mock_hub["files"]
    assert set(sent) == {p.name for p in out.iterdir()}
    assert sent["README.md"] == (out / "README.md").read_bytes() and b'from_pretrained("me/tiny-sft")' in sent["README.md"]
    assert sent["model.safetensors"] == (out / "model.safetensors").read_bytes()


def test_push_without_the_network_is_one_error_line(tiny_sft_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["export", "--stage", "sft", "--to", str(tmp_path / "o"), "--push-to-hub", "me/x",
                                 "--config", str(tiny_sft_run)])
    assert result.exit_code == 2 and "error: --push-to-hub me/x:" in result.output and "hf upload" in result.output
    assert (tmp_path / "o" / "README.md").is_file()  # the local copy is kept
