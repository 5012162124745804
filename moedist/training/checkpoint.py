"""Checkpoints: a folder per step, written atomically, verified by sha256 on load.

Layout of RUN/checkpoints/step_000123/:
    manifest.json   {"format": 1, "step": 123, "files": {name: {"sha256", "bytes"}}}
    model.pt        model state_dict (includes router state: ET thresholds, LF biases)
    optim.pt        optimiser state_dict
    state.json      trainer state (step, data position, tokenizer spec, config)

Everything is written into a hidden temporary folder and renamed into place, so a crash
never leaves a half-written checkpoint under a valid name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
_STEP_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or corrupt; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete-named checkpoint, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, Any],
    state: dict[str, Any],
    blobs: dict[str, bytes] | None = None,
    keep: int | None = None,
) -> Path:
    """Write `tensors` (name -> torch-saveable object, one .pt file each), `state` and
    raw `blobs` (file name -> bytes), all covered by the manifest.

    Returns the final folder. Older checkpoints beyond the newest `keep` are removed.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=final.parent))
    try:
        files = {}
        for name, obj in tensors.items():
            path = tmp / f"{name}.pt"
            torch.save(obj, path)
            files[path.name] = path
        for name, data in (blobs or {}).items():
            (tmp / name).write_bytes(data)
            files[name] = tmp / name
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        files["state.json"] = tmp / "state.json"
        manifest = {
            "format": FORMAT,
            "step": step,
            "files": {n: {"sha256": _sha256(p), "bytes": p.stat().st_size} for n, p in files.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if final.exists():  # re-saving the same step (e.g. final == periodic)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; return the manifest."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no manifest.json (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint '{path}': unsupported format {manifest.get('format')!r}")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint '{path}': manifest.json is corrupt ({e})") from e
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint '{path}': file {name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint '{path}': {name} is {f.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)"
            )
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint '{path}': sha256 of {name} does not match the manifest (corrupt)")
    return manifest


def load_checkpoint(path: Path, names: list[str], map_location: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify, then load the named .pt objects and state.json."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    out = {}
    for name in names:
        if f"{name}.pt" not in manifest["files"]:
            raise CheckpointError(f"checkpoint '{path}' has no {name}.pt")
        try:
            out[name] = torch.load(path / f"{name}.pt", map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises many kinds on bad pickles
            raise CheckpointError(f"checkpoint '{path}': cannot load {name}.pt ({e})") from e
    state = json.loads((path / "state.json").read_text())
    return out, state


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of a run folder, or a CheckpointError saying there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"run folder '{run_dir}' has no checkpoints (expected {run_dir}/checkpoints/step_*)")
    return found[-1][1]
