"""
A folder of your own videos as training data (train.py --data DIR), in place of ToyWorld: every video in the
folder and its subfolders, decoded once, centre-cropped to a square, resized to the training size and kept in
memory; a NAME.txt beside a video is its caption. VideoFolder.sample has sample_clips' contract (data.py).
"""

import sys
from pathlib import Path

import numpy as np

from data import DataError, to_float

VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")


def read_video(path, size):
    """All frames of a video file, centre-cropped to a square and resized: uint8 [n, size, size, 3]."""
    import imageio.v3 as iio  # imported here so that the world above needs nothing but numpy
    from PIL import Image

    plugin = "pillow" if path.suffix.lower() == ".gif" else "FFMPEG"
    frames = []
    for frame in iio.imiter(path, plugin=plugin):  # one frame at a time: full-size frames are never all in memory
        image = Image.fromarray(frame).convert("RGB")
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        frames.append(np.asarray(image))
    if not frames:
        raise ValueError("no frames")
    return np.stack(frames)


class VideoFolder:
    """Every video in a folder (and its subfolders), decoded once and kept in memory at training size."""

    def __init__(self, root: str, size: int, frames: int):
        self.root, self.size, self.frames = Path(root), size, frames
        if size < 16 or size % 8:
            raise DataError(f"frame size must be at least 16 and divisible by 8, got {size}")
        if frames < 1:
            raise DataError(f"clips need at least 1 frame, got {frames}")
        if not self.root.is_dir():
            raise DataError(f"video folder {root} does not exist or is not a folder")
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if not paths:
            raise DataError(f"video folder {root} has no video files ({' '.join(VIDEO_EXTENSIONS)})")
        self.videos, self.captions, readable, longest = [], [], 0, 0
        for path in paths:
            try:
                video = read_video(path, size)
            except Exception as e:  # a broken file should cost a warning, not the whole run
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"warning: skipping {path}: cannot read it ({reason})", file=sys.stderr)
                continue
            readable += 1
            longest = max(longest, len(video))
            if len(video) < frames:
                print(f"warning: skipping {path}: {len(video)} frames, clips need {frames}", file=sys.stderr)
                continue
            sidecar = path.with_suffix(".txt")
            self.videos.append(video)
            self.captions.append(sidecar.read_text().strip() if sidecar.is_file() else "")
        if not readable:
            raise DataError(f"none of the {len(paths)} video files in {root} could be read")
        if not self.videos:
            raise DataError(f"no video in {root} has {frames} frames (the longest has {longest})")

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, list[str]]:
        """Same contract as sample_clips: float32 [B, frames, 3, size, size] in [-1, 1] and the captions."""
        out = np.empty((batch, self.frames, 3, self.size, self.size), dtype=np.float32)
        captions = []
        for b in range(batch):
            k = int(rng.integers(len(self.videos)))
            start = int(rng.integers(0, len(self.videos[k]) - self.frames + 1))
            out[b] = to_float(self.videos[k][start : start + self.frames])
            captions.append(self.captions[k])
        return out, captions
