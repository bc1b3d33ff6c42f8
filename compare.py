"""
Compare eval.py runs side by side: one markdown table of the figures and drifts, and one drift plot.

    python compare.py teacher=runs/eval-teacher-s0,runs/eval-teacher-s1 \\
                      resampling=runs/eval-resampling-s0,runs/eval-resampling-s1 --out docs/drift.png

Each argument is LABEL=DIR[,DIR...]: the eval.py output folders (each holds an eval.json) of one model, say one
per prompt seed. A cell of the table is the mean over that model's folders, "± sd" when there are several (the
spread over streams, which says how far apart two models must be before the gap means anything); identity after a
gap is also pooled over the streams' scored gaps, with what the misses changed (shape or colour), and for the long
gaps (LONG) also as scored from clean frames anywhere (metrics.identity_after_gap's "far"), beside the share a
model that kept no identity would match by chance (the mean of the scored gaps' "chance"). Drift rows are
eval.py's drift summaries: the mean of a curve over the last WINDOW_S seconds minus over the first. Drift-share
rows put the move of a curve between its first and last SHARE_S seconds on the scale from the world's own video to
noise (metrics.drift_share), for the streams and for the world's own video of the same scenes and length: the
second says how much of the first the scene itself makes (objects leave the view and come back, so even the
world's own count moves). They need eval.json's "world" entry, from which the scene is rendered again. Runs made
with `eval.py --switches` add the prompt-switch rows, pooled over the model's switches: the share followed within
one second (frames_to_match <= fps), and over each switch's first second the share of frames meeting each part
of a match (metrics.switch_conditions), which says whether a model is slow at the backdrop or at the objects. The
plot has one panel per per-frame curve, one line per model: each stream's curve as a WINDOW_S-second moving mean,
then averaged over the model's streams; the panels share their y-range across models.
"""

import argparse
import json
import math
import os

import numpy as np

from data import ToyWorld, WorldConfig
from metrics import GAP_BUCKETS, SHARE_S, WINDOW_S, drift_share, evaluate, mean, noise_figures, panel
from sample import output_path

FIGURES = ("palette_fidelity", "colour_drift", "count_error", "background_error", "flicker", "motion_retention",
           "teleport_rate", "identity_match")
NEWER = ("prompt_colour", "prompt_shape")   # figures an older eval.json lacks: shown as "-" for it
CURVES = ("palette_fidelity", "colour_drift", "count_error", "background_error", "flicker")
SWITCH_PARTS = ("backdrop", "colour", "shape")   # metrics.switch_conditions, in the order the switch rows show them
SHARED = ("palette_fidelity", "count_error", "background_error", "flicker")   # noise has no objects: no colour drift
LONG = tuple(name for _, name in GAP_BUCKETS[2:])   # buckets shown also as scored far: the ones long memory is for
LINE_COLOURS = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (210, 130, 0), (140, 60, 180), (0, 160, 170),
                (90, 90, 90), (230, 90, 160)]


def fail(msg):
    raise SystemExit(f"compare.py: error: {msg}")


def load(spec):
    """LABEL=DIR[,DIR...] -> (label, [eval.json dicts])."""
    label, sep, dirs = spec.partition("=")
    if not sep or not label or not dirs:
        fail(f"expected LABEL=DIR[,DIR...], got {spec!r}")
    runs = []
    for d in dirs.split(","):
        path = os.path.join(d, "eval.json")
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            fail(f"cannot read {path}: {type(e).__name__}")
        missing = missing_keys(runs[-1])
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            fail(f"{path} is not an eval.py result (missing {', '.join(missing[:3])}{more})")
    return label, runs


def missing_keys(run) -> list[str]:
    """The keys (dotted) compare.py reads that an eval.json lacks. A figure may be null (undefined), not absent."""
    need = ["frames", "fps"] + [f"figures.{n}" for n in FIGURES] + [f"curves.{n}" for n in CURVES] + \
           [f"drift.{n}.delta" for n in CURVES]
    return [key for key in need if not has_path(run, key)]


def has_path(run, key) -> bool:
    node = run
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def cell(values):
    """Mean of the finite values, their standard deviation when there are several, and how many when not all."""
    v = np.asarray([np.nan if x is None else x for x in values], float)
    n = len(v)
    v = v[np.isfinite(v)]
    if not len(v):
        return "-"
    m = v.mean() if abs(v.mean()) > 1e-9 * np.abs(v).max() else 0.0   # exact cancellations print as 0, not 5e-17
    return (f"{m:.3g}" + (f" ± {v.std():.2g}" if len(v) > 1 else "") +
            (f" ({len(v)} of {n})" if len(v) < n else ""))   # the other streams leave it undefined


def share_cell(values):
    """Mean and largest of the finite shares, in percent, and how many when not all are defined."""
    v = np.asarray(values, float)
    n, v = len(v), v[np.isfinite(v)]
    if not len(v):
        return "-"
    return f"{100 * v.mean():.1f}% (max {100 * v.max():.0f}%)" + (f" ({len(v)} of {n})" if len(v) < n else "")


def world_of(run):
    """The ToyWorld scene an eval.json scored, rendered from its "world" entry; None for a result without one."""
    w = run.get("world")
    if not w:
        return None
    # results written before eval.py stored the horizon: the default one if the scene had events, else none
    horizon = w["horizon_s"] if "horizon_s" in w else WorldConfig.horizon_s if w["events"] else 0.0
    world = ToyWorld(w["seed"], WorldConfig(size=w["size"], deterministic=w["deterministic"], horizon_s=horizon))
    if world.caption(0) != w["caption"] or len(world.events) != w["events"]:
        fail(f"cannot rebuild the scene of a result (seed {w['seed']}): its caption or events differ")
    return world


def shares(run, cache):
    """{curve: (drift share of the run's stream, drift share of the world's own video)}, or None without a scene.
    cache holds the world's own scores per scene and length, shared by every model streamed on it."""
    world = world_of(run)
    if world is None:
        return None
    key = (json.dumps(run["world"], sort_keys=True), run["frames"], run["fps"])
    if key not in cache:
        cache[key] = evaluate(world.render(0, run["frames"]), world, run["fps"]), noise_figures(world)
    own, noise = cache[key]
    return {name: tuple(drift_share(c, run["fps"], own["figures"][name], noise[name])
                        for c in (run["curves"][name], own["curves"][name])) for name in SHARED}


def switch_cells(runs):
    """Pooled over the runs' prompt switches: (followed within a second, with how many never followed and the median
    frames to a match; the first second's shares of frames meeting each part of a match), or None without any."""
    switches = [(s, r["fps"]) for r in runs for s in r.get("prompt_switch", [])]
    if not switches:
        return None
    frames = [s["frames_to_match"] for s, _ in switches]
    followed = sum(s["frames_to_match"] is not None and s["frames_to_match"] <= fps for s, fps in switches)
    done = [f for f in frames if f is not None]
    median = f"; median {np.median(done):g} frames" if done else ""
    head = f"{100 * followed / len(switches):.0f}% of {len(switches)} ({frames.count(None)} never{median})"
    parts = [s["first_second"] for s, _ in switches if "first_second" in s]   # older eval.json: no breakdown
    tail = " / ".join(f"{np.mean([p[k] for p in parts]):.2f}" for k in SWITCH_PARTS) if parts else "-"
    return head, tail


def gap_cell(runs):
    """Pooled over the runs' scored gaps: matched of scored, of the misses how many changed shape and how many colour
    (a miss can do both), and the share expected by chance (the mean of the gaps' "chance"); "-" without a scored
    gap. An older eval.json lacks the breakdown or the chance: those parts are left out."""
    gaps = [g for r in runs for g in r.get("gaps", []) if g["scored"]]
    if not gaps:
        return "-"
    head = f"{sum(bool(g['match']) for g in gaps)} of {len(gaps)}"
    misses = [g for g in gaps if not g["match"]]
    parts = []
    if misses and "shape_kept" in misses[0]:
        parts.append(f"misses: {sum(not g['shape_kept'] for g in misses)} changed shape, "
                     f"{sum(not g['colour_kept'] for g in misses)} colour")
    if "chance" in gaps[0]:
        parts.append(f"chance {np.mean([g['chance'] for g in gaps]):.2f}")
    return head + (f" ({'; '.join(parts)})" if parts else "")


def far_cell(runs, bucket):
    """Pooled over the runs' gaps in `bucket` scored from clean frames anywhere: matched of scored, the share expected
    by chance, and the median time between the two clean frames compared (longer than the gap where the object was
    not clean next to it); "-" without one (or from an older eval.json, which has no far scoring)."""
    gaps = [g for r in runs for g in r.get("gaps", []) if g["bucket"] == bucket and g.get("far_scored")]
    if not gaps:
        return "-"
    matched = sum(bool(g["far_match"]) for g in gaps)
    return (f"{matched} of {len(gaps)} ({matched / len(gaps):.2f}; chance {np.mean([g['chance'] for g in gaps]):.2f}; "
            f"{np.median([g['far_span'] for g in gaps]):.0f} s apart)")


def table(models) -> str:
    labels = list(models)
    rows = ["| metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name in FIGURES + NEWER:
        rows.append(f"| {name} | " + " | ".join(cell([r["figures"].get(name) for r in models[m]]) for m in labels) + " |")
    rows.append("| identity after a gap, pooled: gaps matched | " + " | ".join(gap_cell(models[m]) for m in labels)
                + " |")
    for bucket in LONG:
        rows.append(f"| identity after a {bucket} gap, from clean frames anywhere: matched of scored | " +
                    " | ".join(far_cell(models[m], bucket) for m in labels) + " |")
    for name in CURVES:
        rows.append(f"| {name}: drift (last {WINDOW_S:g} s - first) | " +
                    " | ".join(cell([r["drift"][name]["delta"] for r in models[m]]) for m in labels) + " |")
    cache = {}
    both = {m: [shares(r, cache) for r in models[m]] for m in labels}
    for name in SHARED:
        for i, whose in enumerate(("stream", "world's own")):
            rows.append(f"| {name}: drift share, {whose} (last {SHARE_S:g} s against first, of world-to-noise) | " +
                        " | ".join(share_cell([s[name][i] if s else math.nan for s in both[m]]) for m in labels) +
                        " |")
    cells = {m: switch_cells(models[m]) for m in labels}
    if any(cells.values()):
        rows.append("| prompt switches followed within 1 s (never followed; median frames to a match) | " +
                    " | ".join(c[0] if c else "-" for c in cells.values()) + " |")
        rows.append(f"| first second after a switch: share of frames with the new {' / '.join(SWITCH_PARTS)} | " +
                    " | ".join(c[1] if c else "-" for c in cells.values()) + " |")
    streams = {len(v) for v in models.values()}
    seconds = {r["frames"] / r["fps"] for v in models.values() for r in v}
    rows.append(f"\n{'/'.join(map(str, sorted(streams)))} stream(s) per model, "
                f"{'/'.join(f'{s:g}' for s in sorted(seconds))} s each")
    return "\n".join(rows)


def smooth(curve, n):
    """Moving mean over n frames, NaN frames skipped; NaN where the whole window is NaN."""
    y = np.asarray([np.nan if x is None else x for x in curve], float)
    ok = np.isfinite(y)
    k = np.ones(n)
    total, count = np.convolve(np.where(ok, y, 0), k, "same"), np.convolve(ok.astype(float), k, "same")
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def model_curve(runs, name):
    """A model's smoothed curve: the moving mean of each stream, averaged over streams (cut to the shortest)."""
    n = min(r["frames"] for r in runs)
    curves = np.stack([smooth(r["curves"][name][:n], max(1, round(WINDOW_S * r["fps"]))) for r in runs])
    return np.array([mean(c) for c in curves.T])


def plot(models, path):
    """One panel per curve, one coloured line per model, the legend on top."""
    from PIL import Image, ImageDraw

    W, row, top = 800, 110, 22
    image = Image.new("RGB", (W, top + row * len(CURVES) + 20), "white")
    pen = ImageDraw.Draw(image)
    x0, x1 = 56, W - 8
    x = x0
    for i, label in enumerate(models):
        pen.text((x, 4), label, fill=LINE_COLOURS[i % len(LINE_COLOURS)])
        x += pen.textlength(label) + 20
    fps = next(iter(models.values()))[0]["fps"]
    for p, name in enumerate(CURVES):
        curves = [model_curve(runs, name) for runs in models.values()]
        panel(pen, (x0, top + p * row + 16, x1, top + p * row + row - 8), f"{name} ({WINDOW_S:g} s moving mean)",
              curves, [LINE_COLOURS[i % len(LINE_COLOURS)] for i in range(len(curves))])
    n = max(min(r["frames"] for r in runs) for runs in models.values())   # frames of the longest line
    pen.text((x0, image.size[1] - 14), "0 s", fill="black")
    pen.text((x1 - 40, image.size[1] - 14), f"{n / fps:.4g} s", fill="black")
    tmp = path + ".part"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=DIR[,DIR...]: eval.py output folders of one model")
    p.add_argument("--out", default=None, help="write the drift plot here (PNG)")
    args = p.parse_args(argv)
    if args.out:
        output_path(args.out)
    models = dict(load(spec) for spec in args.runs)
    if len(models) != len(args.runs):
        fail("two runs share a label")
    print(table(models))
    if args.out:
        plot(models, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
