"""
Checkpoints: plain dicts of tensors and numbers, loadable with torch.load(weights_only=True).

A training checkpoint holds model, EMA and optimizer state, the DiT config, the method, the step, the run's
settings ("args") and its generator states; a latent run adds its frame VAE ("vae"), the timestep shift and
the sampler defaults. `export_model` keeps what streaming reads (the EMA weights in fp16, config, VAE, sampler
defaults): that is the file sample.py loads, e.g. checkpoints/default.pt. Every error is one line for the user.

A run directory (train.py --out) holds a run's checkpoints, the last KEEP_CHECKPOINTS of them, and is written by one
process at a time (a lock). --resume continues a run exactly, and only the same run: the checkpoint's settings,
method and model size must be the run's, and its generator states restore the noise the losses draw.
"""

import fcntl
import glob
import os
import zipfile
from dataclasses import asdict

import torch

from model import DiT, DiTConfig


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or not one of ours; the message is one line for the user."""


def save_checkpoint(path: str, model, ema, optimizer, method: str, step: int, extra: dict | None = None):
    """Write atomically: a crash mid-write leaves the previous checkpoint, never a truncated one."""
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "config": asdict(model.cfg), "method": method, "step": step, **(extra or {})}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def export_model(path: str, ckpt: dict):
    """Write the streaming model of a training checkpoint: its EMA weights in fp16 and what sampling reads (config,
    method, step, shift, sampler defaults, VAE), without the training state. About a quarter of the checkpoint."""
    def half(state):
        return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    training = ("model", "ema", "optimizer", "rng", "path", "critic", "critic_optimizer")
    keep = {k: v for k, v in ckpt.items() if k not in training}
    if "vae" in keep:
        keep["vae"] = {**keep["vae"], "state": half(keep["vae"]["state"])}
    tmp = path + ".tmp"
    torch.save({**keep, "ema": half(ckpt["ema"])}, tmp)
    os.replace(tmp, path)


def latest_checkpoint(directory: str) -> str | None:
    paths = sorted(glob.glob(os.path.join(directory, "ckpt_*.pt")))
    return paths[-1] if paths else None


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint file (or the latest ckpt_*.pt of a run directory), with one-line errors."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint (ckpt_*.pt) in directory {path}")
        path = found
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):   # torch.save writes a zip; anything else is not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint file (no zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many kinds (pickle, zip, EOF) for a damaged file
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {path} (damaged or not ours): {type(e).__name__}: {first}")
    missing = [k for k in ("ema", "config", "method", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a nanoforcing checkpoint (missing {', '.join(missing)})")
    ckpt["path"] = path
    return ckpt


def check_same_model(ckpt: dict, cfg: DiTConfig):
    """Raise CheckpointError unless the checkpoint holds weights of exactly cfg's shapes (routing may differ)."""
    theirs, ours = dict(ckpt["config"]), asdict(cfg)
    differ = [k for k in ours if k not in ("topk", "route_sink") and theirs.get(k) != ours[k]]
    if differ:
        have = ", ".join(f"{k} {theirs.get(k)}" for k in differ)
        want = ", ".join(f"{k} {ours[k]}" for k in differ)
        raise CheckpointError(f"{ckpt['path']} is another model size ({have}; this run needs {want})")


def model_from_checkpoint(ckpt: dict, ema: bool = True) -> DiT:
    model = DiT(DiTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return model


# ----------------------------------------------------------------------------------------------------------
# the run directory: one writer, the last checkpoints kept, exact resume

KEEP_CHECKPOINTS = 2


def lock_run_directory(out: str):
    """Hold an exclusive lock on the run directory until the process exits; refuse a second writer. Removes the
    temporaries of a run that was killed mid-write (its VAE's too)."""
    os.makedirs(out, exist_ok=True)
    handle = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise CheckpointError(f"another training (pid {handle.read().strip() or '?'}) is writing to {out}; give this "
                              f"one another --out")
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    for folder, _, names in os.walk(out):
        for name in names:
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
    return handle


def prune_checkpoints(out: str):
    for old in sorted(glob.glob(os.path.join(out, "ckpt_*.pt")))[:-KEEP_CHECKPOINTS]:
        os.remove(old)


def check_resume(ckpt: dict, method: str, cfg: DiTConfig, settings: dict, steps: int, processes: int):
    """Refuse, in one line, a resume that would not continue the same run: another method or model size, other
    settings (every flag that changes the weights), a finished run, another number of processes."""
    if ckpt["method"] != method:
        raise CheckpointError(f"{ckpt['path']} was trained with --method {ckpt['method']}, not {method}")
    check_same_model(ckpt, cfg)   # names the sizes that differ (routing, a flag, is compared with the settings)
    stored = ckpt.get("args")
    if stored is None:   # a checkpoint from before runs stored their settings
        raise CheckpointError(f"{ckpt['path']} does not record its run's settings; start a new run from it with "
                              f"--init instead")
    differ = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {settings.get(k)} (the run has {stored.get(k)})" for k in differ)
        raise CheckpointError(f"--resume must continue the same run, but {flags}; start a new run from it with "
                              f"--init instead")
    if ckpt["step"] >= steps:
        raise CheckpointError(f"{ckpt['path']} is already at step {ckpt['step']} of {steps}: the run is finished")
    if len(ckpt["rng"]) != processes:
        raise CheckpointError(f"{ckpt['path']} was written by {len(ckpt['rng'])} processes; resume it with as many "
                              f"(this is {processes})")


def rng_states(device) -> dict:
    """The generators the losses draw their noise from, on this rank."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: dict, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
