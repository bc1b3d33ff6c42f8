"""
ToyWorld: a procedural video world with exact ground truth (a folder of your own videos: videos.py).

Why a toy world? Long-video methods are judged on two things that are hard to measure on real footage:
drift (does minute 5 still look like minute 0?) and long memory (when the red circle comes back after 20
seconds off screen, is it still a red circle, and is it where it should be?). ToyWorld makes both measurable.

- Coloured shapes bounce over a procedural background. Colour is identity: no two objects in a world share a
  colour, and every object is drawn with the exact palette RGB (no anti-aliasing), while every background
  pixel is far from every palette colour. So any frame, real or generated, can be parsed back into objects.
- A camera pans slowly back and forth over a world wider than the view, and a dark bar fixed in the view hides
  whatever passes behind it. Objects leave the view and come back after gaps from under a second to tens of
  seconds, which is exactly the range long-memory methods claim to cover.
- Scheduled events (an object enters, one leaves, the background changes) change the scene and its caption
  at the same frame: prompt switching with a known right answer.
- Every frame is computed directly from its index in closed form (bouncing is a triangle wave, the camera a
  cosine), so frame 60,000 costs the same as frame 0 and any slice of the stream is bit-identical to the same
  frames cut out of a longer render. state(t) returns the full ground truth of frame t.

With deterministic=True there is no camera motion, no occluder and no event: objects start inside the view,
move by whole pixels at constant velocity and bounce off the view's walls, so from two consecutive frames the
continuation has exactly one right answer.

The world is numpy only.
"""

import functools
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

# -----------------------------------------------------------------------------
# constants: what can appear in a world and the words that describe it

# Object colours. Saturated and bright, so they are easy to tell apart from each other and from the muted
# backgrounds below. A world never uses one colour twice, so the colour names the object.
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "ring")

# Background colours are muted and have their own names, so a caption word never means both an object colour
# and a background colour. Patterns mix the base colour with a darker shade of it (BACKDROP_SHADE); all of
# those pixels stay more than 60 RGB units (L2) from every palette colour (tests/test_data.py checks this).
BACKDROP_COLOURS = {
    "grey": (110, 110, 115),
    "brown": (120, 90, 65),
    "olive": (105, 110, 60),
    "navy": (55, 65, 115),
    "plum": (105, 70, 105),
    "teal": (55, 105, 105),
}
BACKDROP_KINDS = ("stripes", "checks", "gradient", "dots")
BACKDROP_SHADE = 0.7
OCCLUDER_RGB = (35, 35, 40)  # the bar objects pass behind: a dark, background-like colour

# Every word any caption can use. Index 0 pads, index 1 stands for any word a user prompt has that we don't.
VOCAB = ["<pad>", "<unk>", "a", "an", "and", "over", *PALETTE, *SHAPES, *BACKDROP_COLOURS, *BACKDROP_KINDS]
WORD_ID = {word: i for i, word in enumerate(VOCAB)}


def caption_words(caption: str) -> list[str]:
    """The words of a caption as tokenize reads them: lower-cased, outer punctuation stripped."""
    return [w for w in (word.strip(".,;:!?\"'") for word in caption.lower().split()) if w]


def unknown_words(caption: str) -> list[str]:
    """The words of a caption that are not in VOCAB (tokenize reads each as <unk>), in order, once each."""
    return list(dict.fromkeys(w for w in caption_words(caption) if w not in WORD_ID))


def tokenize(captions: list[str], length: int = 24) -> np.ndarray:
    """Lower-cased words -> VOCAB ids, int64 [B, length]; unknown words -> 1, padding -> 0; "" is all zeros."""
    ids = np.zeros((len(captions), length), dtype=np.int64)
    for i, caption in enumerate(captions):
        row = [WORD_ID.get(word, 1) for word in caption_words(caption)][:length]
        ids[i, : len(row)] = row
    return ids


class DataError(Exception):
    """Bad user input (a missing or unreadable video folder, an impossible size). The message is one line."""


# -----------------------------------------------------------------------------
# config


@dataclass
class WorldConfig:
    size: int = 32  # frames are size x size RGB
    fps: int = 16  # frames per second of world time
    deterministic: bool = False  # no camera, occluder or events; integer constant-velocity bounces
    min_objects: int = 1  # objects in the scene at any time (events keep the count in this range)
    max_objects: int = 4
    world_width: float = 2.0  # the world is this many views wide; the camera pans across it
    event_min_s: float = 10.0  # seconds between scheduled scene events, drawn uniformly in [min, max]
    event_max_s: float = 40.0
    occluder_prob: float = 0.7  # chance that a world has the occluding bar
    horizon_s: float = 3600.0  # events are scheduled this far ahead; after that the last scene holds

    def __post_init__(self):
        if self.size < 16 or self.size % 8:
            raise DataError(f"frame size must be at least 16 and divisible by 8, got {self.size}")
        if self.fps < 1:
            raise DataError(f"fps must be at least 1, got {self.fps}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            counts = f"{self.min_objects}, {self.max_objects}"
            raise DataError(f"need 1 <= min_objects <= max_objects <= 4, got {counts}")
        if self.world_width < 1:
            raise DataError(f"world_width must be at least 1 (one view), got {self.world_width}")
        if not 0 < self.event_min_s <= self.event_max_s:
            raise DataError(f"need 0 < event_min_s <= event_max_s, got {self.event_min_s}, {self.event_max_s}")


# -----------------------------------------------------------------------------
# helpers: shape masks, background images, closed-form motion, pasting


@functools.lru_cache(maxsize=None)
def shape_mask(shape, r):
    """Boolean [2r+1, 2r+1] mask of a shape of radius r centred in the box. Cached: worlds share them."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = xx * xx + yy * yy
    if shape == "circle":
        mask = d2 <= r * r + r  # r*r + r rounds the rim the way a midpoint circle does
    elif shape == "square":
        half = round(0.8 * r)  # a bit smaller than the box so its area is close to the circle's
        mask = (np.abs(xx) <= half) & (np.abs(yy) <= half)
    elif shape == "triangle":
        mask = 2 * np.abs(xx) <= yy + r  # apex at the top, base on the bottom row
    elif shape == "ring":
        mask = (d2 <= r * r + r) & (d2 > (0.55 * r) ** 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=None)
def backdrop_image(kind, colour, height, width):
    """uint8 [height, width, 3]: the background pattern over the whole world. Static in world coordinates, so it
    only moves on screen when the camera pans, and a view is a slice of it."""
    base = np.array(BACKDROP_COLOURS[colour], dtype=np.float64)
    dark = base * BACKDROP_SHADE
    yy, xx = np.mgrid[0:height, 0:width]
    unit = height // 8  # pattern scale follows the frame size, so 32 and 64 look alike
    if kind == "stripes":
        on = (xx + yy) // unit % 2 == 1  # diagonal, so both pan and vertical position are visible in it
    elif kind == "checks":
        on = (xx // (2 * unit) + yy // (2 * unit)) % 2 == 1
    elif kind == "dots":
        period = 2 * unit
        shift = (yy // period % 2) * (period // 2)  # every other row of dots is offset by half a period
        dx = (xx + shift) % period - period // 2
        dy = yy % period - period // 2
        on = dx * dx + dy * dy <= (0.3 * period) ** 2
    elif kind == "gradient":
        f = np.linspace(0.0, 1.0, width)[None, :, None]  # left to right over the world, so pan shows as a shift
        return _freeze(np.round(base * (1 - f) + dark * f).astype(np.uint8).repeat(height, axis=0))
    else:
        raise ValueError(f"unknown background {kind!r}")
    return _freeze(np.where(on[..., None], dark, base).round().astype(np.uint8))


def _freeze(a):
    a.setflags(write=False)
    return a


def bounce(p0, v, lo, hi, t):
    """Closed-form elastic bounce: the position p0 + v t folded into [lo, hi] (a triangle wave), and the signed
    velocity at t. No stepping from t = 0, so any frame costs the same. Broadcasts over arrays."""
    span = hi - lo
    u = np.mod(p0 - lo + v * t, 2 * span)
    going_out = u < span  # first half of the period: moving the way v points; second half: reflected
    return lo + np.where(going_out, u, 2 * span - u), np.where(going_out, v, -v)


def paste(canvas, mask, cx, cy, value):
    """canvas[mask placed with its centre at pixel (cx, cy)] = value, clipped at the canvas edges. Works for an
    RGB frame (value = colour) or a 2-D label map (value = object id)."""
    r = mask.shape[0] // 2
    h, w = canvas.shape[:2]
    x0, y0 = cx - r, cy - r
    a0, a1 = max(x0, 0), min(x0 + 2 * r + 1, w)
    b0, b1 = max(y0, 0), min(y0 + 2 * r + 1, h)
    if a0 < a1 and b0 < b1:
        canvas[b0:b1, a0:a1][mask[b0 - y0 : b1 - y0, a0 - x0 : a1 - x0]] = value


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def describe(objects, backdrop):
    """The caption of a scene, e.g. 'a red circle and a blue ring over olive stripes'."""
    kind, colour = backdrop
    things = " and ".join(f"{article(c)} {c} {s}" for c, s in objects)
    ground = f"{article(colour)} {colour} gradient" if kind == "gradient" else f"{colour} {kind}"
    return f"{things} over {ground}"


# -----------------------------------------------------------------------------
# the world


class ToyWorld:
    """One endless procedural video, fixed by its seed. Frames are computed from their index alone."""

    def __init__(self, seed: int, cfg: WorldConfig = WorldConfig()):
        self.seed, self.cfg = seed, cfg
        rng = np.random.default_rng(seed)
        S = cfg.size
        self.width = S if cfg.deterministic else max(S, round(cfg.world_width * S))

        # The object pool: a couple more objects than can be on stage, so "enter" events can bring in new
        # identities and old ones can come back. Ids are pool indices, stable for the whole stream.
        pool = min(len(PALETTE), cfg.max_objects + 2)
        self.colours = [str(c) for c in rng.choice(list(PALETTE), size=pool, replace=False)]
        self.shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=pool)]
        self.rgb = [np.array(PALETTE[c], dtype=np.uint8) for c in self.colours]
        self.radius = [max(3, round(S * f)) for f in rng.uniform(0.1, 0.16, size=pool)]
        self.masks = [shape_mask(s, r) for s, r in zip(self.shapes, self.radius)]
        self.area = np.array([m.sum() for m in self.masks])

        # Motion: each object's centre bounces in the box that keeps its whole mask inside the world.
        r = np.array(self.radius, dtype=np.float64)
        self.lo_x, self.hi_x = r, self.width - 1 - r
        self.lo_y, self.hi_y = r, S - 1 - r
        self.x0 = self.lo_x + rng.uniform(size=pool) * (self.hi_x - self.lo_x)
        self.y0 = self.lo_y + rng.uniform(size=pool) * (self.hi_y - self.lo_y)
        speed = S * np.exp(rng.uniform(np.log(0.008), np.log(0.04), size=pool))  # world pixels per frame
        angle = rng.uniform(0.25, 1.3, size=pool)  # away from pure horizontal/vertical, so both walls are hit
        self.vx = speed * np.cos(angle) * rng.choice([-1, 1], size=pool)
        self.vy = speed * np.sin(angle) * rng.choice([-1, 1], size=pool)
        if cfg.deterministic:
            # whole-pixel positions and velocities: no rounding, so two frames pin down the future exactly
            self.x0, self.y0 = np.round(self.x0), np.round(self.y0)
            self.vx = np.sign(self.vx) * np.maximum(1, np.round(np.abs(self.vx)))
            self.vy = np.sign(self.vy) * np.maximum(1, np.round(np.abs(self.vy)))

        # Camera: left edge of the view in world pixels, a slow cosine sweep across the whole world.
        self.pan_period = cfg.fps * rng.uniform(30, 90)  # frames for one full back-and-forth
        self.pan_phase = rng.uniform(0, 2 * math.pi)

        # Occluder: a full-height bar fixed in the view, drawn over the objects, so they pass behind it.
        self.occluder = None
        if not cfg.deterministic and rng.uniform() < cfg.occluder_prob:
            w = int(rng.integers(S // 8, S // 4 + 1))
            x = int(rng.integers(S // 8, S - S // 8 - w + 1))
            self.occluder = (x, 0, x + w, S)  # (x0, y0, x1, y1) in view pixels, end exclusive

        # Scenes: which objects are on stage and which background, from each event's frame on. The whole
        # schedule is drawn now (an hour is ~150 events), so render, state and caption read the same table.
        # Its random numbers are drawn in one go because a world is built for every training clip.
        count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        stage = sorted(int(i) for i in rng.choice(pool, size=count, replace=False))
        backdrops = [(kind, colour) for kind in BACKDROP_KINDS for colour in BACKDROP_COLOURS]
        backdrop = backdrops[rng.integers(len(backdrops))]
        self.scene_starts, self.scenes = [0], [(tuple(stage), backdrop)]
        n = 0 if cfg.deterministic else int(cfg.horizon_s / cfg.event_min_s) + 1
        gaps = np.maximum(1, np.round(cfg.fps * rng.uniform(cfg.event_min_s, cfg.event_max_s, size=n)))
        for t, (p, q) in zip(np.cumsum(gaps).astype(np.int64).tolist(), rng.uniform(size=(n, 2)).tolist()):
            if t >= cfg.horizon_s * cfg.fps:
                break
            kinds = ["background"]
            if len(stage) < cfg.max_objects:
                kinds.append("enter")
            if len(stage) > cfg.min_objects:
                kinds.append("leave")
            kind = kinds[int(p * len(kinds))]
            if kind == "enter":
                offstage = [i for i in range(pool) if i not in stage]
                stage = sorted(stage + [offstage[int(q * len(offstage))]])
            elif kind == "leave":
                gone = stage[int(q * len(stage))]
                stage = [i for i in stage if i != gone]
            else:  # a different background, so the caption always changes at an event
                options = [b for b in backdrops if b != backdrop]
                backdrop = options[int(q * len(options))]
            self.scene_starts.append(t)
            self.scenes.append((tuple(stage), backdrop))
        self.captions = [self._describe(k) for k in range(len(self.scenes))]
        self.events = list(zip(self.scene_starts[1:], self.captions[1:]))  # (frame, new caption), sorted
        self._starts = np.array(self.scene_starts)

    def _describe(self, k):
        stage, backdrop = self.scenes[k]
        return describe([(self.colours[i], self.shapes[i]) for i in stage], backdrop)

    def _scene(self, t):
        return np.searchsorted(self._starts, t, side="right") - 1

    def _camera(self, t):
        if self.width == self.cfg.size:
            return np.zeros_like(t)
        sweep = 0.5 - 0.5 * np.cos(2 * math.pi * t / self.pan_period + self.pan_phase)
        return np.floor((self.width - self.cfg.size) * sweep + 0.5).astype(np.int64)

    def _motion(self, t):
        """World-pixel positions and velocities of every pool object at frames t: four arrays [len(t), pool]."""
        t = t[:, None].astype(np.float64)
        x, vx = bounce(self.x0, self.vx, self.lo_x, self.hi_x, t)
        y, vy = bounce(self.y0, self.vy, self.lo_y, self.hi_y, t)
        return x, y, vx, vy

    def _backdrop(self, k):
        return backdrop_image(*self.scenes[k][1], self.cfg.size, self.width)

    def _cover(self, frames):
        if self.occluder is not None:
            x0, y0, x1, y1 = self.occluder
            frames[..., y0:y1, x0:x1, :] = OCCLUDER_RGB

    def render(self, start: int, n: int) -> np.ndarray:
        """uint8 [n, size, size, 3]: frames start .. start+n-1. Cost depends on n only, never on start."""
        if start < 0 or n < 0:
            raise ValueError(f"render needs start >= 0 and n >= 0, got {start}, {n}")
        S = self.cfg.size
        t = np.arange(start, start + n)
        scene, cam = self._scene(t).tolist(), self._camera(t)
        x, y, _, _ = self._motion(t)
        # round to the pixel grid in world coordinates, then shift by the (whole-pixel) camera
        cx = (np.floor(x + 0.5).astype(np.int64) - cam[:, None]).tolist()
        cy = np.floor(y + 0.5).astype(np.int64).tolist()
        cam = cam.tolist()
        out = np.empty((n, S, S, 3), dtype=np.uint8)
        for i in range(n):
            frame = out[i]
            frame[:] = self._backdrop(scene[i])[:, cam[i] : cam[i] + S]
            for j in self.scenes[scene[i]][0]:  # in id order: the higher id is drawn on top
                paste(frame, self.masks[j], cx[i][j], cy[i][j], self.rgb[j])
        self._cover(out)
        return out

    def background(self, t: int) -> np.ndarray:
        """uint8 [size, size, 3]: the view at frame t without any object (occluder included)."""
        S, k, cam = self.cfg.size, int(self._scene(t)), int(self._camera(np.array(t)))
        frame = self._backdrop(k)[:, cam : cam + S].copy()
        self._cover(frame)
        return frame

    def caption(self, t: int) -> str:
        return self.captions[int(self._scene(t))]

    def state(self, t: int) -> dict:
        """Ground truth of frame t. Positions are object centres in view pixels; velocities are the objects' own
        motion in world pixels per frame (the camera adds its own shift on screen)."""
        S, k, cam = self.cfg.size, int(self._scene(t)), int(self._camera(np.array(t)))
        stage, (kind, colour) = self.scenes[k]
        x, y, vx, vy = (a[0] for a in self._motion(np.array([t])))
        # Label each pixel with the object drawn there, exactly as render does, to get the visible fraction.
        owner = np.full((S, S), -1, dtype=np.int16)
        for j in stage:
            paste(owner, self.masks[j], int(np.floor(x[j] + 0.5)) - cam, int(np.floor(y[j] + 0.5)), j)
        if self.occluder is not None:
            x0, y0, x1, y1 = self.occluder
            owner[y0:y1, x0:x1] = -1
        drawn = np.bincount(owner[owner >= 0], minlength=len(self.masks))
        objects = [
            {
                "id": j,
                "shape": self.shapes[j],
                "colour": self.colours[j],
                "rgb": PALETTE[self.colours[j]],
                "x": float(x[j] - cam),
                "y": float(y[j]),
                "size": self.radius[j],
                "vx": float(vx[j]),
                "vy": float(vy[j]),
                "visible": float(drawn[j] / self.area[j]),
            }
            for j in stage
        ]
        return {
            "t": int(t),
            "caption": self.captions[k],
            "camera": cam,
            "background": {"kind": kind, "colour": colour},
            "occluder": self.occluder,
            "objects": objects,
        }


# -----------------------------------------------------------------------------
# tensors for the model


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]."""
    return np.ascontiguousarray(np.moveaxis(frames.astype(np.float32) / 127.5 - 1.0, -1, -3))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]; out-of-range values are clipped."""
    pixels = np.clip(np.round((np.asarray(x, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(pixels, -3, -1))


def sample_clips(
    rng: np.random.Generator, batch: int, frames: int, cfg: WorldConfig, events: float | None = None, chunk: int = 1
) -> tuple[np.ndarray, list]:
    """Training batch: `batch` random worlds, a random window of `frames` frames in each, starting anywhere in
    the first three minutes. Returns float32 [B, frames, 3, H, W] in [-1, 1] and each window's first caption.

    events: None for that; a share in [0, 1] returns a caption per frame (a list of `frames` per clip) and places
    that share of the windows across one of the world's scene events, the event at a chunk boundary after the
    first chunk, so the model sees a caption change mid-clip as a prompt switch changes it mid-stream."""
    S = cfg.size
    out = np.empty((batch, frames, 3, S, S), dtype=np.float32)
    captions = []
    for b in range(batch):
        world = ToyWorld(int(rng.integers(2**31)), cfg)
        if events is not None and rng.random() < events:
            starts = [f for f, _ in world.events if frames <= f < 180 * cfg.fps]
            assert starts, "every world has an event in its first three minutes (event_max_s <= 180)"
            start = int(rng.choice(starts)) - chunk * int(rng.integers(1, frames // chunk))
        else:
            start = int(rng.integers(0, 180 * cfg.fps))
        out[b] = to_float(world.render(start, frames))
        captions.append(world.caption(start) if events is None else [world.caption(start + i) for i in range(frames)])
    return out, captions


def object_mask(clips: np.ndarray) -> np.ndarray:
    """Which pixels of ToyWorld clips float32 [..., 3, H, W] in [-1, 1] belong to an object: bool [..., H, W].
    Exact, because objects are drawn in the exact palette RGB and no background or occluder pixel is near one."""
    px = np.round((clips + 1.0) * 127.5).astype(np.int16)   # back to the uint8 values they were rendered as
    pal = np.array(list(PALETTE.values()), np.int16)[:, :, None, None]   # (P, 3, 1, 1)
    return (px[..., None, :, :, :] == pal).all(-3).any(-3)


def colour_lines() -> tuple[np.ndarray, np.ndarray]:
    """float64 [K, 3] starts and ends of the lines in RGB space that hold every colour a ToyWorld frame can show,
    each colour being start + f (end - start) for one line and some f in [0, 1] (up to rounding): each palette
    colour and the occluder (lines of length 0), then each backdrop's line from its base to its shade, which holds
    its pattern's two colours and every colour of its gradient. Lines of length 0 come first."""
    points = np.array([*PALETTE.values(), OCCLUDER_RGB], np.float64)
    bases = np.array(list(BACKDROP_COLOURS.values()), np.float64)
    return np.concatenate([points, bases]), np.concatenate([points, bases * BACKDROP_SHADE])


# -----------------------------------------------------------------------------
# demo and benchmark: python data.py

if __name__ == "__main__":
    world = ToyWorld(0)
    print(f"seed 0 at t=0: {world.caption(0)}")
    for frame, caption in world.events[:3]:
        print(f"  at {frame / world.cfg.fps:6.1f} s: {caption}")
    for obj in world.state(0)["objects"]:
        where = f"({obj['x']:.1f}, {obj['y']:.1f})"
        print(f"  id {obj['id']}: {obj['colour']} {obj['shape']} at {where}, visible {obj['visible']:.2f}")
    n = 2000
    for size in (32, 64):
        world = ToyWorld(0, WorldConfig(size=size))
        world.render(0, 16)  # build the cached background and masks outside the timing
        t0 = time.perf_counter()
        world.render(0, n)
        dt = time.perf_counter() - t0
        print(f"{size}x{size}: {n} frames ({n / world.cfg.fps:.0f} s of world time) in {dt:.3f} s, "
              f"{n / dt:,.0f} frames/s on one core")
    if len(sys.argv) > 1:   # python data.py STRIP.png: one row of frames, 1.5 s apart, per seed
        from PIL import Image

        pad = ((0, 0), (1, 1), (1, 1), (0, 0))   # a white line between frames
        rows = [np.concatenate(list(np.pad(ToyWorld(seed, WorldConfig(size=64)).render(0, 24 * 8)[::24], pad,
                                           constant_values=255)), axis=1) for seed in (1, 3, 6)]
        strip = np.concatenate(rows, axis=0)
        Image.fromarray(strip).resize((2 * strip.shape[1], 2 * strip.shape[0]), Image.NEAREST).save(sys.argv[1])
        print(f"wrote {sys.argv[1]}")
