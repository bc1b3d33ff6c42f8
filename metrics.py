"""
The long-horizon metrics on ToyWorld: does a stream drift, and does it remember? (eval.py is the command.)

The papers this project implements make claims about long horizons: Rolling and Resampling Forcing about error
accumulation (minute 5 should look like minute 0), Context Forcing about long memory (an object back after 20 s
off screen should be the same object). ToyWorld (data.py) has exact ground truth, so both become numbers here,
offline, the same for every method. What is measured (each function's docstring is the exact definition):
  per frame   palette fidelity, colour drift, object-count error, background error, background flicker, object
              speed, prompt colour and shape (are the objects drawn the ones the caption names?); PSNR and SSIM
              after a teacher-forced start
  per video   motion retention, teleport rate, identity after a gap (by gap length; also from clean frames
              anywhere, against chance), frames to follow a new caption (prompt switch) and which of its parts a
              video is slow at, PSNR and SSIM by horizon
  per curve   drift: first 5 s against last 5 s, signed and absolute (Rolling Forcing), slope per minute; drift
              share: first 10 s against last 10 s, as a share of the distance from the world's own video to noise
A run writes into --out eval.json (figures, curves, drift, gaps, switches, and "reference": the same figures for
the world's own video of the same length, the ideal to read them against) and eval.png (frames from the first,
middle and last second above the curves).

Reading frames. Objects are drawn in exact palette colours and data.py keeps every background and occluder pixel
over 60 RGB units from every palette colour, so a pixel within DETECT_TOL of a palette colour is an object pixel of
that colour. Colour is identity (no two objects share one), so objects are tracked by colour. Same-colour pixels
form 4-connected components (label propagation in numpy; no scipy) and a colour's largest component is that
object: its area, centroid, mean colour, and a shape from its geometry (a hole at its centroid: ring; filling
>= 92% of its bounding box: square; >= 65%: circle; else triangle: right for every ToyWorld mask size). A
measurement is *clean* when the object is one component touching no frame border, occluder or other object;
only clean measurements give shape and speed, since a half-hidden object has neither its shape nor its centre.
Frames larger than the world (sample.py writes them upscaled by --scale) are box-averaged back to its size.
The camera pans by whole pixels, at most one a frame: between two frames the background shift s in {-1, 0, 1}
that best aligns the backdrop is found, flicker is measured after undoing it, and motion relative to it, so a
panning camera is neither flicker nor motion. Identity is followed by colour: a gap is a stretch in which a
colour seen before is missing, and the shape it comes back with is compared with the one it left with. Metrics
that follow a caption (count, background, prompt colour and shape, prompt switch) read the caption of each frame
from the world.
"""

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from data import BACKDROP_COLOURS, BACKDROP_SHADE, OCCLUDER_RGB, PALETTE, SHAPES

# ---- config: every threshold, in RGB units (L2 over the three 0..255 channels) or pixels ----------------------
DETECT_TOL = 40.0     # object pixel: this close to a palette colour (under half of the 83 between the closest two)
FIDELITY_TOL = 20.0   # "a ToyWorld colour" for palette fidelity; an mp4 round trip moves pixels by up to ~13
OCCLUDER_TOL = 20.0   # the occluder's colour; every backdrop colour is at least 42 from it
MIN_AREA = 5          # pixels at 32x32, scaled with the frame's area: smaller components are specks, not objects
FILL_SQUARE, FILL_CIRCLE = 0.92, 0.65   # bounding-box fill: square 1.0, circle 0.76-0.85, triangle 0.5
COLOUR_MATCH = 20.0   # an object's mean colour before and after a gap must be this close
SPEED_SLACK = 3.0     # px/frame over the world's fastest object before a step is a teleport (rounding + pan step)
WINDOW_S = 5.0        # first/last window of the drift summaries (Rolling Forcing's 5 s)
SHARE_S = 10.0        # first/last window of the drift share: 10 s hold enough objects for a count to settle
NOISE_FRAMES = 160    # frames of uniform random pixels that set the far end of the drift share
RETENTION_S = 20.0    # first/last window of motion retention: long enough that objects of a panning world are seen
MIN_STEPS = 16        # clean object steps motion retention needs in each window
GAP_BUCKETS = ((1.0, "<1s"), (5.0, "1-5s"), (20.0, "5-20s"), (math.inf, ">=20s"))   # upper ends in seconds
FIRST_HORIZON_S = 0.5  # PSNR/SSIM horizons: 0.5 s, 1 s, 2 s, 4 s, ... up to the continuation's length
SWITCH_HOLD = 4       # frames in a row a video must match a new caption to count as switched
PSNR_CAP = 100.0      # dB reported for identical frames, so the JSON stays finite
BATCH = 128           # frames classified at once: bounds memory on long videos

COLOURS, BACKDROPS = list(PALETTE), list(BACKDROP_COLOURS)
PAL = np.array([PALETTE[c] for c in COLOURS], np.float32)
BASE = np.array([BACKDROP_COLOURS[c] for c in BACKDROPS], np.float32)
OCC = np.array(OCCLUDER_RGB, np.float32)
SHAPE_ID = {s: i for i, s in enumerate(SHAPES)}
LUMA = np.array([0.299, 0.587, 0.114])
GAUSS = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
GAUSS /= GAUSS.sum()


def mean(v) -> float:
    """Mean of the finite values, NaN when there are none."""
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def masked_mean(values, mask, axis):
    """Mean of values where mask is true along axis; NaN where it is nowhere true."""
    n = mask.sum(axis)
    return np.where(n > 0, np.where(mask, values, 0).sum(axis) / np.maximum(n, 1), np.nan)


# ---- reading the frames: pixels, components, objects ------------------------------------------------------------

def classify(frames):
    """Per pixel of uint8 frames [N, H, W, 3]: "colour", the nearest palette index if within DETECT_TOL, else -1;
    the distance to the nearest palette colour ("pal"), to each backdrop colour's range ("fam", [N, H, W, 6]: the
    segment from a BACKDROP_COLOURS base to its BACKDROP_SHADE shade, which holds every pattern and gradient
    colour of that backdrop) and to the occluder colour ("occ")."""
    px = frames.astype(np.float32)[..., None, :]
    pal = np.linalg.norm(px - PAL, axis=-1)
    dark = BASE * BACKDROP_SHADE
    f = np.clip(((px - dark) * (BASE - dark)).sum(-1) / ((BASE - dark) ** 2).sum(-1), 0, 1)
    fam = np.linalg.norm(px - (dark + f[..., None] * (BASE - dark)), axis=-1)
    near = pal.min(-1)
    return {"colour": np.where(near <= DETECT_TOL, pal.argmin(-1), -1), "pal": near, "fam": fam,
            "occ": np.linalg.norm(px[..., 0, :] - OCC, axis=-1)}


def components(colour):
    """4-connected components of equal palette index in [N, H, W] (-1: no object). Each object pixel gets the
    smallest flat index of its component, every other pixel -1. Min-label propagation with pointer jumping."""
    n, obj = colour.size, colour >= 0
    lab = np.where(obj, np.arange(n).reshape(colour.shape), n)
    down = obj[:, 1:] & (colour[:, 1:] == colour[:, :-1])          # pixel and the one above: same object
    right = obj[:, :, 1:] & (colour[:, :, 1:] == colour[:, :, :-1])
    while True:
        new = lab.copy()
        new[:, 1:] = np.minimum(new[:, 1:], np.where(down, new[:, :-1], n))
        new[:, :-1] = np.minimum(new[:, :-1], np.where(down, new[:, 1:], n))
        new[:, :, 1:] = np.minimum(new[:, :, 1:], np.where(right, new[:, :, :-1], n))
        new[:, :, :-1] = np.minimum(new[:, :, :-1], np.where(right, new[:, :, 1:], n))
        new = np.append(new.ravel(), n)[new]   # a label is a pixel of the same component: take its label too
        if np.array_equal(new, lab):
            return np.where(obj, lab, -1)
        lab = new


def objects(frames, px, min_area):
    """Per frame and palette colour, the colour's largest component: arrays [N, 8] "area", "x", "y" (centroid),
    "shape" (index into SHAPES), "rgb" ([N, 8, 3] mean colour), "present" (area >= min_area) and "clean" (present,
    the only component of its colour that large, touching no frame border, occluder or other object)."""
    N, H, W = px["colour"].shape
    lab = components(px["colour"])
    obj = lab >= 0
    ids, inv = np.unique(lab[obj], return_inverse=True)
    area = np.bincount(inv, minlength=len(ids)).astype(float)
    _, y, x = np.nonzero(obj)
    cy, cx = np.bincount(inv, y, len(ids)) / area, np.bincount(inv, x, len(ids)) / area
    pixels = frames[obj]
    rgb = np.stack([np.bincount(inv, pixels[:, k], len(ids)) for k in range(3)], -1) / area[:, None]
    y0, x0, y1, x1 = (np.full(len(ids), v) for v in (H, W, -1, -1))   # bounding boxes
    for ufunc, bound, v in ((np.minimum, y0, y), (np.minimum, x0, x), (np.maximum, y1, y), (np.maximum, x1, x)):
        ufunc.at(bound, inv, v)
    fill = area / ((y1 - y0 + 1) * (x1 - x0 + 1))
    hole = lab[ids // (H * W), np.round(cy).astype(int), np.round(cx).astype(int)] != ids
    shape = np.where(hole, SHAPE_ID["ring"], np.where(fill >= FILL_SQUARE, SHAPE_ID["square"],
                     np.where(fill >= FILL_CIRCLE, SHAPE_ID["circle"], SHAPE_ID["triangle"])))
    # an object pixel whose 4-neighbour is outside the frame, the occluder or another object: not clean
    labp = np.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=-2)
    occp = np.pad(px["occ"] <= OCCLUDER_TOL, ((0, 0), (1, 1), (1, 1)))
    bad = np.zeros(lab.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb = labp[:, dy:dy + H, dx:dx + W]
        bad |= occp[:, dy:dy + H, dx:dx + W] | ((nb != -1) & (nb != lab))
    touch = np.bincount(inv, bad[obj], len(ids)) > 0
    key = ids // (H * W) * len(COLOURS) + px["colour"].ravel()[ids]   # (frame, colour)
    big = area >= min_area
    many = np.bincount(key[big], minlength=N * len(COLOURS)) > 1
    order = np.lexsort((area, key))
    top = order[np.flatnonzero(np.diff(np.append(key[order], -1)))]   # the largest component of each key
    out = {}
    for name, v in {"area": area, "x": cx, "y": cy, "shape": shape, "rgb": rgb,
                    "clean": big & ~touch & ~many[key]}.items():
        table = np.zeros((N * len(COLOURS),) + v.shape[1:], v.dtype)
        table[key[top]] = v[top]
        out[name] = table.reshape(N, len(COLOURS), *v.shape[1:])
    out["present"] = out["area"] >= min_area
    return out


def parse_caption(caption):
    """A ToyWorld caption -> ({colour: shape} of its objects, index of its backdrop colour in BACKDROP_COLOURS)."""
    words = [w.strip(".,") for w in caption.lower().split()]
    return ({w: s for w, s in zip(words, words[1:]) if w in PALETTE and s in SHAPES},
            next(i for i, c in enumerate(BACKDROPS) if c in words))


# ---- per-frame metrics on the pixels ----------------------------------------------------------------------------

def palette_fidelity(px):
    """Per frame: the share of pixels within FIDELITY_TOL of a ToyWorld colour: a palette colour, any backdrop
    colour (base to shade) or the occluder. 1 for ToyWorld's frames; blur, noise and colour casts lower it."""
    near = np.minimum(np.minimum(px["pal"], px["fam"].min(-1)), px["occ"])
    return (near <= FIDELITY_TOL).mean((1, 2))


def background_error(px, backdrop):
    """Per frame: the mean, over pixels that are not object pixels, of the RGB distance to the nearest colour the
    scene's background can take: its backdrop colour's range (base to shade; `backdrop` [N] indexes
    BACKDROP_COLOURS) or the occluder. Under 1 for ToyWorld's frames (only the gradient's rounding)."""
    d = np.minimum(np.take_along_axis(px["fam"], backdrop[:, None, None, None], -1)[..., 0], px["occ"])
    return masked_mean(d, px["colour"] < 0, (1, 2))


def backdrop_share(px):
    """Per frame and backdrop colour [N, 6]: the share of backdrop pixels (neither object nor occluder) whose
    nearest backdrop colour range is that one."""
    ground = (px["colour"] < 0) & (px["occ"] > OCCLUDER_TOL)
    nearest = px["fam"].argmin(-1)
    return np.stack([masked_mean(nearest == k, ground, (1, 2)) for k in range(len(BACKDROPS))], -1)


def flicker(frames, px):
    """Per frame t >= 1: the mean absolute difference (0..255, averaged over channels) between frame t and frame
    t-1 over the static background: pixels that are backdrop (neither object nor occluder) in both, after undoing
    the camera pan by the horizontal shift s in (0, -1, 1) that makes it smallest (frame t = frame t-1 moved left
    by s; the first of equals wins). Returns it (NaN at frame 0) and s. 0 for ToyWorld's frames; noise raises it."""
    f, W = frames.astype(np.float32), frames.shape[2]
    ground = (px["colour"] < 0) & (px["occ"] > OCCLUDER_TOL)
    best, shift = np.full(len(f), np.inf), np.zeros(len(f), int)
    for s in (0, -1, 1):
        now, before = slice(max(0, -s), W - max(0, s)), slice(max(0, s), W - max(0, -s))
        mask = ground[1:, :, now] & ground[:-1, :, before]
        d = masked_mean(np.abs(f[1:, :, now] - f[:-1, :, before]).mean(-1), mask, (1, 2))
        better = np.r_[False, d < best[1:]]   # NaN (no static pixel) never wins
        best, shift = np.where(better, np.r_[0, d], best), np.where(better, s, shift)
    return np.where(np.isfinite(best), best, np.nan), shift


# ---- per-frame and whole-video metrics on the objects -----------------------------------------------------------

def count_error(det, expected):
    """Per frame: |objects seen - objects the caption names|; an object is seen when its colour has a component of
    MIN_AREA pixels (scaled with the frame; colour is identity, so an object split by the occluder is still one).
    0 whenever every object of the scene is in view; objects that leave a panning view count as missing, also in
    ToyWorld's own video, so read it against the reference."""
    return np.abs(det["present"].sum(1) - expected).astype(float)


def colour_drift(det):
    """Per frame: the mean over objects seen of the RGB distance between the object's mean colour and its palette
    colour. 0 for ToyWorld's frames; NaN with no object in view."""
    return masked_mean(np.linalg.norm(det["rgb"] - PAL, axis=-1), det["present"], 1)


def motion(det, shift, limit, window):
    """Object motion relative to the background. An object clean in frames t-1 and t makes the step
    d = (x_t - x_{t-1} + s_t, y_t - y_{t-1}) with s_t the background shift (flicker), so a pan is not motion.
    Returns: per frame the mean |d| over objects ("speed", px/frame; NaN with no step); the teleport rate, the
    share of steps with |d| > limit (the world's fastest object + SPEED_SLACK); and motion retention R_last /
    R_first, how fast objects move in the last `window` frames against the first, each object against its own
    speed: R = sum over objects of hypot(sum |dx|, sum |dy|) over its steps in the window, divided by the sum over
    objects of (its steps in the window) * v, with v = hypot(mean |dx|, mean |dy|) over all its steps. Per-axis
    sums undo the staircase of whole-pixel positions; normalising by v makes R ~1 in a true world whichever
    objects are in view. A scene frozen from the middle gives 0 (if an object is clean in the frozen frame);
    NaN without MIN_STEPS steps in both windows."""
    ok = det["clean"][1:] & det["clean"][:-1]
    dx, dy = np.abs(np.diff(det["x"], axis=0) + shift[1:, None]), np.abs(np.diff(det["y"], axis=0))
    step = np.hypot(dx, dy)
    speed = np.r_[np.nan, masked_mean(step, ok, 1)]
    teleport = float((step[ok] > limit).mean()) if ok.any() else math.nan
    v = np.nan_to_num(np.hypot(masked_mean(dx, ok, 0), masked_mean(dy, ok, 0)))
    r = []
    for part in (slice(0, window - 1), slice(len(ok) - window + 1, None)):   # steps inside the first/last frames
        o, n = ok[part], ok[part].sum(0)
        moved = np.hypot(np.where(o, dx[part], 0).sum(0), np.where(o, dy[part], 0).sum(0)).sum()
        r.append(moved / (n * v).sum() if n.sum() >= MIN_STEPS and (n * v).sum() > 0 else math.nan)
    return speed, teleport, r[1] / r[0] if r[0] > 0 else math.nan


def kept(det, c, a, b):
    """Is object c (a colour index) the same at clean frames a and b: (same shape, mean colours within COLOUR_MATCH)."""
    return (bool(det["shape"][a, c] == det["shape"][b, c]),
            bool(np.linalg.norm(det["rgb"][a, c] - det["rgb"][b, c]) <= COLOUR_MATCH))


def identity_after_gap(det, fps):
    """Every gap: a run of frames in which an object (a colour) that was seen is not seen, ended by its return.
    It is scored if the object is clean at least once in its run of frames just before the gap and in its run
    just after; it then matches if its last clean shape before equals its first clean shape after (shape_kept) and
    their mean colours are within COLOUR_MATCH (colour_kept). Returns one dict per gap, with its length and
    GAP_BUCKETS bucket.
    A model whose objects are seldom clean leaves most long gaps unscored, so each gap is also scored from clean
    frames anywhere ("far"): the object's last clean frame before the gap and its first clean frame after it,
    however far from the gap (far_span: the seconds between the two; a gap scored above is scored here from the
    same two frames). It is read against "chance", the probability that two of the object's clean frames drawn at
    random from the whole video have the same shape: what a model that kept no identity across gaps would score.
    (evaluate adds "named": whether the caption names the object's colour, and so its shape, when it returns.)"""
    gaps = []
    for c, colour in enumerate(COLOURS):
        edges = np.diff(np.r_[0, det["present"][:, c].astype(int), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)   # runs of frames seen
        clean = np.flatnonzero(det["clean"][:, c])
        share = np.bincount(det["shape"][clean, c], minlength=len(SHAPE_ID)) / max(len(clean), 1)
        for (s0, e0), (s1, e1) in zip(zip(starts, ends), zip(starts[1:], ends[1:])):
            i, j = np.searchsorted(clean, e0), np.searchsorted(clean, s1)   # the last clean before, the first after
            seconds = (s1 - e0) / fps
            gap = {"colour": colour, "start": int(e0), "frames": int(s1 - e0), "seconds": seconds,
                   "bucket": next(name for top, name in GAP_BUCKETS if seconds < top), "scored": False, "match": None,
                   "shape_kept": None, "colour_kept": None, "far_scored": False, "far_match": None, "far_span": None,
                   "chance": float((share ** 2).sum())}
            if i > 0 and j < len(clean):
                a, b = clean[i - 1], clean[j]
                shape, same_colour = kept(det, c, a, b)
                gap.update(far_scored=True, far_match=shape and same_colour, far_span=(b - a) / fps)
                if a >= s0 and b < e1:   # clean in the runs next to the gap
                    gap.update(scored=True, match=shape and same_colour, shape_kept=shape, colour_kept=same_colour)
            gaps.append(gap)
    return gaps


def caption_objects(caption):
    """A caption -> named [8] (its colours) and want [8] (the SHAPE_ID of each named colour's shape, else -1)."""
    objs = parse_caption(caption)[0]
    return np.array([c in objs for c in COLOURS]), np.array([SHAPE_ID.get(objs.get(c), -1) for c in COLOURS])


def prompt_objects(det, named, want):
    """Per frame, does a video draw the objects its caption names? named, want [N, 8] (caption_objects of each
    frame). Returns "prompt colour", the share of the objects seen whose colour the caption names, and "prompt
    shape", the share of the clean objects in a named colour that have the caption's shape for it; NaN where
    there is nothing to score. 1 and 1 on ToyWorld's frames. A model that draws blobs in any palette colour keeps
    a high palette fidelity and scores low here; objects the caption names but the view does not show (off screen,
    behind the occluder) are not asked for."""
    colour = masked_mean(named, det["present"], 1)
    target = det["clean"] & named
    return colour, masked_mean(det["shape"] == want, target, 1)


def switch_conditions(det, caption):
    """Per frame, the three things a frame needs to match `caption` (prompt_switch): every object seen has a colour
    the caption names; every clean one has the caption's shape (prompt_objects; both true where undefined); more of
    its backdrop pixels are nearest the caption's backdrop colour than any other (backdrop_share; false for a frame
    with no backdrop pixel). Returns {"colour", "shape", "backdrop"}: boolean [N] each."""
    backdrop = parse_caption(caption)[1]
    share = np.nan_to_num(det["backdrop"])
    colour, shape = (np.nan_to_num(p, nan=1.0) for p in prompt_objects(det, *caption_objects(caption)))
    return {"colour": colour == 1, "shape": shape == 1,
            "backdrop": (share[:, backdrop] > 0) & (share[:, backdrop] == share.max(1))}


def prompt_switch(held, frame, end):
    """Frames from `frame` (where the caption changes) until the video matches the new caption (all of
    switch_conditions, `held`) for SWITCH_HOLD frames in a row (fewer if the video ends first), or None if it never
    does before `end`. An object the caption adds is not required to be seen: the world may bring it in out of
    view."""
    ok = np.logical_and.reduce(list(held.values()))
    return next((t - frame for t in range(frame, end) if ok[t:min(t + SWITCH_HOLD, end)].all()), None)


def switch_first_second(held, frame, end, fps):
    """Which part of a switch a video is slow at: over the first second after `frame` (cut at `end`), the share of
    frames meeting each of switch_conditions (`held`). All 1 on ToyWorld's own video; a video that keeps the old
    scene has backdrop 0 where the event changed the backdrop."""
    stop = min(end, frame + round(fps))
    return {name: float(h[frame:stop].mean()) for name, h in held.items()}


def psnr(video, truth):
    """Per frame: 10 log10(255^2 / MSE) over all pixels and channels of uint8 frames; PSNR_CAP for equal frames."""
    mse = ((video.astype(np.float64) - truth) ** 2).mean((1, 2, 3))
    return np.minimum(PSNR_CAP, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-30)))


def ssim(video, truth):
    """Per frame: the mean SSIM (Wang et al. 2004) of the luminance Y = 0.299 R + 0.587 G + 0.114 B (0..255) over
    the valid region of an 11x11 gaussian window (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2."""
    def blur(a):
        return sliding_window_view(sliding_window_view(a, 11, axis=-1) @ GAUSS, 11, axis=-2) @ GAUSS
    a, b = video.astype(np.float64) @ LUMA, truth.astype(np.float64) @ LUMA
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return (((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))).mean((1, 2))


def by_horizon(curve, fps):
    """Means of a continuation's per-frame curve by horizon H = 0.5 s, 1 s, 2 s, ...: over its frames h = 1, 2, ...
    (h / fps seconds after the context) with h / fps in (previous H, H]."""
    h, out, low, top = np.arange(1, len(curve) + 1) / fps, {}, 0.0, FIRST_HORIZON_S
    while low < h[-1]:
        out[f"{top:g}s"] = mean(curve[(h > low) & (h <= top)])
        low, top = top, 2 * top
    return out


def drift(curve, fps):
    """Drift summary of a per-frame curve: the means over its first and last WINDOW_S seconds (each at most half
    the video; NaN frames skipped), delta = last - first, abs_delta = |last - first| (Rolling Forcing's drift),
    and the least-squares slope of the curve against time, per minute."""
    y = np.asarray(curve, float)
    w = max(1, min(round(WINDOW_S * fps), len(y) // 2))
    first, last = mean(y[:w]), mean(y[-w:])
    t, ok = np.arange(len(y)) / (60 * fps), np.isfinite(y)
    slope = math.nan
    if ok.sum() >= 2:
        tc = t[ok] - t[ok].mean()
        slope = float((tc * (y[ok] - y[ok].mean())).sum() / (tc * tc).sum())
    return {"first": first, "last": last, "delta": last - first, "abs_delta": abs(last - first), "slope_per_min": slope}


def drift_share(curve, fps, world_value, noise_value):
    """|mean over the last SHARE_S seconds - mean over the first| of a per-frame curve (each window at most half
    the video; NaN frames skipped), as a share of |noise_value - world_value|: 0 holds still, 1 has moved as far
    as the world's own video is from noise. NaN where the curve or that distance leaves it undefined."""
    y = np.asarray(curve, float)
    w = max(1, min(round(SHARE_S * fps), len(y) // 2))
    scale = abs(noise_value - world_value)
    return abs(mean(y[-w:]) - mean(y[:w])) / scale if scale > 0 else math.nan


# ---- scoring a whole video --------------------------------------------------------------------------------------

def measure(frames, backdrop, min_area):
    """Pixel curves and the object table of every frame, BATCH frames at a time (each batch starts one frame
    early, so flicker has its previous frame)."""
    parts = []
    for lo in range(0, len(frames), BATCH):
        a, b = max(lo - 1, 0), lo + BATCH
        f, px = frames[a:b], classify(frames[a:b])
        flick, shift = flicker(f, px)
        part = {"palette_fidelity": palette_fidelity(px), "background_error": background_error(px, backdrop[a:b]),
                "flicker": flick, "shift": shift, "backdrop": backdrop_share(px), **objects(f, px, min_area)}
        parts.append({k: v[lo - a:] for k, v in part.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate(frames, world, fps, tf_start=0):
    """Every metric for uint8 frames [N, S, S, 3] of `world`'s scene (frame t described by world.caption(t)); with
    tf_start > 0, frames tf_start.. are also compared with the world's own frames (PSNR, SSIM by horizon)."""
    n = len(frames)
    captions = [world.caption(t) for t in range(n)]
    scenes = {c: parse_caption(c) for c in set(captions)}
    det = measure(frames, np.array([scenes[c][1] for c in captions]), MIN_AREA * (world.cfg.size / 32) ** 2)
    changed = np.array([False] + [a != b for a, b in zip(captions[1:], captions)])
    det["flicker"][changed], det["shift"][changed] = np.nan, 0   # a new background is not flicker
    limit = float(np.hypot(world.vx, world.vy).max()) + SPEED_SLACK
    speed, teleport, retention = motion(det, det["shift"], limit, max(2, min(round(RETENTION_S * fps), n // 2)))
    wanted = {c: caption_objects(c) for c in scenes}
    prompt_colour, prompt_shape = prompt_objects(det, np.array([wanted[c][0] for c in captions]),
                                                 np.array([wanted[c][1] for c in captions]))
    curves = {"palette_fidelity": det["palette_fidelity"], "colour_drift": colour_drift(det),
              "count_error": count_error(det, np.array([len(scenes[c][0]) for c in captions])),
              "background_error": det["background_error"], "flicker": det["flicker"], "speed": speed,
              "prompt_colour": prompt_colour, "prompt_shape": prompt_shape}
    gaps = identity_after_gap(det, fps)
    for g in gaps:   # a named object's shape is in the caption; an unnamed one's is memory's alone to keep
        g["named"] = bool(wanted[captions[g["start"] + g["frames"]]][0][COLOURS.index(g["colour"])])
    identity = {}
    for _, name in GAP_BUCKETS:
        got = [g for g in gaps if g["bucket"] == name]
        identity[name] = {"gaps": len(got), "scored": sum(g["scored"] for g in got),
                          "matched": sum(bool(g["match"]) for g in got),
                          "far_scored": sum(g["far_scored"] for g in got),
                          "far_matched": sum(bool(g["far_match"]) for g in got)}
    events = [(f, c) for f, c in world.events if f < n]
    switches = []
    for (f, c), end in zip(events, [f for f, _ in events[1:]] + [n]):
        held = switch_conditions(det, c)   # once per switch, read by both figures
        switches.append({"frame": f, "caption": c, "frames_to_match": prompt_switch(held, f, end),
                         "first_second": switch_first_second(held, f, end, fps)})
    scored = sum(g["scored"] for g in gaps)
    figures = {name: mean(c) for name, c in curves.items()}
    figures.update(motion_retention=retention, teleport_rate=teleport,
                   identity_match=sum(bool(g["match"]) for g in gaps) / scored if scored else math.nan,
                   gaps_scored=scored)
    result = {"frames": n, "fps": fps, "speed_limit": limit, "figures": figures, "identity": identity, "gaps": gaps,
              "prompt_switch": switches}
    summaries = {name: drift(c, fps) for name, c in curves.items()}
    if tf_start:
        truth = world.render(0, n)[tf_start:]
        for name, score in (("psnr", psnr), ("ssim", ssim)):
            c = score(frames[tf_start:], truth)
            figures[name], summaries[name] = mean(c), drift(c, fps)   # drift of the continuation alone
            result.setdefault("horizon", {})[name] = by_horizon(c, fps)
            curves[name] = np.r_[np.full(tf_start, np.nan), c]
    result.update(drift=summaries, curves=curves)
    return result


def noise_figures(world, seed=0):
    """The figures of NOISE_FRAMES frames of uniform random pixels scored against `world`'s scene: the far end
    that drift_share measures against."""
    S = world.cfg.size
    frames = np.random.default_rng(seed).integers(0, 256, (NOISE_FRAMES, S, S, 3), dtype=np.uint8)
    return evaluate(frames, world, world.cfg.fps)["figures"]


# ---- drawing: the PNG, with PIL alone (matplotlib is not a dependency) -----------------------------------------

def panel(pen, box, title, curves, colours):
    """One line plot in box = (x0, y0, x1, y1): the curves (one colour each) on a shared y-range, labelled with
    its ends; a curve's x runs over the longest curve's length, and NaN frames break its line."""
    x0, y0, x1, y1 = box
    curves = [np.asarray(c, float) for c in curves]
    finite = np.concatenate([c[np.isfinite(c)] for c in curves])
    lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    pen.rectangle(box, outline=(160, 160, 160))
    pen.text((x0, y0 - 13), title, fill="black")
    pen.text((2, y0 - 4), f"{hi:.3g}", fill="black")
    pen.text((2, y1 - 8), f"{lo:.3g}", fill="black")
    n = max(len(c) for c in curves)
    for c, colour in zip(curves, colours):
        xs = x0 + (x1 - x0) * np.arange(len(c)) / max(n - 1, 1)
        ys = y1 - (y1 - y0) * (c - lo) / ((hi - lo) or 1.0)
        ok = np.isfinite(c)
        for run in np.split(np.arange(len(c)), np.flatnonzero(np.diff(ok)) + 1):
            if ok[run[0]]:
                points = list(zip(xs[run].tolist(), ys[run].tolist()))
                pen.line(points * (2 if len(points) == 1 else 1), fill=colour, width=1)


def frame_strip(videos, fps) -> np.ndarray:
    """One row per video (uint8 [N, S, S, 3] each, equally long): 4 frames from each of the first, middle and
    last second, white-framed, scaled up to about 800 pixels wide."""
    n, sec = len(videos[0]), min(int(fps), len(videos[0]))
    picks = [int(i) for a in (0, (n - sec) // 2, n - sec) for i in np.linspace(a, a + sec - 1, 4).round()]
    rows = [np.concatenate([np.pad(v[i], ((2, 2), (2, 2), (0, 0)), constant_values=255) for i in picks], 1)
            for v in videos]
    strip = np.concatenate(rows, 0)
    k = max(1, round(800 / strip.shape[1]))
    return strip.repeat(k, 0).repeat(k, 1)


def draw(frames, curves, fps):
    """The PNG: 4 frames from each of the first, middle and last second, over one line plot per curve."""
    from PIL import Image, ImageDraw

    n = len(frames)
    strip = frame_strip([frames], fps)
    W, top, row = strip.shape[1], strip.shape[0], 64
    image = Image.new("RGB", (W, top + row * len(curves) + 24), "white")
    image.paste(Image.fromarray(strip))
    pen = ImageDraw.Draw(image)
    x0, x1 = 56, W - 8
    for i, (name, c) in enumerate(curves.items()):
        panel(pen, (x0, top + i * row + 18, x1, top + i * row + row - 6), name, [c], [(200, 40, 40)])
    pen.text((x0, image.size[1] - 14), "0 s", fill="black")
    pen.text((x1 - 40, image.size[1] - 14), f"{n / fps:.4g} s", fill="black")
    return image
