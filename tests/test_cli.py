"""The two commands end to end: train -> checkpoint -> resume -> stream to mp4, DDP, and clear errors."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import imageio.v2 as imageio
import pytest
import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line_error(result, *words):
    """Non-zero exit, one error line naming the problem (warnings may come before it), no traceback."""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "error:" in l]
    assert result.returncode != 0
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    r = run("train.py", "--method", "teacher", "--tiny", "--steps", "6", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_train_then_sample_gives_exact_frame_count(trained, tmp_path):
    assert os.path.exists(os.path.join(trained, "ckpt_0000006.pt"))
    assert os.path.exists(os.path.join(trained, "samples.png"))
    out = str(tmp_path / "v.mp4")
    r = run("sample.py", "--ckpt", trained, "--seconds", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert "frames 48" in last and "frames/s" in last and "first chunk" in last and "cache" in last
    reader = imageio.get_reader(out)
    assert sum(1 for _ in reader) == 3 * 16
    assert not any(p.endswith(".part.mp4") for p in os.listdir(tmp_path))


@pytest.mark.parametrize("frames", [None, 12])
def test_init_starts_from_the_checkpoints_ema_weights(trained, tmp_path, frames):
    """Also with --frames: the same weights fine-tuned on longer clips (their trained range becomes the clip's)."""
    sys.path.insert(0, ROOT)
    import train
    from checkpoint import load_checkpoint
    longer = ["--frames", str(frames)] if frames else []
    args = train.parse(["--tiny", "--steps", "1", "--lr", "1e-12", "--warmup", "0", "--init", trained, *longer,
                        "--out", str(tmp_path / "run"), "--device", "cpu"])
    model = train.train(args, train.check(args))
    start = load_checkpoint(trained)
    assert all(torch.allclose(v, start["ema"][k], atol=1e-6) for k, v in model.state_dict().items())
    assert model.cfg.frames == (frames or start["config"]["frames"])
    assert load_checkpoint(str(tmp_path / "run"))["config"]["frames"] == model.cfg.frames


def test_slowfast_memory_streams_the_exact_frame_count(trained, tmp_path):
    out = str(tmp_path / "v.mp4")
    r = run("sample.py", "--ckpt", trained, "--seconds", "2", "--memory", "slowfast", "--promote", "0.05",
            "--shared-noise", "0.25", "--shared-time", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "memory slowfast (promote 0.05)" in r.stdout and sum(1 for _ in imageio.get_reader(out)) == 32
    assert "shared noise 0.25 drifting over 2 s" in r.stdout
    assert "slow memory: promoted" in r.stdout   # how much it kept and how far back it reached


def test_rolling_schedule_streams_the_exact_frame_count(trained, tmp_path):
    out = str(tmp_path / "v.mp4")
    r = run("sample.py", "--ckpt", trained, "--seconds", "1", "--schedule", "rolling", "--sampler", "few", "--steps",
            "2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "few x 2, rolling" in r.stdout and sum(1 for _ in imageio.get_reader(out)) == 16


def test_prompt_switches_in_sample_and_eval(trained, tmp_path):
    out = str(tmp_path / "v.mp4")
    r = run("sample.py", "--ckpt", trained, "--seconds", "2", "--switch", "1:a red circle over navy dots", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "at 1 s: a red circle over navy dots" in r.stdout and sum(1 for _ in imageio.get_reader(out)) == 32
    # eval.py prompts the stream with the world's own events and scores each switch (world 31: one at frame 175)
    r = run("eval.py", "--ckpt", trained, "--world", "31", "--switches", "--seconds", "12", "--steps", "2",
            "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr
    assert "at 11 s:" in r.stdout   # frame 175 -> the next chunk start, 176
    switches = json.load(open(tmp_path / "eval" / "eval.json"))["prompt_switch"]
    assert [s["frame"] for s in switches] == [175]


def test_distillation_trains_resumes_exactly_and_streams_with_its_schedule(trained, tmp_path):
    score = str(tmp_path / "score")
    assert run("train.py", "--method", "bidirectional", "--tiny", "--steps", "2", "--out", score).returncode == 0
    for method, schedule in (("self", "few x 4 |"), ("rolling", "few x 2, rolling")):
        out = str(tmp_path / method)
        flags = ["--method", method, "--tiny", "--steps", "2", "--save-every", "1", "--out", out, "--score",
                 os.path.join(score, "model.pt")]
        r = run("train.py", *flags, "--init", trained, "--ode-steps", "0")   # (the ODE stage: the test below)
        assert r.returncode == 0, r.stderr
        assert "critic" in r.stdout
        last = os.path.join(out, "ckpt_0000002.pt")
        a = torch.load(last, weights_only=True)
        os.remove(last)   # as if killed after step 1: the student, its EMA and the critic continue exactly
        r = run("train.py", *flags, "--resume")
        assert r.returncode == 0, r.stderr
        b = torch.load(last, weights_only=True)
        for part in ("model", "ema", "critic"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (method, part)
        video = str(tmp_path / f"{method}.mp4")
        r = run("sample.py", "--ckpt", out, "--seconds", "1", "--out", video)
        assert r.returncode == 0, r.stderr
        assert schedule in r.stdout and sum(1 for _ in imageio.get_reader(video)) == 16


def test_ode_initialisation_trains_resumes_exactly_and_streams_few_step(trained, tmp_path):
    out = str(tmp_path / "ode")
    flags = ["--method", "ode", "--tiny", "--steps", "2", "--save-every", "1", "--out", out]
    r = run("train.py", *flags, "--init", trained)
    assert r.returncode == 0, r.stderr
    last = os.path.join(out, "ckpt_0000002.pt")
    a = torch.load(last, weights_only=True)
    os.remove(last)   # as if killed after step 1: the teacher comes from the run directory, not from --init
    r = run("train.py", *flags, "--resume")
    assert r.returncode == 0, r.stderr
    b = torch.load(last, weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    video = str(tmp_path / "ode.mp4")
    r = run("sample.py", "--ckpt", out, "--seconds", "1", "--out", video)
    assert r.returncode == 0, r.stderr
    assert "few x 4 |" in r.stdout and sum(1 for _ in imageio.get_reader(video)) == 16
    one_line_error(run("train.py", "--method", "ode", "--tiny", "--out", str(tmp_path / "x")), "name it with --init")


def test_distillation_without_a_score_trains_one_first_and_the_student_from_the_ode_stage(trained, tmp_path,
                                                                                          monkeypatch):
    sys.path.insert(0, ROOT)
    import train
    from model import DiT, DiTConfig
    monkeypatch.setitem(train.SCORE_STEPS, "tiny", 2)   # the budgets, here
    monkeypatch.setitem(train.DISTILL, "tiny", {**train.DISTILL["tiny"], "steps": 2})
    monkeypatch.setitem(train.ODE_STEPS, "tiny", 3)
    started = []   # (method, --init) of every run the command trains, stages included
    real_train = train.train
    monkeypatch.setattr(train, "train", lambda args, init: started.append((args.method, args.init)) or
                        real_train(args, init))
    import trainer
    guidance, real_distiller = [], trainer.Distiller   # the score's guidance DMD is built with
    monkeypatch.setattr(trainer, "Distiller", lambda method, score, critic, dmd, lr: guidance.append(dmd.guidance) or
                        real_distiller(method, score, critic, dmd, lr))
    out = str(tmp_path / "self")
    # across scene events (--event-clips): the score that grades them is trained on them too, the ODE stage is not
    train.main(["--method", "self", "--tiny", "--init", trained, "--out", out, "--log-every", "1",
                "--event-clips", "0.5", "--score-guidance", "2"])
    score_path, ode = (os.path.join(out, part, "model.pt") for part in ("score", "ode"))
    # the score is fine-tuned from the many-step model, the student distilled from that model's ODE stage
    assert started == [("bidirectional", trained), ("ode", trained), ("self", ode)]
    made = {path: torch.load(path, weights_only=True) for path in (score_path, ode, os.path.join(out, "model.pt"))}
    assert [(m["method"], m["step"]) for m in made.values()] == [("bidirectional", 2), ("ode", 3), ("self", 2)]
    assert made[os.path.join(out, "model.pt")]["args"]["score"] == score_path
    assert [m["args"].get("event_clips") for m in made.values()] == [0.5, None, 0.5]
    assert guidance == [2.0] and [m["args"].get("score_guidance") for m in made.values()] == [None, None, 2.0]
    score = made[score_path]
    # a few-step student (the ODE stage's, or one named with --ode-steps 0) is distilled as it is
    for argv in (["--init", ode], ["--init", trained, "--ode-steps", "0"]):
        args = train.parse(["--method", "rolling", "--tiny", "--score", score_path, "--out", "x", *argv])
        assert args.stages == [] and args.init == argv[1]
    # the score is the student fine-tuned: two steps from its weights, not from a fresh initialisation
    init, fresh = train.load_checkpoint(trained)["ema"], DiT(DiTConfig.preset("tiny")).state_dict()
    moved = sum((score["ema"][k].float() - init[k].float()).norm() for k in init)
    assert moved < 0.1 * sum((fresh[k].float() - init[k].float()).norm() for k in init)


def test_the_shipped_score_goes_with_the_shipped_student_only(trained, tmp_path):
    sys.path.insert(0, ROOT)
    import train
    out = str(tmp_path / "run")
    own = os.path.join(out, "score", "model.pt")
    # no --init, or the shipped default named: the shipped score; any other student: its own score, trained first
    for argv, score in (([], train.SCORE_CKPT), (["--init", train.DEFAULT_CKPT], train.SCORE_CKPT),
                        (["--init", trained], own)):
        args = train.parse(["--method", "self", "--cpu", "--out", out, *argv])
        assert args.score == score, argv
    _, where, argv = args.stages[0]
    assert where == os.path.dirname(own) and argv[:2] == ["--method", "bidirectional"] and argv[-2:] == ["--init", trained]


def test_context_forcing_from_a_base_model_with_one_command_then_streams_through_slowfast(trained, tmp_path,
                                                                                          monkeypatch):
    sys.path.insert(0, ROOT)
    import train
    monkeypatch.setitem(train.SCORE_STEPS, "tiny", 2)   # the budgets, here
    monkeypatch.setitem(train.DISTILL, "tiny", {**train.DISTILL["tiny"], "steps": 2})
    monkeypatch.setitem(train.CONTEXT_RECIPE, "tiny", {**train.CONTEXT_RECIPE["tiny"], "teacher_steps": 2, "steps": 2})
    out = str(tmp_path / "context")
    # at two few-step levels (--levels), which reach the stage-1 student too: both stream two calls a chunk
    train.main(["--method", "context", "--tiny", "--base", trained, "--out", out, "--log-every", "1", "--levels", "2"])
    made = {part: torch.load(os.path.join(out, *part, "model.pt"), weights_only=True)["method"]
            for part in [("teacher",), ("self", "score"), ("self",), ()]}
    assert list(made.values()) == ["context-teacher", "bidirectional", "self", "context"]
    args = torch.load(os.path.join(out, "model.pt"), weights_only=True)["args"]
    assert args["score"] == os.path.join(out, "teacher", "model.pt") and args["levels"] == 2
    stage1 = torch.load(os.path.join(out, "self", "model.pt"), weights_only=True)
    assert stage1["args"]["levels"] == 2 and stage1["sampler"]["steps"] == 2
    video = str(tmp_path / "context.mp4")
    r = run("sample.py", "--ckpt", out, "--seconds", "2", "--out", video)
    assert r.returncode == 0, r.stderr
    assert "memory slowfast" in r.stdout and "few x 2 |" in r.stdout and sum(1 for _ in imageio.get_reader(video)) == 32


def test_context_teacher_resumes_exactly_with_its_error_bank(trained, tmp_path):
    out = str(tmp_path / "teacher")
    flags = ["--method", "context-teacher", "--tiny", "--steps", "2", "--save-every", "1", "--out", out]
    assert run("train.py", *flags, "--init", trained).returncode == 0
    last = os.path.join(out, "ckpt_0000002.pt")
    a = torch.load(last, weights_only=True)
    os.remove(last)
    r = run("train.py", *flags, "--resume")
    assert r.returncode == 0, r.stderr
    b = torch.load(last, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["bank"]["rings"], b["bank"]["rings"])) and a["bank"]["rings"][0].numel()
    one_line_error(run("train.py", "--method", "context", "--tiny", "--out", str(tmp_path / "x")),
                   "--method context distils a causal model", "--base")
    one_line_error(run("train.py", "--method", "context", "--tiny", "--init", trained, "--score", trained, "--out",
                       str(tmp_path / "y")), "long-context teacher")


def test_resume_continues_exactly(tmp_path):
    out = str(tmp_path / "run")
    assert run("train.py", "--tiny", "--steps", "8", "--save-every", "4", "--out", out).returncode == 0
    last = os.path.join(out, "ckpt_0000008.pt")
    a = torch.load(last, weights_only=True)
    os.remove(last)   # as if the run had been killed after its step-4 checkpoint
    r = run("train.py", "--tiny", "--steps", "8", "--save-every", "4", "--out", out, "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout and "at step 4" in r.stdout, r.stdout + r.stderr
    b = torch.load(last, weights_only=True)
    assert a["step"] == b["step"] == 8 and a["args"] == b["args"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [e["step"] for e in log] == [8, 8] and all(math.isfinite(e["loss"]) for e in log)
    # the same run only: changed settings, or a run already finished, are refused in one line
    one_line_error(run("train.py", "--tiny", "--steps", "16", "--out", out, "--resume"), "--steps 16", "has 8")
    one_line_error(run("train.py", "--tiny", "--steps", "8", "--lr", "0.1", "--out", out, "--resume"), "--lr")
    one_line_error(run("train.py", "--tiny", "--steps", "16", "--depth", "3", "--out", out, "--resume"),
                   "model size", "depth 2", "needs depth 3")
    one_line_error(run("train.py", "--tiny", "--steps", "8", "--out", out, "--resume"), "already at step 8")


# Bad input, one row each: (command, words the one error line must name). {ckpt} is a trained tiny run, {tmp} a
# fresh folder, {file} a plain file there (so "{file}/x" is a folder that cannot be made, even by root), and
# {out} the output the command names, which must not exist afterwards.
BAD_INPUT = [
    ("train.py --method nonsense --tiny", "unknown --method"),
    ("train.py --method context --tiny", "--init", "--base"),
    ("train.py --method context-teacher --tiny", "--init"),
    ("train.py --method self --tiny", "--init"),
    ("train.py --method teacher --tiny --object-weight 0", "--object-weight"),
    ("train.py --method resampling --tiny --resample-share 0", "--resample-share", "--method teacher"),
    ("train.py --method teacher --tiny --first-chunks 1.5", "--first-chunks"),
    ("train.py --method bidirectional --tiny --first-chunks 0.5", "--first-chunks", "causal"),
    ("train.py --method teacher --tiny --event-clips 1.5", "--event-clips"),
    ("train.py --method context --tiny --event-clips 0.5", "--event-clips", "rolling"),
    ("train.py --method ode --tiny --init {ckpt} --object-weight 5", "--object-weight", "flow-matching"),
    ("train.py --method self --tiny --score {ckpt} --init {ckpt}", "bidirectional"),
    ("train.py --method teacher --tiny --ode-steps 5", "--ode-steps", "self"),
    ("train.py --method teacher --tiny --score-guidance 2", "--score-guidance", "self"),
    ("train.py --method teacher --tiny --levels 2", "--levels", "few-step students"),
    ("train.py --method rolling --tiny --score {ckpt} --init {ckpt} --levels 4", "--levels 4", "rolling window"),
    ("train.py --method self --tiny --score {ckpt} --init {ckpt} --score-guidance -1", "--score-guidance"),
    ("train.py --method self --tiny --score {ckpt} --init {ckpt} --ode-steps -1", "--ode-steps"),
    ("train.py --tiny --topk 7", "--topk 7", "history frames"),
    ("train.py --tiny --route-sink 9", "--route-sink"),
    ("train.py --tiny --frames 5", "--frames", "whole number of chunks"),
    ("train.py --tiny --dim 100", "--dim", "head size 16"),
    ("train.py --method ode --tiny --init {ckpt} --dim 128", "--dim", "fine-tune"),
    ("train.py --tiny --steps 1 --init {ckpt} --dim 128 --out {out}", "--dim", "--init's width"),
    ("train.py --tiny --depth 0", "--depth"),
    ("train.py --tiny --steps 1 --init {ckpt} --depth 3 --out {out}", "--depth", "--init's depth"),
    ("train.py --tiny --patch 3", "--patch", "32x32"),
    ("train.py --method ode --tiny --init {ckpt} --frames 8", "--frames"),
    ("train.py --method ode --tiny --init {ckpt} --logit-normal", "--logit-normal", "flow-matching"),
    ("train.py --tiny --batch 1000000000", "--batch", "GiB"),
    ("train.py --tiny --device tpu", "--device"),
    ("train.py --tiny --device cuda", "no CUDA"),
    ("train.py --small --steps 1 --init {ckpt} --out {out}", "another model size"),
    ("train.py --tiny --steps 1 --resume --init {ckpt} --out {out}", "--resume"),
    ("train.py --cpu --steps 1 --vae {tmp}/missing.pt --out {out}", "--vae"),
    ("train.py --tiny --steps 1 --vae {tmp}/garbage.pt --out {out}", "latent preset"),
    ("sample.py --ckpt {tmp}/missing.pt --out {out}", "not found"),
    ("sample.py --ckpt {tmp}/garbage.pt --out {out}", "not a PyTorch checkpoint"),
    ("sample.py --ckpt {ckpt} --seconds 0 --out {out}", "seconds"),
    ("sample.py --ckpt {ckpt} --seconds 0.01 --out {out}", "no frame"),
    ("sample.py --ckpt {ckpt} --window 0 --out {out}", "window"),
    ("sample.py --ckpt {ckpt} --cfg -1 --out {out}", "--cfg"),
    ("sample.py --ckpt {ckpt} --history-guidance -1 --out {out}", "--history-guidance"),
    ("sample.py --ckpt {ckpt} --history-sigma 2 --out {out}", "--history-sigma"),
    ("sample.py --ckpt {ckpt} --cfg-sigma -0.1 --out {out}", "--cfg-sigma"),
    ("sample.py --ckpt {ckpt} --schedule rolling --sampler few --steps 1 --history-guidance 2 --out {out}",
     "--history-guidance", "chunked"),
    ("sample.py --ckpt {ckpt} --schedule rolling --out {out}", "--sampler few"),
    ("sample.py --ckpt {ckpt} --memory slowfast --tau 2 --out {out}", "tau"),
    ("sample.py --ckpt {ckpt} --memory slowfast --promote 1 --out {out}", "promote", "share"),
    ("sample.py --ckpt {ckpt} --shared-noise 1 --out {out}", "--shared-noise", "share"),
    ("sample.py --ckpt {ckpt} --shared-time 2 --out {out}", "--shared-time", "with --shared-noise"),
    ("sample.py --ckpt {ckpt} --schedule rolling --sampler few --steps 1 --shared-noise 0.2 --out {out}",
     "--shared-noise", "chunked"),
    ("sample.py --ckpt {ckpt} --memory slowfast --slow 9 --out {out}", "slow 9", "exceeds"),
    ("sample.py --ckpt {ckpt} --switch 2 --out {out}", "--switch", "SECONDS:CAPTION"),
    ("sample.py --ckpt {ckpt} --seconds 4 --switch 9:a --out {out}", "--switch", "outside the stream"),
    ("sample.py --ckpt {ckpt} --switch 1:a --switch 1:b --out {out}", "two --switch"),
    ("eval.py {tmp}/v.mp4 --world 0 --switches --out {out}", "--switches"),
    ("sample.py --ckpt {ckpt} --resink --out {out}", "--resink", "--switch"),
    ("sample.py --ckpt {ckpt} --memory window --resink --switch 1:a --out {out}", "--resink", "has none"),
    ("eval.py --ckpt {ckpt} --seconds 2 --resink --out {out}", "--resink", "--switches"),
    ("sample.py --ckpt {ckpt} --no-reencode --out {out}", "--no-reencode", "--switch"),
    ("eval.py --ckpt {ckpt} --seconds 2 --no-reencode --out {out}", "--no-reencode", "--switches"),
    ("eval.py --ckpt {ckpt} --seconds 2 --reencode --out {out}", "--reencode", "--switches"),
    ("sample.py --ckpt {ckpt} --schedule rolling --sampler few --steps 3 --out {out}", "no history", "--steps"),
    ("sample.py --ckpt {ckpt} --topk 9 --out {out}", "--topk"),
    ("sample.py --ckpt {ckpt} --device tpu --out {out}", "--device"),
    ("sample.py --ckpt {ckpt} --device cuda --out {out}", "no CUDA"),
    ("sample.py --ckpt {ckpt} --out {file}/x/v.mp4", "cannot create the output folder"),
    ("eval.py {tmp}/v.mp4 --world 0 --fps 0 --out {out}", "--fps"),
    ("eval.py {tmp}/v.mp4 --world 0 --fps -2 --out {out}", "--fps"),
    ("eval.py --ckpt {ckpt} --seconds 0.01 --out {out}", "no frame"),
    ("eval.py --ckpt {ckpt} --out {file}/x", "cannot create the output folder"),
    ("eval.py --ckpt {ckpt} --prompt red --out {out}", "--prompt"),
    ("compare.py a={tmp}/partial --out {out}", "missing"),
    ("compare.py a={tmp}/partial --out {file}/x/plot.png", "cannot"),
]


@pytest.mark.parametrize("row", BAD_INPUT, ids=lambda row: row[0])
def test_bad_input_gives_one_clear_line(trained, tmp_path, row):
    command, *words = row
    (tmp_path / "file").write_text("")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint" * 100)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "eval.json").write_text('{"frames": 10, "fps": 16, "figures": {}}')
    out = tmp_path / "result"
    args = command.format(ckpt=trained, tmp=tmp_path, file=tmp_path / "file", out=out).split()
    one_line_error(run(*args), *words)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "part" in p and p != "partial"]


def test_unreadable_data_and_missing_default_model(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(b"\x00" * 1000)
    one_line_error(run("train.py", "--tiny", "--steps", "1", "--data", str(videos), "--out", str(tmp_path / "r")),
                   str(videos))
    if not os.path.exists(os.path.join(ROOT, "checkpoints", "default.pt")):   # until a default model is shipped
        one_line_error(run("sample.py", "--seconds", "1"), "train.py", "--cpu")


def test_logit_normal_levels_are_the_presets_default_for_the_flow_matching_methods_only():
    sys.path.insert(0, ROOT)
    import train
    assert train.parse(["--method", "resampling", "--cpu"]).logit_normal
    assert not train.parse(["--method", "resampling", "--cpu", "--no-logit-normal"]).logit_normal
    assert not train.parse(["--method", "teacher", "--tiny"]).logit_normal
    distil = train.parse(["--method", "self", "--cpu"])   # DMD draws its own levels: the preset's must not leak in
    assert not distil.logit_normal
    train.check(distil)   # and the one-command distillation is not refused for a flag it was never given


def test_a_switch_reencodes_unless_told_to_keep_the_old_keys(trained):
    """Unset, the flag must mean LongLive's re-encode (it follows more switches, also for a model trained with
    --event-clips: docs/cpu-recipe.md section 18); --no-reencode keeps the old prompt's keys."""
    sys.path.insert(0, ROOT)
    import argparse
    import sample

    def reencodes(*flags):
        p = argparse.ArgumentParser()
        sample.add_args(p)
        return sample.Stream(p.parse_args(["--ckpt", trained, "--device", "cpu", *flags])).memory.reencode

    assert reencodes() is True and reencodes("--reencode") is True and reencodes("--no-reencode") is False


def test_help_shows_preset_defaults_and_only_the_flags_a_command_takes():
    sys.path.insert(0, ROOT)
    from recipe import PRESETS
    steps = ", ".join(f"{name} {PRESETS[name]['steps']}" for name in ("tiny", "cpu", "small"))
    assert steps in run("train.py", "--help").stdout, steps
    assert "--prompt" not in run("eval.py", "--help").stdout
    assert "--prompt" in run("sample.py", "--help").stdout


def test_unknown_words_are_named_and_the_stream_still_runs(trained, tmp_path):
    r = run("sample.py", "--ckpt", trained, "--seconds", "0.25", "--prompt", "a purple elephant over grey dots",
            "--out", str(tmp_path / "new" / "folder" / "v.mp4"))   # a missing folder is created
    assert r.returncode == 0, r.stderr
    warning = [l for l in r.stderr.splitlines() if "warning:" in l]
    assert len(warning) == 1 and "purple, elephant" in warning[0] and "VOCAB" in warning[0]
    assert (tmp_path / "new" / "folder" / "v.mp4").exists()


def test_one_writer_per_run_directory_and_stale_temporaries_cleaned(tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:   # as a training that is still running holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line_error(run("train.py", "--tiny", "--steps", "1", "--out", str(out)), "another training")
    assert not (out / "ckpt_0000001.pt").exists()
    (out / "ckpt_0000005.pt.tmp").write_bytes(b"")   # left by a run killed mid-write
    r = run("train.py", "--tiny", "--steps", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert not (out / "ckpt_0000005.pt.tmp").exists() and (out / "ckpt_0000001.pt").exists()


def test_no_size_flag_on_a_cpu_trains_the_cpu_recipe_and_says_so(tmp_path):
    from vae import VAEConfig, VAETraining, train_vae

    train_vae(str(tmp_path / "vae"), VAEConfig(width=8), VAETraining(steps=2, batch=2), log=lambda line: None)
    out = tmp_path / "run"
    r = run("train.py", "--method", "resampling", "--steps", "2", "--resample-warmup", "1",
            "--vae", str(tmp_path / "vae" / "vae.pt"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "--cpu" in r.stdout.splitlines()[0]
    shipped = torch.load(out / "model.pt", weights_only=True)   # the file to ship: EMA in fp16, VAE inside
    assert shipped["config"]["channels"] == 4 and "vae" in shipped and "optimizer" not in shipped
    assert all(v.dtype == torch.float16 for v in shipped["ema"].values() if v.is_floating_point())
    v = run("sample.py", "--ckpt", str(out / "model.pt"), "--seconds", "0.25", "--out", str(tmp_path / "v.mp4"))
    assert v.returncode == 0, v.stderr
    frames = [f for f in imageio.get_reader(str(tmp_path / "v.mp4"))]   # list() asks len(): inf
    assert len(frames) == 4 and frames[0].shape == (128, 128, 3)   # decoded 32x32 frames, written 4x


def wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopped_stream_leaves_nothing_and_says_one_line(trained, tmp_path, sig):
    out = tmp_path / "v.mp4"
    p = subprocess.Popen([sys.executable, "sample.py", "--ckpt", trained, "--minutes", "5", "--out", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / ".v.mp4.part").exists())
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), "interrupted")
    assert os.listdir(tmp_path) == []


def test_stopped_training_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "train.py", "--tiny", "--steps", "1000", "--save-every", "1",
                          "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: out.exists() and any(n.startswith("ckpt_") and n.endswith(".pt") for n in os.listdir(out)))
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), "interrupted", "--resume")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def _ddp_worker(rank, world_size, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, ROOT)
    import forcing
    import train

    drawn = []   # the noise levels this rank's losses draw
    chunk_sigma = forcing.chunk_sigma
    forcing.chunk_sigma = lambda *a, **k: drawn.append(chunk_sigma(*a, **k)) or drawn[-1]
    torch.set_num_threads(1)
    args = train.parse(["--method", "teacher", "--tiny", "--steps", "3", "--batch", "4", "--device", "cpu",
                        "--out", os.path.join(out, "run"), "--seed", "1"])
    model = train.train(args)
    torch.save({"weights": model.state_dict(), "sigma": torch.cat(drawn)}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_identical_weights_and_draw_their_own_noise(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "run" / "ckpt_0000003.pt", weights_only=True)
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2   # every rank's generators, for --resume
    assert r0["sigma"].shape == r1["sigma"].shape and not torch.equal(r0["sigma"], r1["sigma"])


def test_first_chunk_steps_cut_clips_into_history_free_chunks():
    from forcing import first_chunk_step, single_chunks
    steps = [s for s in range(400) if first_chunk_step(0.25, s)]
    assert len(steps) == 100 and {b - a for a, b in zip(steps, steps[1:])} == {4}   # evenly spread
    x = torch.arange(2 * 8 * 3.0).reshape(2, 8, 3)   # two clips of 8 frames
    tokens, weight = torch.tensor([[5, 6], [7, 8]]), torch.rand(2, 8, 1)
    cx, ct, cw = single_chunks(x, tokens, weight, 2)
    assert cx.shape == (8, 2, 3) and ct.shape == (8, 2) and cw.shape == (8, 2, 1)
    for i in range(8):   # clip i // 4, its chunk i % 4, with that clip's prompt
        b, c = divmod(i, 4)
        assert torch.equal(cx[i], x[b, 2 * c:2 * c + 2]) and torch.equal(ct[i], tokens[b])
        assert torch.equal(cw[i], weight[b, 2 * c:2 * c + 2])


def test_resampling_trains_end_to_end_on_longer_clips_then_streams(tmp_path):
    """Also a wider and deeper model than the preset's (--dim, --depth, --patch): more heads of the preset's size,
    the MLP at its ratio, one block more, patches twice as wide (a quarter of the tokens a frame)."""
    out = str(tmp_path / "rs")
    r = run("train.py", "--method", "resampling", "--tiny", "--steps", "4", "--resample-warmup", "1", "--topk", "1",
            "--frames", "12", "--dim", "128", "--depth", "3", "--patch", "8", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "12 frames x 16 tokens" in r.stdout   # the clips it trained on, not only the stored config
    ckpt = torch.load(os.path.join(out, "ckpt_0000004.pt"), weights_only=True)
    assert ckpt["method"] == "resampling" and ckpt["config"]["topk"] == 1 and ckpt["config"]["frames"] == 12
    assert (ckpt["config"]["dim"], ckpt["config"]["heads"], ckpt["config"]["ffn"]) == (128, 8, 512)   # tiny: 64, 4, 256
    assert ckpt["args"]["dim"] == 128 and ckpt["ema"]["head.weight"].shape[1] == 128
    assert ckpt["config"]["depth"] == ckpt["args"]["depth"] == 3 and any(k.startswith("blocks.2.") for k in ckpt["ema"])
    assert ckpt["config"]["patch"] == ckpt["args"]["patch"] == 8 and ckpt["ema"]["head.weight"].shape[0] == 8 * 8 * 3
    r = run("train.py", "--method", "resampling", "--tiny", "--steps", "1", "--frames", "12", "--init", out,
            "--out", out + "-ft")
    assert r.returncode == 0, r.stderr   # a fine-tune takes its --init's size
    ft = torch.load(os.path.join(out + "-ft", "ckpt_0000001.pt"), weights_only=True)["config"]
    assert (ft["dim"], ft["depth"], ft["patch"], ft["frames"]) == (128, 3, 8, 12)
    r = run("sample.py", "--ckpt", out, "--seconds", "1", "--topk", "2", "--out", str(tmp_path / "rs.mp4"))
    assert r.returncode == 0 and "top-k 2" in r.stdout, r.stderr
    assert sum(1 for _ in imageio.get_reader(str(tmp_path / "rs.mp4"))) == 16
