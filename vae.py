"""
A small frame autoencoder (a VAE, after Wan's and Stable Diffusion's), so the DiT models latents, not pixels.

Why. A pixel-space DiT trained with an MSE on a CPU budget draws the *mean* of what could be there: blur and
speckle instead of ToyWorld's flat colours and sharp edges. The papers' models never see pixels: Wan's VAE turns
each frame into a small latent grid and its decoder draws the detail. Here one frame of 32x32x3 becomes an 8x8x4
latent (12x fewer numbers); the DiT models those, and the decoder, trained on ToyWorld, puts back crisp edges and
exact colours.

It is a VAE, not a plain autoencoder, for the same reason as in latent diffusion: the KL term keeps the latent
smooth and the sampled posterior noise trains the decoder to draw well from *nearby* latents, which is all a
generator ever gives it. It is per frame (no temporal compression), so a streamed chunk decodes on its own.
The DiT reads the posterior mean, normalised per channel by statistics measured after training (`shift`,
`scale`), so its flow-matching noise and the latents have the same scale.

The colour decoder. An RGB decoder trained with L1 + MSE paints the mean colour wherever it is unsure: edges, and
above all the imperfect latents a generator makes, come out in mixed colours no ToyWorld frame has
(docs/cpu-recipe.md, section 11). Every ToyWorld colour lies on one of 15 lines in RGB space (data.colour_lines:
the 8 palette colours and the occluder as points, each backdrop's line from base to shade), so a colour decoder
predicts, per pixel, which line (15 logits, a cross-entropy) and where on it (one number in [0, 1]), and draws the
most likely line: where an RGB decoder blends, it commits. It is trained for a frozen encoder (--encoder), so the
latents, and any DiT trained on them, stay as they were, as Stable Diffusion's decoder fine-tunes do. It knows only
ToyWorld's colours; video of anything else needs the RGB decoder.

    python vae.py --out runs/vae        # train on ToyWorld frames (resumable), print PSNR and palette fidelity
    python vae.py --colours --encoder runs/vae/vae.pt --out runs/vae-colours    # a colour decoder for that encoder
"""

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import WorldConfig, colour_lines, sample_clips, to_uint8
from metrics import classify, palette_fidelity


@dataclass
class VAEConfig:
    channels: int = 3      # image channels
    latent: int = 4        # latent channels
    width: int = 32        # channels at full resolution; doubled at each downsampling
    downs: int = 2         # 2 downsamplings: 32x32 -> 8x8
    kl: float = 1e-4       # weight of the KL term (per latent number, against a per-pixel reconstruction loss)
    colours: bool = False  # the decoder picks each pixel's colour line (data.colour_lines) and a place on it


# ----------------------------------------------------------------------------------------------------------
# modules

class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w = [cfg.width * 2 ** i for i in range(cfg.downs + 1)]
        layers = [nn.Conv2d(cfg.channels, w[0], 3, padding=1)]
        for i in range(cfg.downs):
            layers += [ResBlock(w[i]), nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1)]
        layers += [ResBlock(w[-1]), nn.GroupNorm(8, w[-1]), nn.SiLU(), nn.Conv2d(w[-1], 2 * cfg.latent, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).chunk(2, dim=1)   # posterior mean and log-variance, (N, latent, h, w) each


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w = [cfg.width * 2 ** i for i in range(cfg.downs + 1)][::-1]
        layers = [nn.Conv2d(cfg.latent, w[0], 3, padding=1), ResBlock(w[0])]
        for i in range(cfg.downs):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w[i], w[i + 1], 3, padding=1),
                       ResBlock(w[i + 1])]
        # RGB values, or a colour decoder's logit per colour line and the place f on it (one channel, shared)
        out = len(colour_lines()[0]) + 1 if cfg.colours else cfg.channels
        layers += [nn.GroupNorm(8, w[-1]), nn.SiLU(), nn.Conv2d(w[-1], out, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # per-channel statistics of the posterior means: the DiT sees (mu - shift) / scale, about unit variance
        self.register_buffer("shift", torch.zeros(cfg.latent))
        self.register_buffer("scale", torch.ones(cfg.latent))
        if cfg.colours:   # stored with the weights: the colour lines the head's logits index, in [-1, 1]
            starts, ends = colour_lines()
            self.register_buffer("starts", torch.tensor(starts / 127.5 - 1, dtype=torch.float32))
            self.register_buffer("ends", torch.tensor(ends / 127.5 - 1, dtype=torch.float32))

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** self.cfg.downs

    def loss(self, x, generator=None):
        """Training loss on frames x (N, C, H, W) in [-1, 1]: reconstruction of a posterior sample + KL. The
        reconstruction is L1 + MSE for an RGB decoder, the cross-entropy of each pixel's colour for a colour one."""
        mu, logvar = self.encoder(x)
        logvar = logvar.clamp(-20, 5)
        z = mu + torch.randn(mu.shape, generator=generator, device=x.device) * (0.5 * logvar).exp()
        y = self.decoder(z).float()
        if self.cfg.colours:   # the line's cross-entropy, plus the distance along it (RGB, [-1, 1] units)
            line, f = self.colour_code(x)
            length = (self.ends - self.starts).norm(dim=-1)[line]                # (N, H, W), 0 for a point
            rec = F.cross_entropy(y[:, :-1], line) + (length * (y[:, -1].sigmoid() - f).abs()).mean()
        else:
            rec = (y - x).abs().mean() + F.mse_loss(y, x)
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).mean()
        return rec + self.cfg.kl * kl, rec, kl

    def colour_code(self, x):
        """Frames (N, C, H, W) in [-1, 1] -> each pixel's nearest colour line (N, H, W) and its place f on it in
        [0, 1] (N, H, W). Exact for ToyWorld's frames: decoding the code gives them back up to rounding."""
        px = x.float().permute(0, 2, 3, 1)[..., None, :]                       # (N, H, W, 1, 3)
        d = self.ends - self.starts                                            # (K, 3)
        f = (((px - self.starts) * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-12)).clamp(0, 1)   # (N, H, W, K)
        dist = (px - (self.starts + f[..., None] * d)).norm(dim=-1)
        line = dist.argmin(-1)
        return line, f.gather(-1, line[..., None])[..., 0]

    def colour(self, line, f):
        """Colour lines (N, H, W) and places on them (N, H, W) -> frames (N, 3, H, W) in [-1, 1]."""
        return (self.starts[line] + f[..., None] * (self.ends - self.starts)[line]).permute(0, 3, 1, 2)

    def _frames(self, x, fn):
        """Apply fn to frames of x (..., C, H, W), any leading dims."""
        lead = x.shape[:-3]
        y = fn(x.reshape(-1, *x.shape[-3:]))
        return y.reshape(*lead, *y.shape[1:])

    def encode(self, x):
        """Frames (..., C, H, W) in [-1, 1] -> normalised latents (..., latent, h, w) (the posterior mean)."""
        mu = self._frames(x, lambda f: self.encoder(f)[0])
        return (mu - self.shift[:, None, None]) / self.scale[:, None, None]

    def decode(self, z):
        """Normalised latents (..., latent, h, w) -> frames (..., C, H, W), about [-1, 1] (exact world colours for a
        colour decoder: each pixel takes its most likely one)."""
        return self._frames(z * self.scale[:, None, None] + self.shift[:, None, None], self._draw)

    def _draw(self, z):
        y = self.decoder(z)
        if not self.cfg.colours:
            return y
        return self.colour(y[:, :-1].argmax(1), y[:, -1].float().sigmoid())   # the most likely line, its place

    @torch.no_grad()
    def calibrate(self, x):
        """Set shift/scale from the posterior means of frames x (N, C, H, W)."""
        mu = self.encoder(x)[0]
        self.shift.copy_(mu.mean((0, 2, 3)))
        self.scale.copy_(mu.std((0, 2, 3)))


def vae_state(vae: VAE) -> dict:
    """What load_vae reads: config and weights (also stored inside every latent DiT checkpoint)."""
    return {"config": asdict(vae.cfg), "state": {k: v.cpu() for k, v in vae.state_dict().items()}}


def save_vae(path, vae: VAE, extra=None):
    tmp = path + ".tmp"
    torch.save({**vae_state(vae), **(extra or {})}, tmp)
    os.replace(tmp, path)


def load_vae(state: dict) -> VAE:
    """A VAE from the dict save_vae writes (also stored inside latent DiT checkpoints)."""
    vae = VAE(VAEConfig(**state["config"]))
    vae.load_state_dict(state["state"])
    return vae.eval().requires_grad_(False)


def read_vae(path: str, prog: str) -> VAE:
    """The VAE in a vae.pt or in a latent model's checkpoint; one error line (prog: the command) if there is none."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return load_vae(state["vae"] if "vae" in state else state)
    except Exception as e:
        raise SystemExit(f"{prog}: error: cannot read a frame VAE from {path}: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------------------
# training on ToyWorld frames

@dataclass
class VAETraining:
    steps: int = 4000
    batch: int = 32
    lr: float = 2e-3       # cosine decay to 0 over the steps, after a 100-step warm-up
    seed: int = 0
    size: int = 32         # ToyWorld frame size
    save_every: int = 250  # steps between resumable checkpoints


def frames_batch(rng, n, size=32):
    """n random ToyWorld frames as float (n, 3, size, size): random worlds at random times."""
    x, _ = sample_clips(rng, n, 1, WorldConfig(size=size))
    return torch.from_numpy(x[:, 0])


@torch.no_grad()
def report(vae, x):
    """PSNR (dB, on uint8 pixels) and palette fidelity (metrics.py's definition) of reconstructions of x."""
    y = vae.decode(vae.encode(x)).clamp(-1, 1)
    a, b = to_uint8(x.numpy()), to_uint8(y.numpy())
    mse = ((a.astype(np.float64) - b) ** 2).mean()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-10)), float(palette_fidelity(classify(b)).mean())


def colour_decoder(vae: VAE) -> VAE:
    """A VAE with vae's encoder and latent statistics (the same latent space, so a DiT trained on it is unchanged)
    and a colour decoder, started from vae's decoder but for its head. Only the decoder is trainable."""
    assert not vae.cfg.colours, "this VAE already has a colour decoder"
    new = VAE(VAEConfig(**{**asdict(vae.cfg), "colours": True}))
    head = f"decoder.net.{len(new.decoder.net) - 1}."
    new.load_state_dict({k: v for k, v in vae.state_dict().items() if not k.startswith(head)}, strict=False)
    new.requires_grad_(False)
    new.decoder.requires_grad_(True)
    return new.train()


def train_vae(out: str, cfg: VAEConfig = VAEConfig(), tc: VAETraining = VAETraining(), log=print,
              init: VAE | None = None) -> VAE:
    """Train a VAE into out/vae.pt and return it; resumes from out/vae_ckpt.pt, and returns out/vae.pt if done.
    With init (an RGB VAE), train only a colour decoder for init's frozen encoder instead (cfg is then init's).

    Frames are drawn from batch seeds [seed, step], so a resumed run sees what an uninterrupted one would.
    Runs under bf16 autocast on the CPU (about 2x faster than fp32 with AVX-512; on CUDA, bf16 too).
    """
    final, ckpt_path = os.path.join(out, "vae.pt"), os.path.join(out, "vae_ckpt.pt")
    if os.path.exists(final):
        return load_vae(torch.load(final, weights_only=True))
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(tc.seed)
    vae = VAE(cfg) if init is None else colour_decoder(init)
    opt = torch.optim.AdamW([q for q in vae.parameters() if q.requires_grad], lr=tc.lr, weight_decay=0.0)
    step = 0
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=True)
        vae.load_state_dict(state["state"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        log(f"vae: resumed at step {step}")
    val = frames_batch(np.random.default_rng([tc.seed, 2**32 - 1]), 256, tc.size)
    t0, start = time.time(), step
    while step < tc.steps:
        for g in opt.param_groups:
            g["lr"] = tc.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / tc.steps))
        x = frames_batch(np.random.default_rng([tc.seed, step]), tc.batch, tc.size)
        with torch.autocast("cpu", torch.bfloat16):
            loss, rec, kl = vae.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % tc.save_every == 0 or step == tc.steps:
            tmp = ckpt_path + ".tmp"
            torch.save({"state": vae.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                        "step": step}, tmp)
            os.replace(tmp, ckpt_path)
            if init is None:
                vae.calibrate(val)   # only the statistics buffers: training does not read them
            psnr, fid = report(vae, val)
            per_step = (time.time() - t0) / (step - start)
            log(f"vae step {step:5d}/{tc.steps} | rec {rec.item():.4f} | kl {kl.item():.2f} | val {psnr:.2f} dB, "
                f"palette fidelity {fid:.3f} | {per_step:.2f} s/step | eta {per_step * (tc.steps - step) / 60:.1f} min")
    if init is None:   # a colour decoder keeps init's statistics: they define the latents a DiT was trained on
        vae.calibrate(val)
    save_vae(final, vae, {"step": step})
    os.remove(ckpt_path)
    return vae.eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description="train the frame VAE on ToyWorld (resumes from --out)")
    p.add_argument("--steps", type=int, default=VAETraining.steps)
    p.add_argument("--batch", type=int, default=VAETraining.batch)
    p.add_argument("--lr", type=float, default=VAETraining.lr)
    p.add_argument("--width", type=int, default=VAEConfig.width)
    p.add_argument("--latent", type=int, default=VAEConfig.latent)
    p.add_argument("--kl", type=float, default=VAEConfig.kl)
    p.add_argument("--colours", action="store_true", help="a colour decoder: each pixel on one of data.colour_lines()")
    p.add_argument("--encoder", default=None, metavar="PATH", help="with --colours: keep the encoder and latent "
                   "statistics of the RGB VAE in PATH (a vae.pt or a latent model) frozen and train only the decoder")
    p.add_argument("--out", default="runs/vae")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.steps, args.batch, args.width, args.latent) < 1 or args.lr <= 0 or args.kl < 0:
        raise SystemExit("vae.py: error: --steps, --batch, --width, --latent and --lr must be positive, --kl >= 0")
    init = None
    if args.encoder:
        if not args.colours:
            raise SystemExit("vae.py: error: --encoder trains a colour decoder for that encoder: add --colours")
        init = read_vae(args.encoder, "vae.py")
        if init.cfg.colours:
            raise SystemExit(f"vae.py: error: the VAE in {args.encoder} already has a colour decoder")
    t0 = time.time()
    vae = train_vae(args.out, VAEConfig(latent=args.latent, width=args.width, kl=args.kl, colours=args.colours),
                    VAETraining(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed), init=init)
    psnr, fid = report(vae, frames_batch(np.random.default_rng([args.seed, 2**32 - 2]), 256))
    print(f"{os.path.join(args.out, 'vae.pt')}: held-out PSNR {psnr:.2f} dB, palette fidelity {fid:.3f} "
          f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
