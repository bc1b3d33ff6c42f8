"""The shipped default model and the CPU preset that trains it: what the README promises, checked without training."""

import os
import re
import subprocess
import sys

import imageio.v2 as imageio
import torch

import recipe
import train
from model import DiTConfig
from trainer import settings
from sample import DEFAULT_CKPT
from vae import VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset_card() -> str:
    """The README's one-line description of the --cpu preset, built from the values the code uses."""
    c, p, r, v = DiTConfig.preset("cpu"), recipe.PRESETS["cpu"], recipe.RECIPE["cpu"], VAEConfig()
    return (f"a frame VAE ({r['vae_steps']:,} steps; {c.height * 2 ** v.downs}x{c.height * 2 ** v.downs}x3 frames "
            f"-> {c.height}x{c.width}x{v.latent} latents) and its colour decoder ({r['colour_steps']:,} steps), "
            f"then a DiT of dim {c.dim}, depth {c.depth}, {c.heads} heads, "
            f"{c.patch}x{c.patch} latent patches ({c.tokens_per_frame} tokens a frame), chunks of {c.chunk}, "
            f"{c.frames}-frame clips: {p['steps']:,} steps of batch {p['batch']}, lr {p['lr']:g} (cosine to "
            f"{recipe.LR_FLOOR:g}x), EMA {p['ema']:g}, shift {r['shift']:g}"
            f"{', logit-normal noise levels' if p['logit_normal'] else ''}, bf16 autocast")


def test_cpu_preset_is_what_the_readme_says():
    readme = re.sub(r"\s+", " ", open(os.path.join(ROOT, "README.md")).read())
    assert preset_card() in readme, preset_card()
    assert "python train.py --method resampling --cpu" in readme


def test_shipped_default_loads_safely_and_streams_with_default_settings(tmp_path):
    ckpt = torch.load(DEFAULT_CKPT, map_location="cpu", weights_only=True)   # plain tensors and dicts only
    assert ckpt["method"] == "resampling" and ckpt["config"] == vars(DiTConfig.preset("cpu"))
    assert ckpt["sampler"] == recipe.RECIPE["cpu"]["sampler"]   # what the preset command writes into its model
    assert ckpt["vae"]["config"]["colours"] == bool(recipe.RECIPE["cpu"]["colour_steps"])
    # trained by the preset command: every setting that shapes the weights is the one it takes today
    assert ckpt["args"] == settings(train.parse(["--method", "resampling", "--cpu"]))
    assert os.path.getsize(DEFAULT_CKPT) < 16 * 2**20
    out = tmp_path / "v.mp4"
    c = DiTConfig.preset("cpu")
    seconds = 2 * c.chunk / 16   # two chunks at 16 frames/s
    r = subprocess.run([sys.executable, "sample.py", "--seconds", str(seconds), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    frames = [f for f in imageio.get_reader(str(out))]   # list() asks len(): inf
    assert len(frames) == 2 * c.chunk and frames[0].shape == (128, 128, 3)   # 32x32 frames, written 4x


def test_default_streams_latents_with_the_spread_of_real_ones():
    """Normalised VAE latents are about unit variance: a third of real values lie beyond +-1, and objects carry
    the largest ones. Clipping streamed latents to the pixel range [-1, 1] erased every object and the occluder.
    The model streams under bf16 autocast (its preset trains so) and the VAE decodes in fp32, outside it."""
    import numpy as np
    import argparse
    from data import ToyWorld, to_float
    import sample
    parser = argparse.ArgumentParser()
    sample.add_args(parser)   # sample.py's own options and defaults, so a new option cannot go missing here
    args = parser.parse_args(["--ckpt", DEFAULT_CKPT, "--seconds", str(4 * DiTConfig.preset("cpu").chunk / 16),
                              "--memory", "sink", "--seed", "1", "--device", "cpu"])
    stream = sample.Stream(args)
    torch.manual_seed(0)
    latents, autocast = [], []
    decode = stream.vae.decode
    stream.vae.decode = lambda z: latents.append(z) or autocast.append(torch.is_autocast_enabled("cpu")) or decode(z)
    frames = np.concatenate(list(stream.chunks()))
    z = torch.cat(latents)
    assert stream.bf16 and z.dtype == torch.float32 and not any(autocast) and not torch.is_autocast_enabled("cpu")
    real = stream.vae.encode(torch.from_numpy(to_float(ToyWorld(1).render(0, len(frames)))).float())
    beyond = lambda x: (x.abs() > 1).float().mean().item()
    assert beyond(real) > 0.2
    assert beyond(z) > 0.5 * beyond(real), (beyond(z), beyond(real))


def test_shipped_score_is_a_bidirectional_model_in_the_defaults_latent_space():
    # what `train.py --method self|rolling --cpu` distils against when no --score is given
    score = torch.load(train.SCORE_CKPT, weights_only=True)
    default = torch.load(DEFAULT_CKPT, weights_only=True)
    assert score["method"] == "bidirectional" and score["step"] == train.SCORE_STEPS["cpu"]
    assert score["config"] == default["config"]
    a, b = score["vae"]["state"], default["vae"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the student it distils: the default through Causal Forcing's ODE stage, trained first into OUT/ode
    args = train.parse(["--method", "self", "--cpu", "--out", "runs/x"])
    assert args.score == train.SCORE_CKPT and args.init == os.path.join("runs/x", "ode", "model.pt")
    [(_, out, argv)] = args.stages
    assert out == os.path.join("runs/x", "ode") and argv == ["--method", "ode", "--steps", str(train.ODE_STEPS["cpu"]),
                                                             "--init", train.DEFAULT_CKPT]
