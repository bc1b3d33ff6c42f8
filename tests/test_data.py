"""Tests for data.py: ToyWorld's determinism, its ground truth against its own pixels, captions and events,
the gaps that long-memory evaluation relies on, and the deterministic mode."""

import numpy as np
import pytest

from data import (
    BACKDROP_COLOURS,
    BACKDROP_KINDS,
    OCCLUDER_RGB,
    PALETTE,
    SHAPES,
    VOCAB,
    DataError,
    ToyWorld,
    WorldConfig,
    backdrop_image,
    object_mask,
    sample_clips,
    shape_mask,
    to_float,
    to_uint8,
    tokenize,
)

FPS = WorldConfig().fps


def colour_pixels(frame, rgb):
    return np.all(frame == np.array(rgb, dtype=np.uint8), axis=-1)


def gaps(world, frames):
    """Lengths in frames of every run where an on-stage object is invisible between two frames where it is seen."""
    last_seen, found = {}, []
    for t in range(frames):
        on_stage = set()
        for obj in world.state(t)["objects"]:
            on_stage.add(obj["id"])
            if obj["visible"] > 0:
                if obj["id"] in last_seen and t - last_seen[obj["id"]] > 1:
                    found.append(t - last_seen[obj["id"]] - 1)
                last_seen[obj["id"]] = t
        last_seen = {i: t for i, t in last_seen.items() if i in on_stage}  # left the scene: not a gap
    return found


# -----------------------------------------------------------------------------
# determinism


def test_same_seed_same_frames_other_seed_differs():
    a, b = ToyWorld(3).render(0, 200), ToyWorld(3).render(0, 200)
    assert a.dtype == np.uint8 and a.shape == (200, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, ToyWorld(4).render(0, 200))
    assert ToyWorld(3).events == ToyWorld(3).events


@pytest.mark.parametrize("cfg", [WorldConfig(), WorldConfig(size=64), WorldConfig(deterministic=True)])
def test_slices_are_bit_identical(cfg):
    world = ToyWorld(11, cfg)
    assert np.array_equal(world.render(0, 100)[50:], world.render(50, 50))
    start = 7 * 60 * FPS + 13  # minutes in, past several events
    long = world.render(start, 300)
    for k in (1, 37, 150, 299):
        assert np.array_equal(long[k:], world.render(start + k, 300 - k))
    assert np.array_equal(long[5], world.render(start + 5, 1)[0])


def test_bad_sizes_are_refused():
    for size in (8, 20, 33):
        with pytest.raises(DataError, match="size"):
            WorldConfig(size=size)
    with pytest.raises(DataError):
        WorldConfig(max_objects=5)


# -----------------------------------------------------------------------------
# ground truth agrees with the pixels


def test_backgrounds_and_occluder_are_far_from_every_palette_colour():
    palette = np.array(list(PALETTE.values()), dtype=np.float64)
    for kind in BACKDROP_KINDS:
        for colour in BACKDROP_COLOURS:
            pixels = np.unique(backdrop_image(kind, colour, 64, 192).reshape(-1, 3), axis=0).astype(np.float64)
            pixels = np.concatenate([pixels, [OCCLUDER_RGB]])
            distance = np.linalg.norm(pixels[:, None] - palette[None], axis=-1)
            assert distance.min() > 60, (kind, colour)


@pytest.mark.parametrize("size", [32, 64])
def test_state_matches_pixels(size):
    partly, panned, occluded = 0, set(), 0
    for seed in range(8):
        world = ToyWorld(seed, WorldConfig(size=size))
        occluded += world.occluder is not None
        times = list(range(0, 180 * FPS, 41)) + list(range(40 * 60 * FPS, 40 * 60 * FPS + 400, 13))
        frames = {t: world.render(t, 1)[0] for t in times}
        for t, frame in frames.items():
            state = world.state(t)
            panned.add(state["camera"])
            assert state["t"] == t and state["caption"] == world.caption(t)
            assert len({obj["colour"] for obj in state["objects"]}) == len(state["objects"])
            background = world.background(t)
            drawn = np.zeros(frame.shape[:2], dtype=bool)
            for obj in state["objects"]:
                assert obj["rgb"] == PALETTE[obj["colour"]]
                mine = colour_pixels(frame, obj["rgb"])
                drawn |= mine
                area = shape_mask(obj["shape"], obj["size"]).sum()
                # visible is exactly the fraction of the shape's pixels that made it into the frame
                assert mine.sum() == round(obj["visible"] * area), (seed, t, obj)
                if obj["visible"] > 0:
                    ys, xs = np.nonzero(mine)
                    reach = obj["size"] + 1
                    assert np.abs(xs - obj["x"]).max() <= reach and np.abs(ys - obj["y"]).max() <= reach
                partly += 0 < obj["visible"] < 1
            # the frame is the background plus the objects, nothing else
            assert np.array_equal(frame[~drawn], background[~drawn])
    assert occluded >= 3 and len(panned) > 20 and partly > 20  # the pan and the occluder were really exercised


def test_object_mask_is_exactly_the_pixels_objects_cover():
    # object_mask reads the clip alone; the world's background (occluder included) says where objects are drawn
    drawn = 0
    for seed in range(6):
        world = ToyWorld(seed)
        frames = world.render(300, 12)
        truth = np.stack([(f != world.background(300 + i)).any(-1) for i, f in enumerate(frames)])
        assert (object_mask(to_float(frames)) == truth).all()
        drawn += truth.sum()
    assert drawn > 1000   # (some of the six views hold no object at these frames)


def test_caption_lists_the_objects_and_background_in_state():
    for seed in range(6):
        world = ToyWorld(seed)
        for t in list(range(0, 30 * 60 * FPS, 997)):
            state = world.state(t)
            caption = state["caption"]
            for obj in state["objects"]:
                assert f"{obj['colour']} {obj['shape']}" in caption
            assert sum(caption.split().count(shape) for shape in SHAPES) == len(state["objects"])
            assert 1 <= len(state["objects"]) <= 4
            back = state["background"]
            assert caption.endswith(f"{back['colour']} {back['kind']}")


def test_captions_change_exactly_at_events():
    world = ToyWorld(5)
    events = world.events
    assert [f for f, _ in events] == sorted(f for f, _ in events)
    assert events[-1][0] > 50 * 60 * FPS  # scheduled far ahead, not just for a training window
    gaps_s = np.diff([0] + [f for f, _ in events]) / FPS
    assert gaps_s.min() >= 10 and gaps_s.max() <= 40
    before = world.caption(0)
    for frame, caption in events[:25]:
        assert world.caption(frame - 1) == before != caption
        assert world.caption(frame) == caption == world.state(frame)["caption"]
        assert np.array_equal(world.render(frame, 1)[0], world.render(frame - 1, 2)[1])
        before = caption
    # between events nothing changes, so a caption change always means an event
    times = np.arange(0, events[10][0])
    changes = [t for t in times[1:] if world.caption(int(t)) != world.caption(int(t) - 1)]
    assert changes == [f for f, _ in events[:10]]


def test_tokenize_round_trip_and_vocab_covers_captions():
    captions = [world.caption(t) for world in map(ToyWorld, range(20)) for t in range(0, 20 * 60 * FPS, 4001)]
    ids = tokenize(captions)
    assert ids.dtype == np.int64 and ids.shape == (len(captions), 24)
    assert not (ids == 1).any()  # no caption word is unknown
    for caption, row in zip(captions, ids):
        assert " ".join(VOCAB[i] for i in row if i) == caption
    assert VOCAB[:2] == ["<pad>", "<unk>"] and len(set(VOCAB)) == len(VOCAB)
    assert not tokenize([""]).any()
    odd = tokenize(["A Red zebra.", "red " * 30], length=6)
    assert odd[0].tolist() == [VOCAB.index("a"), VOCAB.index("red"), 1, 0, 0, 0]
    assert odd[1].tolist() == [VOCAB.index("red")] * 6


# -----------------------------------------------------------------------------
# long memory: objects leave and come back


def test_objects_leave_the_view_and_come_back_after_short_and_long_gaps():
    found = [g for seed in range(3) for g in gaps(ToyWorld(seed), 5 * 60 * FPS)]
    assert found, "no object ever left the view and came back"
    assert min(found) < FPS  # under a second (passing behind the occluder, grazing the view's edge)
    assert max(found) > 10 * FPS  # more than ten seconds off screen


# -----------------------------------------------------------------------------
# deterministic mode


def reflect(p, lo, hi):
    return 2 * hi - p if p > hi else 2 * lo - p if p < lo else p


def test_deterministic_mode_is_a_pure_bounce():
    size = 32
    for seed in range(6):
        world = ToyWorld(seed, WorldConfig(deterministic=True, size=size))
        assert world.events == [] and world.occluder is None
        states = [world.state(t) for t in range(400)]
        for obj in states[0]["objects"]:  # everything starts fully inside the view
            lo, hi = obj["size"], size - 1 - obj["size"]
            assert lo <= obj["x"] <= hi and lo <= obj["y"] <= hi
        for now, nxt in zip(states, states[1:]):
            assert now["camera"] == 0 and now["caption"] == states[0]["caption"]
            for a, b in zip(now["objects"], nxt["objects"]):
                r = a["size"]
                assert a["x"] == int(a["x"]) and a["vx"] == int(a["vx"]) != 0  # whole pixels: no rounding anywhere
                assert (abs(b["vx"]), abs(b["vy"])) == (abs(a["vx"]), abs(a["vy"]))  # constant speed
                assert b["x"] == reflect(a["x"] + a["vx"], r, size - 1 - r)
                assert b["y"] == reflect(a["y"] + a["vy"], r, size - 1 - r)


# -----------------------------------------------------------------------------
# tensors and batches


def test_float_conversion_round_trips():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 5, 16, 24, 3), dtype=np.uint8)
    x = to_float(frames)
    assert x.dtype == np.float32 and x.shape == (2, 5, 3, 16, 24) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), frames)
    assert np.array_equal(to_uint8(np.full((3, 2, 2), 7.0)), np.full((2, 2, 3), 255, dtype=np.uint8))


def test_sample_clips():
    cfg = WorldConfig(size=64)
    x, captions = sample_clips(np.random.default_rng(0), 4, 12, cfg)
    assert x.shape == (4, 12, 3, 64, 64) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and len(captions) == 4
    assert not (tokenize(captions) == 1).any()
    y, again = sample_clips(np.random.default_rng(0), 4, 12, cfg)
    assert np.array_equal(x, y) and captions == again


def test_event_clips_cross_one_event_at_a_chunk_start_with_a_caption_per_frame():
    cfg, chunk = WorldConfig(size=32), 3
    rng = np.random.default_rng(1)
    x, captions = sample_clips(rng, 6, 12, cfg, events=1.0, chunk=chunk)
    assert x.shape == (6, 12, 3, 32, 32) and all(len(c) == 12 for c in captions)
    for clip in captions:
        changes = [i for i in range(1, 12) if clip[i] != clip[i - 1]]
        assert len(changes) == 1 and changes[0] % chunk == 0   # one event, where a chunk starts, after the first
    # with events 0 most clips show one scene, and each frame's caption is still its own frame's
    seeds = np.random.default_rng(2)
    x, captions = sample_clips(np.random.default_rng(2), 3, 12, cfg, events=0.0)
    for b, clip in enumerate(captions):
        world = ToyWorld(int(seeds.integers(2**31)), cfg)
        seeds.random()   # the draw that would place the clip across an event
        start = int(seeds.integers(0, 180 * cfg.fps))
        assert clip == [world.caption(start + i) for i in range(12)]
        assert np.array_equal(x[b], to_float(world.render(start, 12)))
