"""Checkpoints: a folder per step, written atomically, verified by sha256 on load.

Layout of RUN/checkpoints/step_000123/:
    manifest.json   {"format": 1, "step": 123, "files": {name: {"sha256", "bytes"}}}
    model.pt        model state_dict (includes router state: ET thresholds, LF biases)
    optim.pt        optimiser state_dict
    metrics.parquet the run's metric rows up to this step
    state.json      step, tokenizer spec, resolved config, torch RNG state, skipped steps
                    (distributed runs: the worker count); batches need no position: they
                    are a pure function of (seed, step)

Everything is written into a hidden temporary folder, flushed to disk (every file, the
folder and its parent are fsynced) and renamed into place, so a crash, even of the
machine, never leaves a half-written checkpoint under a valid name. Re-saving a step moves
the old folder aside first and deletes it only once the new one is in place; older
checkpoints are pruned only after the new one is durable. A checkpoint never holds NaN or
Inf: save_checkpoint refuses it. Loading for resume, eval, generate or signatures takes the
newest checkpoint that verifies (`load_latest_checkpoint`), warning about each newer one
it skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moedist.errors import CheckpointError  # defined there: the CLI handles it without importing torch

FORMAT = 1
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (for a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nonfinite_tensor(tensors: Any, name: str = "") -> str | None:
    """Name and count of the first floating tensor in a nested dict/list of tensors that
    holds NaN or Inf (e.g. "model: blocks.1.ffn.router.threshold_E (3 of 16 values)")."""
    if isinstance(tensors, torch.Tensor):
        if not (tensors.is_floating_point() or tensors.is_complex()):
            return None
        # Fast path: a float64 sum is finite iff every value is (NaN and Inf propagate, and
        # sums of float32/16 values cannot overflow float64); a float64 tensor of huge finite
        # values that does overflow is cleared by the exact count below.
        total = tensors.detach().sum(dtype=torch.complex128 if tensors.is_complex() else torch.float64)
        if bool(torch.isfinite(total)):
            return None
        bad = int((~torch.isfinite(tensors)).sum())
        return f"{name} ({bad} of {tensors.numel()} values NaN/Inf)" if bad else None
    if isinstance(tensors, dict):
        items = tensors.items()
    elif isinstance(tensors, list | tuple):
        items = enumerate(tensors)
    else:
        return None
    for key, value in items:
        sub = f"{name}.{key}" if name and not name.endswith(":") else f"{name} {key}".strip()
        found = nonfinite_tensor(value, sub)
        if found:
            return found
    return None


def _nonfinite_in(tensors: dict[str, Any]) -> str | None:
    for part, obj in tensors.items():
        found = nonfinite_tensor(obj, f"{part}:")
        if found:
            return found
    return None


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

    Returns the final folder. Older checkpoints beyond the newest `keep` are removed (once
    the new one is on disk). A floating tensor with NaN or Inf is refused (CheckpointError
    naming it) before anything is written: a checkpoint must be a state to go back to.
    """
    bad = _nonfinite_in(tensors)
    if bad:
        raise CheckpointError(f"refusing to save checkpoint of step {step}: tensor {bad}")
    final = checkpoint_dir(run_dir, step)
    if not final.parent.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        _fsync(final.parent.parent)  # the run folder's entry for checkpoints/
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=final.parent))
    aside: Path | None = None
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
        for path in [*files.values(), tmp / "manifest.json"]:
            _fsync(path)
        _fsync(tmp)
        _fsync(final.parent)
        if final.exists():  # re-saving a step: keep the old one until the new one is in place
            aside = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            if aside is not None:
                os.replace(aside, final)
                aside = None
            raise
        _fsync(final.parent)  # the rename is on disk before anything older is deleted
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
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
    bad = _nonfinite_in(out)
    if bad:
        raise CheckpointError(f"checkpoint '{path}' holds non-finite values: tensor {bad}")
    try:
        state = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"checkpoint '{path}': state.json is corrupt ({e})") from e
    return out, state


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of a run folder, or a CheckpointError saying there is none.

    It is not verified: to load one, use `load_latest_checkpoint`, which falls back to an
    older checkpoint when the newest is corrupt.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"run folder '{run_dir}' has no checkpoints (expected {run_dir}/checkpoints/step_*)")
    return found[-1][1]


def warn_stderr(message: str) -> None:
    """One line `moedist: warning: ...` on stderr."""
    print(f"moedist: warning: {message}", file=sys.stderr, flush=True)


def _newest_that(run_dir: Path, attempt: Callable[[Path], Any], warn: Callable[[str], None] | None) -> tuple[Path, Any]:
    """(path, attempt(path)) of the newest checkpoint for which `attempt` raises no
    CheckpointError; each one skipped is reported through `warn`."""
    found = list_checkpoints(run_dir)
    if not found:
        latest_checkpoint(run_dir)  # raises "has no checkpoints"
    errors: list[CheckpointError] = []
    for _, path in reversed(found):
        try:
            result = attempt(path)
        except CheckpointError as e:
            errors.append(e)
            continue
        if warn is not None:
            for skipped, e in zip(reversed(found), errors, strict=False):
                warn(f"skipping checkpoint '{skipped[1]}', which does not verify ({e}); using '{path.name}'")
        return path, result
    more = f" (and the {len(errors) - 1} older checkpoint(s) do not verify either)" if len(errors) > 1 else ""
    raise CheckpointError(f"{errors[0]}{more}")


def newest_valid_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None) -> tuple[Path, int]:
    """(path, step) of the newest checkpoint whose files match its manifest."""
    path, manifest = _newest_that(Path(run_dir), verify_checkpoint, warn)
    return path, int(manifest["step"])


def load_latest_checkpoint(
    run_dir: Path,
    names: list[str],
    map_location: str = "cpu",
    warn: Callable[[str], None] | None = warn_stderr,
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(path, objects, state) of the newest checkpoint that verifies and loads (files match
    the manifest, objects unpickle, every tensor finite); older ones are tried in turn and
    each newer one skipped is reported through `warn` (default: one line on stderr)."""
    path, (objs, state) = _newest_that(Path(run_dir), lambda p: load_checkpoint(p, names, map_location), warn)
    return path, objs, state
