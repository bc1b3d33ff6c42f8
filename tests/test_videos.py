"""Tests for videos.py: a folder of gif and mp4 files loads at the training size with its captions, and bad
folders fail with one line that names them."""

import numpy as np
import pytest

from data import DataError, to_uint8
from videos import VideoFolder


def banded_video(frames, rgb):
    """80x48 frames: a colour in the middle square, blue bands left and right that a centre crop removes. A pixel
    in the band changes every frame, since GIF writers merge identical frames."""
    video = np.zeros((frames, 48, 80, 3), dtype=np.uint8)
    video[:] = (0, 0, 255)
    video[:, :, 16:64] = rgb
    video[:, 0, 0, 0] = np.arange(frames) * 10
    return video


def test_video_folder_loads_gif_and_mp4(tmp_path, capsys):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "red.gif", banded_video(10, (255, 0, 0)), plugin="pillow", duration=100, loop=0)
    iio.imwrite(tmp_path / "green.mp4", banded_video(20, (0, 255, 0)), plugin="FFMPEG", fps=8)
    (tmp_path / "green.txt").write_text("a green square\n")
    (tmp_path / "notes.md").write_text("not a video")
    folder = VideoFolder(str(tmp_path), size=32, frames=8)
    assert len(folder.videos) == 2
    x, captions = folder.sample(np.random.default_rng(0), 16)
    assert x.shape == (16, 8, 3, 32, 32) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    assert set(captions) == {"", "a green square"}
    for clip, caption in zip(to_uint8(x), captions):
        mean = clip.reshape(-1, 3).mean(axis=0)
        expected = (0, 255, 0) if caption else (255, 0, 0)
        assert np.abs(mean - expected).max() < 25  # cropped to the centre square, no blue left
    assert capsys.readouterr().err == ""


def test_video_folder_errors_name_the_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        VideoFolder(str(missing), 32, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        VideoFolder(str(empty), 32, 8)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "clip.mp4").write_bytes(b"this is not a video" * 50)
    with pytest.raises(DataError, match=str(broken)):
        VideoFolder(str(broken), 32, 8)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "clip.mp4" in warning[0]  # one line per unreadable file


def test_video_folder_too_short_and_bad_size(tmp_path):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "short.gif", banded_video(4, (255, 0, 0)), plugin="pillow", duration=100, loop=0)
    with pytest.raises(DataError, match="4"):
        VideoFolder(str(tmp_path), 32, 8)
    with pytest.raises(DataError, match="size"):
        VideoFolder(str(tmp_path), 30, 2)
