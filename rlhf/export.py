"""`rlhf export`: copy a finished stage's merged model, with a fresh model card, and optionally push it.

The copy is the stage's model/ folder (weights, config, tokenizer) with README.md written again:
the card then carries the latest figures (eval/eval.json, written after the stage finished) and
names the folder by where it now lives (the hub repo when pushed). Pushing goes through
huggingface_hub's `upload_folder` and needs the network and a token (`hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf.atomic import write_file_atomically
from rlhf.config import PipelineConfig
from rlhf.errors import UserError
from rlhf.model_card import CARD_FILE, card_text
from rlhf.staleness import stage_state


def export_stage(cfg: PipelineConfig, stage: str, to: str | Path, push_to_hub: str | None = None,
                 private: bool = False) -> Path:
    """Copy `runs/<name>/<stage>/model` to `to` with its card; push it to `push_to_hub` when given.
    Returns the folder written. The stage must be done and up to date with the config."""
    if getattr(cfg, stage, None) is None:
        raise UserError(f"--stage {stage}: not a configured stage of {cfg.source}")
    state = stage_state(cfg, stage)
    if state.status != "done":
        raise UserError(f"--stage {stage}: the stage is {state.status} ({state.reason or 'not finished'}); "
                        f"finish it first: rlhf run-all --config {cfg.source or 'pipeline.yaml'}")
    src = cfg.stage_dir(stage) / "model"
    if not src.is_dir():
        raise UserError(f"{src} does not exist; rerun the stage: rlhf run-all --from {stage} --config {cfg.source}")
    dest = Path(to).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"--to {to}: exists and is not an empty folder; choose a new folder")
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise UserError(f"--to {to}: is inside {src}; choose a folder outside the run")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest, dirs_exist_ok=True)
    text = card_text(cfg, stage, "model", state.manifest or {}, where=push_to_hub or str(dest))
    write_file_atomically(dest / CARD_FILE, lambda f: f.write(text))
    if push_to_hub:
        push_folder(dest, push_to_hub, f"rlhf export: {cfg.run_name} {stage} model", private=private)
    return dest


def push_folder(folder: Path, repo_id: str, message: str, private: bool = False) -> str:
    """Create the hub model repo if needed and upload `folder` in one commit; returns the commit URL.
    Network, authentication and permission failures are the user's to fix: one `error:` line."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except OfflineModeIsEnabled:
        raise UserError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; the copy is in {folder}, push it later "
                        f"with `hf upload {repo_id} {folder}`") from None
    except httpx2.TransportError as e:
        raise UserError(f"--push-to-hub {repo_id}: cannot reach the hub ({type(e).__name__}: {e}); the copy is in "
                        f"{folder}, push it later with `hf upload {repo_id} {folder}`") from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--push-to-hub {repo_id}: the hub refused ({first}); check `hf auth whoami` and that you "
                        f"may write to {repo_id}; the copy is in {folder}") from None
    return str(getattr(info, "commit_url", info))
