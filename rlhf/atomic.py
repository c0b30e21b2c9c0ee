"""Files written whole: a reader (or a rerun after a kill) sees the old file or the new one, never half.

Every output of a stage is written through these (a temp file or folder beside the target, then a
rename), which is what lets a stage be marked `done` only when all its outputs are complete
(rlhf.runs). `file_problem` is the check from the other side: does a file read back whole?
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def current_umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomically(path: Path, write: Callable[[Any], None], mode: str = "w", suffix: str = "") -> None:
    """Call `write(f)` on a temp file next to `path`, fsync, rename: readers see the old file or the
    whole new one. The file gets the usual permissions (0666 minus the umask; mkstemp alone would
    make it private to its owner). `suffix`: for writers that look at the extension (savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    """JSON through write_file_atomically."""

    def write(f) -> None:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")

    write_file_atomically(path, write)


def write_jsonl_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line through write_file_atomically."""
    write_file_atomically(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG through write_file_atomically (a reader never sees half a PNG)."""
    write_file_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), mode="wb")


def replace_dir(tmp: Path, out_dir: Path) -> Path:
    """Move a finished folder into place by renames only, so `out_dir` is never half-written."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def save_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` and rename it to `out_dir`: a reader sees the old folder or the whole new one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private to its owner
        write(tmp)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def file_problem(path: Path) -> str | None:
    """Why a written file is unusable (missing, or cut short by a kill mid-write), or None when it reads
    back whole. Checks structure only and unpickles nothing: safetensors header and data length, JSON
    syntax, and the CRC of every member of a torch.save zip (.pt, .pth, .bin)."""
    import struct
    import zipfile

    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return f"{path.name} is truncated"
                (n,) = struct.unpack("<Q", head)
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                return f"{path.name} is truncated"
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{path.name} is damaged ({bad})"
    except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile, EOFError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    return None
