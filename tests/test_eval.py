"""Tests for eval.py: ToyWorld's own video scores at the ideal end of every metric, each controlled corruption
moves the metric meant to catch it, the reading of frames (components, shapes) is right, drift summaries are
exact, and the command line scores an mp4 and a checkpoint and refuses bad input with one line."""

import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

import eval as E
import metrics as M
from data import PALETTE, SHAPES, ToyWorld, WorldConfig, backdrop_image, shape_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPS = 16


def run(*args):
    # one thread: the tiny model gains nothing from more, and on a busy machine spinning threads cost 5-10x
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def world_video(seed, size=32, seconds=60, deterministic=False):
    world = ToyWorld(seed, WorldConfig(size=size, deterministic=deterministic))
    return world, world.render(0, seconds * FPS)


def figures(frames, world, tf_start=0):
    return M.evaluate(frames, world, FPS, tf_start)["figures"]


# ---- corruptions: each is meant to be caught by one metric ------------------------------------------------------

def blur(frames):
    """3x3 box blur."""
    H, W = frames.shape[1:3]
    f = np.pad(frames.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return np.round(sum(f[:, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)) / 9).astype(np.uint8)


def colour_shift(frames, rgb=(20, -16, 12)):
    """A colour cast of 28 RGB units: past FIDELITY_TOL, within DETECT_TOL, so objects are still found."""
    return np.clip(frames.astype(int) + rgb, 0, 255).astype(np.uint8)


def noise(frames, sigma=8.0):
    return np.clip(np.round(frames + np.random.default_rng(0).normal(0, sigma, frames.shape)), 0, 255).astype(np.uint8)


def freeze(frames):
    """Repeat the middle frame for the whole second half."""
    out = frames.copy()
    out[len(out) // 2:] = out[len(out) // 2]
    return out


def drop(frames, world, j):
    """Paint object j's pixels with the background behind them."""
    out = frames.copy()
    for t in range(len(out)):
        mask = np.all(out[t] == world.rgb[j], axis=-1)
        out[t][mask] = world.background(t)[mask]
    return out


@pytest.fixture(scope="module")
def seed3():
    world, frames = world_video(3)   # 4 objects, panning camera, occluder, two background events in 60 s
    return world, frames, M.evaluate(frames, world, FPS)


# ---- reading frames ---------------------------------------------------------------------------------------------

def test_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    colour = np.where(rng.uniform(size=(6, 24, 24)) < 0.55, rng.integers(0, 3, size=(6, 24, 24)), -1)
    colour[0] = -1
    colour[0, 2:20, 2] = colour[0, 19, 2:20] = colour[0, 2:20, 19] = colour[0, 2, 5:19] = 1   # a long hook
    colour[0, 2:17, 5] = colour[0, 16, 5:17] = 1
    lab = M.components(colour)
    for n in range(len(colour)):
        expected, seen = -np.ones((24, 24), int), 0
        for y0, x0 in zip(*np.nonzero(colour[n] >= 0)):
            if expected[y0, x0] >= 0:
                continue
            stack, expected[y0, x0] = [(y0, x0)], seen
            while stack:
                y, x = stack.pop()
                for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= v < 24 and 0 <= u < 24 and expected[v, u] < 0 and colour[n, v, u] == colour[n, y, x]:
                        expected[v, u] = seen
                        stack.append((v, u))
            seen += 1
        # the same partition: labels map one to one
        pairs = set(zip(lab[n][colour[n] >= 0].tolist(), expected[colour[n] >= 0].tolist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == seen
        assert (lab[n][colour[n] < 0] == -1).all()
    assert len(np.unique(lab[0][colour[0] >= 0])) == 1   # the hook is one component


def test_every_toyworld_shape_is_recognised():
    background = backdrop_image("checks", "teal", 64, 64)
    for r in range(3, 11):
        frame = np.array(background)
        masks = [shape_mask(s, r) for s in SHAPES]
        for k, (colour, mask) in enumerate(zip(PALETTE, masks)):
            y, x = 2 + r + (k // 2) * 30, 2 + r + (k % 2) * 30
            frame[y - r:y + r + 1, x - r:x + r + 1][mask] = PALETTE[colour]
        det = M.objects(frame[None], M.classify(frame[None]), M.MIN_AREA)
        for k, (colour, mask) in enumerate(zip(PALETTE, masks)):
            c = M.COLOURS.index(colour)
            assert det["present"][0, c] and det["clean"][0, c], (r, SHAPES[k])
            assert det["area"][0, c] == mask.sum() and SHAPES[det["shape"][0, c]] == SHAPES[k], (r, SHAPES[k])
        assert det["present"][0].sum() == len(SHAPES)


# ---- ToyWorld's own video is ideal ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,size,seconds,deterministic", [(3, 32, 60, False), (7, 32, 60, False),
                                                              (6, 64, 30, False), (5, 32, 30, True)])
def test_real_video_scores_ideal(seed, size, seconds, deterministic):
    world, frames = world_video(seed, size, seconds, deterministic)
    assert deterministic or world.occluder is not None   # the hard case: panning camera and occluder
    r = M.evaluate(frames, world, FPS)
    f, curves = r["figures"], r["curves"]
    assert curves["palette_fidelity"].min() >= 0.999
    assert np.nanmax(curves["colour_drift"]) < 1e-9
    assert curves["background_error"].max() < 1.0      # only the rounding of the backdrop's shade and gradient
    assert np.nanmax(curves["flicker"]) == 0           # the pan is undone exactly
    assert f["teleport_rate"] == 0
    assert abs(f["motion_retention"] - 1) < 0.15   # whole-pixel positions: +-1 px per run of steps, ~8% at most
    assert f["gaps_scored"] >= 1 and f["identity_match"] == 1
    assert f["prompt_colour"] == 1 and f["prompt_shape"] == 1   # every object drawn is named, in its shape
    assert all(s["frames_to_match"] == 0 for s in r["prompt_switch"])
    assert len(r["prompt_switch"]) == sum(t < len(frames) for t, _ in world.events)
    # count error against the ground truth: where no object is half hidden, it is the number out of view
    checked = 0
    for t in range(len(frames)):
        visible = [o["visible"] for o in world.state(t)["objects"]]
        if all(v == 0 or v >= 0.5 for v in visible):
            assert curves["count_error"][t] == sum(v == 0 for v in visible), t
            checked += 1
            if all(v >= 0.9 for v in visible):
                assert curves["count_error"][t] == 0
    assert checked > 0.2 * len(frames)
    drift = r["drift"]["palette_fidelity"]
    assert drift["abs_delta"] == 0 and drift["slope_per_min"] == 0


def test_teacher_forced_continuation_of_the_truth_is_perfect():
    world, frames = world_video(5, seconds=9, deterministic=True)
    r = M.evaluate(frames, world, FPS, tf_start=4)
    assert np.isnan(r["curves"]["psnr"][:4]).all()
    assert list(r["horizon"]["psnr"]) == ["0.5s", "1s", "2s", "4s", "8s", "16s"]
    assert all(v == M.PSNR_CAP for v in r["horizon"]["psnr"].values())
    assert all(abs(v - 1) < 1e-12 for v in r["horizon"]["ssim"].values())
    worse = frames.copy()
    worse[4:] = blur(frames[4:])
    bad = M.evaluate(worse, world, FPS, tf_start=4)["figures"]
    assert bad["ssim"] < 0.9 and bad["psnr"] < 30 and bad["palette_fidelity"] < 0.95
    late = frames.copy()
    late[4 + 4 * FPS:] = noise(frames[4 + 4 * FPS:], 20)   # damage after 4 s: only the late horizons drop
    by = M.evaluate(late, world, FPS, tf_start=4)["horizon"]["psnr"]
    assert by["4s"] == by["0.5s"] == M.PSNR_CAP and by["8s"] < 30


# ---- each corruption moves its metric ---------------------------------------------------------------------------

def test_blur_lowers_palette_fidelity(seed3):
    world, frames, real = seed3
    f = figures(blur(frames), world)
    assert f["palette_fidelity"] < real["figures"]["palette_fidelity"] - 0.05


def test_colour_shift_raises_colour_drift(seed3):
    world, frames, real = seed3
    f = figures(colour_shift(frames), world)
    assert f["colour_drift"] > 15 and real["figures"]["colour_drift"] == 0
    assert f["palette_fidelity"] < 0.5 and f["background_error"] > 15


def test_frozen_second_half_kills_motion_retention(seed3):
    world, frames, real = seed3
    assert real["figures"]["motion_retention"] > 0.85
    assert figures(freeze(frames), world)["motion_retention"] < 0.05
    world, frames = world_video(2, seconds=30, deterministic=True)   # its middle frame shows clean objects
    assert figures(freeze(frames), world)["motion_retention"] < 0.05


def test_dropped_object_raises_count_error(seed3):
    world, frames, real = seed3
    j = world.scenes[0][0][0]
    dropped = M.evaluate(drop(frames, world, j), world, FPS)
    assert dropped["figures"]["count_error"] > real["figures"]["count_error"] + 0.3
    shown = [t for t in range(len(frames)) if all(o["visible"] >= 0.9 for o in world.state(t)["objects"]
                                                   if o["id"] == j)]
    assert (dropped["curves"]["count_error"][shown] >= 1).all()


def test_noise_raises_flicker_and_background_error(seed3):
    world, frames, real = seed3
    f = figures(noise(frames), world)
    assert f["flicker"] > 3 and real["figures"]["flicker"] == 0
    assert f["background_error"] > real["figures"]["background_error"] + 3


def test_shape_swap_after_a_gap_breaks_identity(seed3):
    world, frames, real = seed3
    gap = next(g for g in real["gaps"] if g["scored"] and g["frames"] >= FPS)
    j = world.colours.index(gap["colour"])
    swapped_world = ToyWorld(3, world.cfg)
    other = next(s for s in ("square", "triangle") if s != world.shapes[j])
    swapped_world.masks[j] = shape_mask(other, world.radius[j])
    start = gap["start"] + gap["frames"] - 1   # the object comes back with another shape
    swapped = frames.copy()
    swapped[start:] = swapped_world.render(start, len(frames) - start)
    r = M.evaluate(swapped, world, FPS)
    assert r["figures"]["identity_match"] < 1
    miss = next(g for g in r["gaps"] if g["colour"] == gap["colour"] and g["start"] == gap["start"])
    assert miss["match"] is False and miss["shape_kept"] is False and miss["colour_kept"] is True
    assert miss["far_match"] is False
    assert all(g["shape_kept"] and g["colour_kept"] for g in real["gaps"] if g["scored"])
    # the world's own video keeps every shape however far the clean frames lie; far scores every near-scored gap
    far = [g for g in real["gaps"] if g["far_scored"]]
    assert all(g["far_match"] and g["chance"] == 1 for g in far) and len(far) >= sum(g["scored"] for g in real["gaps"])


def test_far_scoring_reaches_past_unclean_runs_and_names_chance():
    # colour 0 is seen in four runs of frames but clean only at 5 and 95, so none of its three gaps has a clean
    # frame in both neighbouring runs: each is scored only by looking beyond them. Colour 1 keeps no shape.
    n, ring, square = 100, M.SHAPE_ID["ring"], M.SHAPE_ID["square"]
    det = {"present": np.zeros((n, 8), bool), "clean": np.zeros((n, 8), bool), "shape": np.zeros((n, 8), int),
           "rgb": np.zeros((n, 8, 3))}
    for s0 in (0, 30, 60, 90):
        det["present"][s0:s0 + 20, 0] = True
    det["clean"][[5, 95], 0] = True
    det["shape"][:, 0] = ring
    det["present"][:40, 1] = det["present"][60:, 1] = True
    det["clean"][[38, 39, 60, 61], 1] = True   # clean next to its gap, in two shapes half and half
    det["shape"][[38, 39], 1], det["shape"][[60, 61], 1] = square, ring
    gaps = M.identity_after_gap(det, FPS)
    assert [g["start"] for g in gaps] == [20, 50, 80, 40]
    assert not any(g["scored"] for g in gaps[:3])
    assert all(g["far_scored"] and g["far_match"] and g["far_span"] == 90 / FPS and g["chance"] == 1 for g in gaps[:3])
    g = gaps[3]
    assert g["scored"] and g["far_scored"] and g["far_span"] == 21 / FPS
    assert g["match"] is False and g["far_match"] is False
    assert g["chance"] == 0.5
    det["shape"][95, 0] = square   # it comes back another shape
    assert not any(g["far_match"] for g in M.identity_after_gap(det, FPS)[:3])
    det["clean"][95, 0] = False    # never clean after the first run: no gap is scored either way
    assert not any(g["far_scored"] for g in M.identity_after_gap(det, FPS)[:3])


def test_objects_unlike_the_caption_lower_prompt_colour_and_shape(seed3):
    world, frames, real = seed3
    assert real["figures"]["prompt_colour"] == 1 and real["figures"]["prompt_shape"] == 1
    j = world.scenes[0][0][0]   # on stage for the whole minute
    unnamed = next(c for c in PALETTE if c not in world.colours)
    recoloured = frames.copy()
    recoloured[np.all(frames == world.rgb[j], axis=-1)] = PALETTE[unnamed]   # drawn in a colour no caption names
    r = M.evaluate(recoloured, world, FPS)
    seen = np.flatnonzero(real["curves"]["count_error"] < len(world.scenes[0][0]))   # frames with an object seen
    assert r["figures"]["prompt_colour"] < 0.9 and r["figures"]["palette_fidelity"] == real["figures"]["palette_fidelity"]
    assert np.nanmin(r["curves"]["prompt_colour"][seen]) < 1
    moved = [g for g in r["gaps"] if g["colour"] == unnamed]   # its gaps: the caption no longer gives its shape
    assert moved and not any(g["named"] for g in moved) and all(g["named"] for g in real["gaps"])
    reshaped_world = ToyWorld(3, world.cfg)   # the same object, always in another shape
    other = next(s for s in ("square", "triangle") if s != world.shapes[j])
    reshaped_world.masks[j] = shape_mask(other, world.radius[j])
    r = M.evaluate(reshaped_world.render(0, len(frames)), world, FPS)
    assert r["figures"]["prompt_shape"] < 0.9 and r["figures"]["prompt_colour"] == 1


def test_ignoring_a_prompt_switch_never_matches(seed3):
    world, frames, real = seed3
    assert [s["frames_to_match"] for s in real["prompt_switch"]] == [0, 0]   # two background changes
    held = ToyWorld(3, WorldConfig(horizon_s=0.0)).render(0, len(frames))   # the first scene forever
    assert [s["frames_to_match"] for s in M.evaluate(held, world, FPS)["prompt_switch"]] == [None, None]
    late = frames.copy()
    late[300:340] = held[300:340]   # the new background arrives 40 frames late
    switch = M.evaluate(late, world, FPS)["prompt_switch"][0]
    assert switch["frames_to_match"] == 40
    # the first second's breakdown names the part that is late: the backdrop; the world's own meets every part
    assert switch["first_second"]["backdrop"] == 0
    assert all(s["first_second"] == {"backdrop": 1, "colour": 1, "shape": 1} for s in real["prompt_switch"])


def test_compare_pools_prompt_switches(seed3):
    import compare

    world, frames, real = seed3
    held = ToyWorld(3, WorldConfig(horizon_s=0.0)).render(0, len(frames))
    runs = [{**E.plain(M.evaluate(f, world, FPS)), "fps": FPS} for f in (frames, held)]
    followed, parts = compare.switch_cells(runs)
    assert followed == "50% of 4 (2 never; median 0 frames)"   # the world's two switches at once, held's never
    backdrop = np.mean([s["first_second"]["backdrop"] for s in runs[1]["prompt_switch"]])
    assert backdrop == 0 and parts.startswith("0.50 / ")
    assert compare.switch_cells([{**runs[0], "prompt_switch": []}]) is None   # sampled without --switches


def test_compare_pools_gaps_and_names_what_the_misses_changed(seed3):
    import compare

    world, frames, real = seed3
    scored = [g for g in real["gaps"] if g["scored"]]
    assert compare.gap_cell([real]) == f"{len(scored)} of {len(scored)} (chance 1.00)"
    changed = {**real, "gaps": [{**g, "match": False, "shape_kept": False, "chance": 0.5} for g in real["gaps"]]}
    assert compare.gap_cell([real, changed]) == \
        f"{len(scored)} of {2 * len(scored)} (misses: {len(scored)} changed shape, 0 colour; chance 0.75)"
    assert compare.gap_cell([{**real, "gaps": []}]) == "-"
    long = [g for g in real["gaps"] if g["far_scored"] and g["bucket"] in compare.LONG]
    halved = {**real, "gaps": [{**g, "far_match": False, "chance": 0.5} for g in long]}
    bucket = long[0]["bucket"]
    n = sum(g["bucket"] == bucket for g in long)
    apart = np.median([g["far_span"] for g in long if g["bucket"] == bucket] * 2)
    assert compare.far_cell([real, halved], bucket) == f"{n} of {2 * n} (0.50; chance 0.75; {apart:.0f} s apart)"
    assert compare.far_cell([{**real, "gaps": [{**g, "far_scored": False} for g in long]}], bucket) == "-"


# ---- drift summaries --------------------------------------------------------------------------------------------

def test_drift_of_a_linear_curve_is_exact():
    n, a, b = 2 * 60 * FPS, 0.7, -0.25   # two minutes of y = a + b * minutes
    t = np.arange(n) / (60 * FPS)
    y = a + b * t
    d = M.drift(y, FPS)
    w = 5 * FPS
    first, last = a + b * t[:w].mean(), a + b * t[-w:].mean()
    assert d["first"] == pytest.approx(first, abs=1e-12) and d["last"] == pytest.approx(last, abs=1e-12)
    assert d["delta"] == pytest.approx(last - first, abs=1e-12) and d["abs_delta"] == pytest.approx(first - last)
    assert d["slope_per_min"] == pytest.approx(b, abs=1e-12)
    y[::7] = np.nan   # undefined frames are skipped, the line is the same
    assert M.drift(y, FPS)["slope_per_min"] == pytest.approx(b, abs=1e-12)
    short = M.drift(np.arange(10.0), FPS)   # shorter than two windows: each window is half the video
    assert short["first"] == 2 and short["last"] == 7 and short["delta"] == 5


# ---- the command line -------------------------------------------------------------------------------------------

def write_mp4(path, frames, scale=4):
    """As sample.py writes: upscaled by nearest neighbour, libx264."""
    writer = imageio.get_writer(path, fps=FPS, codec="libx264", quality=8, macro_block_size=1,
                                ffmpeg_params=["-preset", "ultrafast", "-threads", "1"])
    for f in frames:
        writer.append_data(f.repeat(scale, 0).repeat(scale, 1))
    writer.close()


def test_cli_scores_an_mp4_of_the_world(tmp_path):
    world, frames = world_video(3, seconds=40)
    video, out = str(tmp_path / "real.mp4"), tmp_path / "out"
    write_mp4(video, frames)
    r = run("eval.py", video, "--world", "3", "--out", str(out), "--strip", str(out / "strip.png"))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["eval.json", "eval.png", "strip.png"]
    result = json.loads((out / "eval.json").read_text())
    f = result["figures"]
    assert result["frames"] == len(frames) and result["world"]["caption"] == world.caption(0)
    assert f["palette_fidelity"] >= 0.99 and f["colour_drift"] < 5 and f["background_error"] < 3
    assert f["flicker"] < 1 and f["teleport_rate"] == 0 and f["identity_match"] == 1
    assert abs(f["motion_retention"] - 1) < 0.15 and [s["frames_to_match"] for s in result["prompt_switch"]] == [0]
    assert result["reference"]["palette_fidelity"] == 1 and result["reference"]["flicker"] == 0
    assert set(result["drift"]) >= {"palette_fidelity", "colour_drift", "count_error", "background_error", "flicker"}
    assert len(result["curves"]["palette_fidelity"]) == len(frames)
    from PIL import Image
    assert Image.open(out / "eval.png").size[0] >= 400
    strip = np.asarray(Image.open(out / "strip.png"))   # the world's own video above the scored one: here the same
    assert strip.shape[0] % 2 == 0 and np.abs(strip[:strip.shape[0] // 2].astype(int) - strip[strip.shape[0] // 2:]).mean() < 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    r = run("train.py", "--method", "teacher", "--tiny", "--steps", "4", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_cli_samples_and_scores_a_checkpoint(trained, tmp_path):
    out = tmp_path / "gen"
    r = run("eval.py", "--ckpt", trained, "--seconds", "2", "--steps", "2", "--cfg", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "eval.json").read_text())
    assert result["frames"] == 2 * FPS and result["world"]["caption"] == ToyWorld(0).caption(0)
    assert "horizon" not in result and (out / "eval.png").exists()
    # teacher-forced start: 2 true frames (one tiny chunk) into the guided cache, then the model; PSNR/SSIM by horizon
    r = run("eval.py", "--ckpt", trained, "--seconds", "1", "--steps", "2", "--world", "4", "--deterministic",
            "--tf-start", "2", "--out", str(tmp_path / "tf"))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "tf" / "eval.json").read_text())
    assert result["frames"] == 2 + FPS and result["curves"]["psnr"][:2] == [None, None]
    assert set(result["horizon"]["psnr"]) == {"0.5s", "1s"} and result["reference"]["psnr"] == M.PSNR_CAP
    assert result["figures"]["psnr"] < M.PSNR_CAP   # four training steps do not continue the world


def test_bad_input_gives_one_error_line(trained, tmp_path):
    r = run("eval.py", str(tmp_path / "missing.mp4"), "--world", "1", "--out", str(tmp_path / "o"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("eval.py: error:") and "not found" in lines[0]
    assert not (tmp_path / "o").exists()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    cases = [([str(junk), "--world", "1"], "cannot read video"),
             ([str(junk)], "--world"),
             ([str(junk), "--world", "1", "--seconds", "3"], "not both"),
             (["--ckpt", trained, "--seconds", "0"], "seconds"),
             (["--ckpt", trained, "--tf-start", "2"], "--deterministic"),
             (["--ckpt", trained, "--deterministic", "--tf-start", "3"], "whole chunks"),
             (["--ckpt", trained, "--size", "64"], "frame size")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            E.main(argv + ["--out", str(tmp_path / "o")])
        assert words in str(e.value.code) and "\n" not in str(e.value.code), (argv, e.value.code)
    with pytest.raises(SystemExit) as e:
        E.main(["--nonsense"])
    assert e.value.code == 2   # argparse: usage and one "error:" line
    assert not (tmp_path / "o").exists()


# ---- compare.py -------------------------------------------------------------------------------------------------

def test_compare_averages_streams_and_draws_every_model(seed3, tmp_path):
    import compare

    world, frames, real = seed3
    shifted = M.evaluate(colour_shift(frames), world, FPS)
    for name, result in (("a", real), ("b", shifted), ("c", real)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(E.plain({**result, "frames": len(frames), "fps": FPS})))
    models = dict(compare.load(spec) for spec in (f"real={tmp_path / 'a'}", f"mixed={tmp_path / 'b'},{tmp_path / 'c'}"))
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in compare.table(models).splitlines()
            if line.startswith("| ")}
    drift = (real["figures"]["colour_drift"] + shifted["figures"]["colour_drift"]) / 2
    spread = abs(real["figures"]["colour_drift"] - shifted["figures"]["colour_drift"]) / 2
    assert rows["colour_drift"][0] == "0" and rows["colour_drift"][1].rstrip(" |") == f"{drift:.3g} ± {spread:.2g}"
    curve = compare.model_curve(models["mixed"], "colour_drift")
    assert len(curve) == len(frames) and np.nanmean(curve) > 5   # half the streams are shifted by ~28 RGB units
    out = tmp_path / "plot.png"
    compare.plot(models, str(out))
    image = imageio.imread(out)
    for colour in compare.LINE_COLOURS[:2]:       # a line of each model's colour was drawn
        assert np.all(image[..., :3] == colour, axis=-1).sum() > 100
    with pytest.raises(SystemExit) as e:
        compare.main([f"x={tmp_path / 'missing'}"])
    assert "cannot read" in str(e.value.code) and "\n" not in str(e.value.code)


def test_drift_share_puts_a_stream_on_the_scale_from_the_world_to_noise(seed3):
    import compare

    world, frames, _ = seed3
    spoilt = frames.copy()
    spoilt[-160:] = np.random.default_rng(1).integers(0, 256, spoilt[-160:].shape, dtype=np.uint8)   # last 10 s: noise
    scene = {"seed": 3, "size": 32, "deterministic": False, "horizon_s": world.cfg.horizon_s, "events": len(world.events),
             "caption": world.caption(0)}
    older = {k: v for k, v in scene.items() if k != "horizon_s"}   # eval.json written before the horizon was stored
    assert len(compare.world_of({"world": older}).events) == len(world.events)
    runs = [{**E.plain(M.evaluate(f, world, FPS)), "frames": len(f), "fps": FPS, "world": scene} for f in (frames, spoilt)]
    cache = {}
    own, bad = (compare.shares(r, cache) for r in runs)
    assert len(cache) == 1   # the scene is rendered again and scored once for both streams
    for name in compare.SHARED:   # the world's own stream moves exactly as far as the world rendered again
        np.testing.assert_allclose(own[name][0], own[name][1])
    for name in ("palette_fidelity", "background_error"):   # ends in noise: moved the whole way; the world did not
        assert bad[name][0] > 0.8 and bad[name][1] < 0.05, (name, bad[name])
    with pytest.raises(SystemExit) as e:
        compare.shares({**runs[0], "world": {**scene, "caption": "a red square over blue dots"}}, {})
    assert "cannot rebuild the scene" in str(e.value.code) and "\n" not in str(e.value.code)
