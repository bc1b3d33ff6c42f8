"""
The training loop of train.py: one method, one model, from batches of clips to checkpoints. train(args) builds
what the method needs (the frame VAE of a latent preset; the frozen teacher of the ODE stage; DMD's score and
critic; Context Forcing's error bank), then steps: a loss, a clipped AdamW step at the recipe's learning rate
(recipe.py), an EMA of the weights. train.py's command line fills args and trains any earlier stage first.

A run directory gets ckpt_<step>.pt checkpoints (plain dicts, written atomically), and at the end model.pt (the
EMA weights in fp16 with what sampling needs: the file to ship) and samples.png, a strip of frames streamed from
it; args.json (the run's settings, also stored in every checkpoint) and log.jsonl (one line of loss, gradient
norm, learning rate and timing per --log-every steps). --resume continues from the latest checkpoint, and only
the same run: it refuses changed settings. One run directory has one writer at a time (a lock). On CUDA the model
runs under bf16 autocast with FlexAttention block masks; on CPU with SDPA, in fp32 or (the --cpu preset) under
bf16 autocast, about 1.7x faster there. Under torchrun each rank draws its own noise and its own clips.
"""

import copy
import functools
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import (check_resume, export_model, latest_checkpoint, load_checkpoint, lock_run_directory,
                        model_from_checkpoint, prune_checkpoints, restore_rng, rng_states, save_checkpoint)
from context import CONTEXT, CONTEXT_TEACHER, ContextConfig, ContextDistiller, ErrorBank, context_memory, \
    context_teacher_loss
from data import ToyWorld, WorldConfig, sample_clips, to_uint8, tokenize
from distill import BETAS, ODE, DMDConfig, Distiller, few_step_levels, ode_loss
from flow import SamplerConfig, euler_sigmas
from forcing import (LOSSES, METHODS, ResamplingConfig, first_chunk_step, object_weight, resampling_loss,
                     single_chunks, teacher_loss)
from memory import MemoryConfig
from model import DiT, DiTConfig, pick_device
from recipe import CONTEXT_RECIPE, DMD, GRAD_CLIP, RECIPE, WEIGHT_DECAY, bf16, clip_config, learning_rate
from rollout import rollout
from vae import VAEConfig, VAETraining, load_vae, read_vae, train_vae, vae_state
from videos import VideoFolder


# flags added after runs were stored (the shipped default among them): at this value a run is what it was before
# the flag existed, so its settings leave the flag out and such runs still resume and still match their preset
LATER_FLAGS = {"event_clips": 0.0, "score_guidance": DMDConfig.guidance, "dim": None, "depth": None, "patch": None,
               "resample_share": 1.0, "levels": None}


def settings(args) -> dict:
    """What defines a run: every flag that changes the trained weights (not where or how often it reports)."""
    skip = ("out", "resume", "init", "vae", "base", "ode_steps", "log_every", "save_every", "workers", "device",
            "preset_note", "stages")
    return {k: v for k, v in sorted(vars(args).items())
            if k not in skip and not (k in LATER_FLAGS and v == LATER_FLAGS[k])}


# ---- data ------------------------------------------------------------------------------------------------
class Clips(torch.utils.data.IterableDataset):
    """An endless stream of (video, prompt tokens) training batches, from ToyWorld or a video folder."""

    def __init__(self, cfg: DiTConfig, batch: int, seed: int, folder: VideoFolder | None, start: int,
                 pixels: int | None, frames: int, events: float = 0.0):
        """pixels: the frame size to render (a latent model's frames are encoded later); None: random latents.
        frames: the clip length. events > 0: ToyWorld clips with a caption per frame, tokens (B, F, T), that share
        of them across a scene event (data.sample_clips)."""
        self.cfg, self.batch, self.seed, self.folder, self.start, self.pixels = cfg, batch, seed, folder, start, pixels
        self.frames, self.events = frames, events

    def __iter__(self):
        # batch i is drawn from its own seed [seed, i], and worker w of n makes batches w, w+n, ... which the
        # loader returns in order: the stream is the same for any number of workers and after --resume
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        c = self.cfg
        latents = self.pixels is None   # the Wan shape: no VAE for it here, so random latents (speed, memory only)
        world = None if latents else WorldConfig(size=self.pixels)
        for i in range(self.start + w, 2**62, n):
            rng = np.random.default_rng([self.seed, i])
            if self.folder is not None:
                x, captions = self.folder.sample(rng, self.batch)
            elif latents:
                x = rng.standard_normal((self.batch, self.frames, c.channels, c.height, c.width), dtype=np.float32)
                captions = [""] * self.batch
            else:
                x, captions = sample_clips(rng, self.batch, self.frames, world, self.events or None, c.chunk)
            if self.events:   # a caption per frame
                tokens = np.stack([tokenize(clip, c.text_len) for clip in captions])   # (B, F, T)
            else:
                tokens = tokenize(captions, c.text_len)   # (B, T)
            yield torch.from_numpy(x), torch.from_numpy(tokens)


def batches(cfg, batch, seed, folder, workers, start, pixels, frames, events=0.0):
    # its own generator: the loader must not draw from the global RNG that the losses' noise comes from
    clips = Clips(cfg, batch, seed, folder, start, pixels, frames, events)
    loader = torch.utils.data.DataLoader(clips, batch_size=None, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                         generator=torch.Generator())
    return iter(loader)


# ---- the sample strip --------------------------------------------------------------------------------------
@torch.no_grad()
def sample_strip(model, path, sampler: SamplerConfig, vae=None, seconds=2.0, prompts=2, seed=0):
    """Stream a few seconds per prompt and save one row of frames per prompt as a PNG."""
    import imageio.v3 as iio

    cfg, device = model.cfg, next(model.parameters()).device
    world = WorldConfig(size=cfg.height * (vae.factor if vae else 1))
    captions = [ToyWorld(seed + i, world).caption(0) for i in range(prompts)]
    tokens = torch.from_numpy(tokenize(captions, cfg.text_len)).to(device)
    n = int(seconds * world.fps)
    memory = MemoryConfig(policy="sink", window=cfg.frames - cfg.chunk - cfg.chunk, sink=cfg.chunk)
    g = torch.Generator(device).manual_seed(seed)
    video = torch.cat(list(rollout(model, tokens, n, memory, sampler, g)), 1)[:, :n]
    video = video[:, ::max(1, n // 16)].float()
    frames = to_uint8((vae.decode(video) if vae else video).cpu().numpy())        # (P, 16, H, W, 3)
    rows = [np.concatenate(list(f), axis=1) for f in frames]
    iio.imwrite(path + ".tmp", np.concatenate(rows, axis=0).repeat(2, 0).repeat(2, 1), extension=".png")
    os.replace(path + ".tmp", path)


def distilled_vae(student: dict, score: dict):
    """The frame VAE a distillation runs in: the student's, which the score must share (None for pixel models)."""
    if ("vae" in student) != ("vae" in score):
        raise SystemExit("train.py: error: --score and the student do not model the same frames (one is latent)")
    if "vae" not in student:
        return None
    # the encoder and its statistics define the latent space; the decoders may differ (RGB or colour)
    a, b = ({k: v for k, v in m["vae"]["state"].items() if k.startswith("encoder.") or k in ("shift", "scale")}
            for m in (student, score))
    if a.keys() != b.keys() or any(not torch.allclose(a[k].float(), b[k].float(), atol=1e-2) for k in a):
        raise SystemExit("train.py: error: --score and the student were trained on the latents of different VAEs")
    return load_vae(student["vae"])


def frame_vae(args, steps: int, colour_steps: int, ddp: bool, init: dict | None):
    """The frame VAE of a latent preset: --vae, the --init model's (or, resuming, the run's own), or the one this run
    trained into OUT/vae, with its colour decoder from OUT/vae-colours if the preset has one (trained now if
    missing)."""
    found = init if init is not None else load_checkpoint(latest_checkpoint(args.out)) if args.resume and \
        latest_checkpoint(args.out) else None
    if not args.vae and found is not None and "vae" in found:
        return load_vae(found["vae"])
    if args.vae:
        return read_vae(args.vae, "train.py")   # a vae.pt, or a latent model's checkpoint
    if ddp:
        raise SystemExit("train.py: error: train the frame VAE first (python vae.py --out runs/vae) and pass --vae")
    log = lambda line: print(line, flush=True)
    print(f"stage 1: the frame VAE ({steps} steps), into {os.path.join(args.out, 'vae')}", flush=True)
    vae = train_vae(os.path.join(args.out, "vae"), VAEConfig(), VAETraining(steps=steps, seed=args.seed), log=log)
    if not colour_steps or args.data:   # a colour decoder draws only ToyWorld's colours: not for --data videos
        return vae
    out = os.path.join(args.out, "vae-colours")
    print(f"stage 1b: its colour decoder ({colour_steps} steps, the encoder frozen), into {out}", flush=True)
    return train_vae(out, vae.cfg, VAETraining(steps=colour_steps, seed=args.seed), log=log, init=vae)


def gather(obj, ddp: bool) -> list:
    if not ddp:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """Each rank its own noise stream (sigma, eps, t_s, prompt dropout); weights are drawn before, from `seed`."""
    return int(np.random.SeedSequence([seed, rank, 1]).generate_state(1)[0])


def processes(args):
    """(device, rank, world size, ddp): one process, or this one's place among torchrun's."""
    device = pick_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device, 0, 1, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size(), True


def ode_teacher(args, cfg: DiTConfig, init: dict | None, device, shift: float):
    """--method ode: the loss that regresses the causal teacher's guided ODE, the teacher's VAE (None for a pixel
    model) and the student's few-step levels. The teacher is --init, kept in the run directory so that --resume
    regresses the same one; the ODE runs its own Euler steps, rounded to a multiple of the few-step levels."""
    if init is not None:
        export_model(os.path.join(args.out, "teacher.pt"), init)
    ckpt = load_checkpoint(os.path.join(args.out, "teacher.pt"))
    teacher = model_from_checkpoint(ckpt).float().to(device).eval().requires_grad_(False)
    vae = load_vae(ckpt["vae"]).to(device) if "vae" in ckpt else None
    levels = few_step_levels("self", cfg, args.levels)
    every = max(1, round(ckpt["sampler"]["steps"] / len(levels)))
    step = functools.partial(ode_loss, teacher=teacher, grid=euler_sigmas(every * len(levels), shift), every=every,
                             guidance=ckpt["sampler"]["cfg"])
    return step, vae, levels


def finish(args, ema, few: list | None, shift: float, vae, streams: bool):
    """Export model.pt from the last checkpoint and, for a model that streams, stream samples.png from the EMA."""
    final = latest_checkpoint(args.out)
    export_model(os.path.join(args.out, "model.pt"), load_checkpoint(final))
    print(f"wrote {os.path.join(args.out, 'model.pt')} (the EMA weights of {final} in fp16, for sampling)")
    if not streams:   # a clip model (bidirectional), or random latents with nothing to decode
        return
    path = os.path.join(args.out, "samples.png")
    print(f"streaming {path} from the EMA model ...", flush=True)
    sample_strip(ema.eval(), path, SamplerConfig(kind="few" if few else "euler", shift=shift,
                                                 clip=None if vae else 1.0, **({"levels": few} if few else {})), vae)
    print(f"wrote {path}")


# ---- training ----------------------------------------------------------------------------------------------
def train(args, init: dict | None = None):
    """Train and return the (unwrapped) model. Works alone or as one rank of torchrun. init: check(args)'s."""
    assert (init is None) == (not args.init), "pass the --init checkpoint that check(args) loaded"
    device, rank, world_size, ddp = processes(args)
    master = rank == 0
    if args.batch % world_size:
        raise SystemExit(f"train.py: error: --batch {args.batch} must divide by the {world_size} processes")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    lock = lock_run_directory(args.out) if master else None

    cfg = clip_config(args)
    cfg.topk, cfg.route_sink = args.topk, args.route_sink
    recipe = RECIPE[args.preset]
    vae, distilling, ode = None, args.method in DMD, args.method == ODE
    ctx = ContextConfig(clip=CONTEXT_RECIPE[args.preset]["clip"], long=CONTEXT_RECIPE[args.preset]["long"])
    frames = ctx.clip if args.method == CONTEXT_TEACHER else cfg.frames   # the teacher trains on long clips
    if ode:
        ode_step, vae, levels = ode_teacher(args, cfg, init, device, recipe["shift"])
    elif distilling:   # the student's latent space is its own: the VAE comes with the model being distilled
        score_ckpt = load_checkpoint(args.score)
        vae = distilled_vae(init if init is not None else load_checkpoint(latest_checkpoint(args.out)), score_ckpt)
        vae = vae.to(device) if vae else None
    elif args.vae or recipe["vae_steps"]:   # a latent model: its frame VAE first (trained here unless given)
        vae = frame_vae(args, recipe["vae_steps"], recipe["colour_steps"], ddp, init).to(device)
        if vae.cfg.latent != cfg.channels:
            raise SystemExit(f"train.py: error: the VAE has {vae.cfg.latent} latent channels, --{args.preset} "
                             f"models {cfg.channels}")
    pixels = cfg.height * vae.factor if vae else (cfg.height if cfg.channels == 3 else None)
    if args.data and pixels is None:
        raise SystemExit(f"train.py: error: --data needs an RGB or VAE model; --{args.preset} models random latents")
    folder = VideoFolder(args.data, size=pixels, frames=frames) if args.data else None
    torch.manual_seed(args.seed)   # identical initial weights on every rank
    model = DiT(cfg).to(device)
    if init is not None:
        model.load_state_dict(init["ema"])
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=BETAS if distilling else (0.9, 0.99),
                            weight_decay=WEIGHT_DECAY)
    distiller = None
    if distilling:   # the critic starts as the score: the closest model to the student's samples there is
        score, critic = (model_from_checkpoint(score_ckpt).float().to(device) for _ in range(2))
        dmd = DMDConfig(levels=few_step_levels(args.method, cfg, args.levels), shift=recipe["shift"],
                        guidance=args.score_guidance)
        distiller = ContextDistiller(score, critic, dmd, args.lr, ctx) if args.method == CONTEXT else \
            Distiller(args.method, score, critic, dmd, args.lr)
    bank = ErrorBank(ctx) if args.method == CONTEXT_TEACHER else None   # the teacher's error recycling
    torch.manual_seed(rank_seed(args.seed, rank))   # from here on, the noise of the losses: its own per rank
    step = 0
    if args.resume and latest_checkpoint(args.out):   # (a run stopped in stage 1 has none yet: the DiT starts)
        ckpt = load_checkpoint(latest_checkpoint(args.out))
        check_resume(ckpt, args.method, cfg, settings(args), args.steps, world_size)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        if distiller:
            distiller.load_state_dict(ckpt)
        if bank:
            bank.load_state_dict(ckpt["bank"])
        restore_rng(ckpt["rng"][rank], device)
        step = ckpt["step"]
        if master:
            print(f"resumed from {ckpt['path']} at step {step}")
    net = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None) if ddp else model
    net.cfg = cfg   # the losses read the chunk size from model.cfg, also through the DDP wrapper
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)
    data = batches(cfg, args.batch // world_size, args.seed * 1000 + rank, folder, workers, step, pixels, frames,
                   args.event_clips)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=bf16(args.preset, device.type))
    few = distiller.cfg.levels if distilling else levels if ode else None   # a few-step model's levels
    sampler = dict(steps=len(few), cfg=1.0) if few else recipe["sampler"]
    extra = {"shift": recipe["shift"], "sampler": sampler, "args": settings(args)}
    if vae:
        extra["vae"] = vae_state(vae)
    weighted = args.object_weight != 1 and args.method in METHODS
    loss_fn = LOSSES.get(args.method)
    if args.method == "resampling":
        rs = ResamplingConfig(args.resample_mode, args.resample_shift, args.resample_steps, args.resample_warmup,
                              args.resample_share)
        loss_fn = functools.partial(resampling_loss, cfg=rs, resampler=model)
    if master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(settings(args), f, indent=1)
        n = sum(p.numel() for p in model.parameters())
        stage = "stage 2: " if vae and init is None and args.method in METHODS else ""   # (stage 1 made the VAE)
        print(stage + f"{args.method} | {args.preset} {n / 1e6:.2f}M params | {cfg.frames} frames x "
              f"{cfg.tokens_per_frame} tokens | batch {args.batch} on {world_size} x {device.type} | out {args.out}")
        log = open(os.path.join(args.out, "log.jsonl"), "a")

    t0, seen, losses, critic_losses, start = time.time(), 0, [], [], time.time()
    while step < args.steps:
        lr = learning_rate(args, step)
        for group in opt.param_groups:
            group["lr"] = lr
        x, tokens = (t.to(device, non_blocking=True) for t in next(data))
        if distilling:   # data-free: the clips' captions are all DMD reads
            distiller.progress = step / args.steps   # (Context Forcing's curriculum)
            critic_losses.append(distiller.train_critic(model, tokens, lr, GRAD_CLIP, amp))
            with amp:
                loss = distiller.student_loss(model, tokens)
        else:
            weight = object_weight(x, args.object_weight, vae.factor if vae else 1) if weighted else None
            with amp:
                if vae:
                    with torch.no_grad():
                        x = vae.encode(x).float()   # (B, F, latent, h, w)
                warming_up = args.method == "resampling" and step < rs.warmup   # teacher forcing first
                if first_chunk_step(args.first_chunks, step):   # (B, F, ...) -> (B * F / chunk, chunk, ...)
                    x, tokens, weight = single_chunks(x, tokens, weight, cfg.chunk)
                    warming_up = True   # nothing to resample: a single chunk has no history
                if ode:
                    loss = ode_step(net, x, tokens)
                elif bank is not None:
                    loss = context_teacher_loss(net, x, tokens, recipe["shift"], context_memory(cfg), bank)
                else:
                    loss = (teacher_loss if warming_up else loss_fn)(net, x, tokens, recipe["shift"], weight=weight,
                                                                     logit_normal=args.logit_normal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        step += 1
        seen += x.shape[0] * x.shape[1] * world_size
        losses.append(loss.item())
        if master and (step % args.log_every == 0 or step == args.steps):
            dt = time.time() - t0
            eta = dt / len(losses) * (args.steps - step)
            critic = f" | critic {np.mean(critic_losses):.4f}" if distilling else ""
            print(f"step {step:6d}/{args.steps} | loss {np.mean(losses):.4f}{critic} | grad {gnorm:.3f} | lr {lr:.2e} | "
                  f"{dt / len(losses):.3f} s/step | {seen / dt:.0f} frames/s | eta {eta / 60:.1f} min", flush=True)
            log.write(json.dumps({"step": step, "loss": float(np.mean(losses)), "grad": float(gnorm), "lr": lr,
                                  "s_per_step": dt / len(losses), "wall_s": time.time() - start,
                                  **({"critic": float(np.mean(critic_losses))} if distilling else {})}) + "\n")
            log.flush()
            t0, seen, losses, critic_losses = time.time(), 0, [], []
        if step % args.save_every == 0 or step == args.steps:
            rng = gather(rng_states(device), ddp)   # the noise of the losses, per rank
            if master:
                save_checkpoint(os.path.join(args.out, f"ckpt_{step:07d}.pt"), model, ema, opt, args.method, step,
                                {**extra, "rng": rng, **(distiller.state_dict() if distilling else {}),
                                 **({"bank": bank.state_dict()} if bank else {})})
                prune_checkpoints(args.out)
    if master:
        finish(args, ema, few, recipe["shift"], vae, streams=args.method != "bidirectional" and pixels is not None)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return model
