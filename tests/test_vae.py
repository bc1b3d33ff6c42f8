"""The frame VAE: it learns, its latents are normalised, it round-trips through checkpoints, and it resumes exactly;
the colour decoder draws only world colours and leaves the encoder and latents as they were."""

import numpy as np
import torch

from data import ToyWorld, WorldConfig, to_float, to_uint8
from vae import VAE, VAEConfig, VAETraining, colour_decoder, frames_batch, load_vae, train_vae, vae_state


def fit(vae, x, steps):
    """Train vae's trainable weights on the one batch x; returns the reconstruction loss before and after."""
    opt = torch.optim.AdamW([q for q in vae.parameters() if q.requires_grad], lr=2e-3)
    first = vae.loss(x)[1].item()
    for _ in range(steps):
        loss = vae.loss(x)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, vae.loss(x)[1].item()


def test_loss_falls_and_latents_have_the_dit_shape():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(width=16))
    x = frames_batch(np.random.default_rng(0), 8)
    first, last = fit(vae, x, 60)
    assert last < 0.5 * first
    z = vae.encode(x[None])                               # any leading dims: (1, 8, 3, 32, 32) -> (1, 8, 4, 8, 8)
    assert z.shape == (1, 8, 4, 8, 8) and vae.decode(z).shape == (1, 8, 3, 32, 32)
    vae.calibrate(x)                                      # the DiT sees each channel at zero mean, unit spread
    z = vae.encode(x).transpose(0, 1).flatten(1)
    assert torch.allclose(z.mean(1), torch.zeros(4), atol=1e-4) and torch.allclose(z.std(1), torch.ones(4), atol=1e-4)
    again = load_vae(vae_state(vae))                     # as stored inside a latent DiT checkpoint
    assert torch.equal(again.decode(again.encode(x)), vae.decode(vae.encode(x)))


def test_training_resumes_exactly(tmp_path):
    cfg, tc = VAEConfig(width=8), VAETraining(steps=4, batch=2, save_every=2)
    straight = train_vae(str(tmp_path / "a"), cfg, tc, log=lambda line: None)

    def killed_at_step_2(line):   # the step-2 checkpoint is written before this line is logged
        raise KeyboardInterrupt

    try:
        train_vae(str(tmp_path / "b"), cfg, tc, log=killed_at_step_2)
    except KeyboardInterrupt:
        pass
    assert (tmp_path / "b" / "vae_ckpt.pt").exists() and not (tmp_path / "b" / "vae.pt").exists()
    lines = []
    resumed = train_vae(str(tmp_path / "b"), cfg, tc, log=lines.append)
    assert lines[0] == "vae: resumed at step 2" and not (tmp_path / "b" / "vae_ckpt.pt").exists()
    for name, t in straight.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


def test_the_colour_code_gives_back_every_toyworld_frame():
    """Every pixel ToyWorld draws, at any size and in every mode, is on one of data.colour_lines(): coding a frame
    as (line, place) and drawing the code gives the frame back up to rounding (1 unit of 255)."""
    vae = VAE(VAEConfig(colours=True))
    for seed, cfg in enumerate([WorldConfig(), WorldConfig(size=64), WorldConfig(deterministic=True),
                                WorldConfig(size=48, world_width=3.0)] * 3):
        frames = ToyWorld(seed, cfg).render(0, 900)[::15]
        line, f = vae.colour_code(torch.from_numpy(to_float(frames)))
        back = to_uint8(vae.colour(line, f).numpy())
        assert np.abs(back.astype(int) - frames).max() <= 1, seed
    # a colour off every line is coded to the nearest line, and drawn there, not as itself
    off = torch.full((1, 3, 1, 1), 0.9)                   # (242, 242, 242): near white (250, 250, 250)
    assert to_uint8(vae.colour(*vae.colour_code(off)).numpy()).tolist() == [[[[250, 250, 250]]]]


def test_a_colour_decoder_learns_for_a_frozen_encoder_and_draws_only_world_colours():
    torch.manual_seed(0)
    rgb = VAE(VAEConfig(width=8))
    x = frames_batch(np.random.default_rng(0), 8)
    fit(rgb, x, 60)                                       # an encoder whose latents say something about the frames
    rgb.calibrate(x)
    vae = colour_decoder(rgb)
    assert torch.equal(vae.encode(x), rgb.encode(x))     # the same latent space: a DiT trained on rgb's is unchanged
    assert all(not q.requires_grad for q in vae.encoder.parameters())
    first, last = fit(vae, x, 100)                        # only the decoder learns
    assert last < 0.5 * first
    assert torch.equal(vae.encode(x), rgb.encode(x))
    drawn = vae.decode(torch.randn(4, 4, 8, 8) * 3)     # any latent, even one far from the data: world colours
    line, f = vae.colour_code(drawn)
    assert torch.allclose(vae.colour(line, f), drawn, atol=1e-5)


def test_a_colour_decoder_trains_and_stores_like_a_vae(tmp_path):
    rgb = VAE(VAEConfig(width=8))
    rgb.calibrate(frames_batch(np.random.default_rng(0), 8))
    vae = train_vae(str(tmp_path), rgb.cfg, VAETraining(steps=3, batch=2, save_every=2), log=lambda line: None,
                    init=rgb)
    again = load_vae(torch.load(tmp_path / "vae.pt", weights_only=True))
    assert again.cfg.colours and torch.equal(again.shift, rgb.shift) and torch.equal(again.scale, rgb.scale)
    for name, t in rgb.encoder.state_dict().items():
        assert torch.equal(t, again.encoder.state_dict()[name]), name
    old = vae_state(rgb)
    del old["config"]["colours"]                          # a VAE saved before colour decoders existed still loads
    assert not load_vae(old).cfg.colours
