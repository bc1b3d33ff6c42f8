"""The frame VAE: it learns, its latents are normalised, it round-trips through checkpoints, and it resumes exactly."""

import numpy as np
import torch

from vae import VAE, VAEConfig, VAETraining, frames_batch, load_vae, train_vae, vae_state


def test_loss_falls_and_latents_have_the_dit_shape():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(width=16))
    x = frames_batch(np.random.default_rng(0), 8)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    first = vae.loss(x)[1].item()
    for _ in range(60):
        loss = vae.loss(x)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert vae.loss(x)[1].item() < 0.5 * first
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
