"""The two commands end to end: train -> checkpoint -> resume -> stream to mp4, DDP, and clear errors."""

import os
import socket
import subprocess
import sys

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


def test_resume_continues_exactly(tmp_path):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    assert run("train.py", "--tiny", "--steps", "8", "--out", straight).returncode == 0
    assert run("train.py", "--tiny", "--steps", "4", "--out", split).returncode == 0
    r = run("train.py", "--tiny", "--steps", "8", "--out", split, "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout and "at step 4" in r.stdout, r.stdout + r.stderr
    a = torch.load(os.path.join(straight, "ckpt_0000008.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt_0000008.pt"), weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_bad_input_gives_one_clear_line(trained, tmp_path):
    one_line_error(run("train.py", "--method", "nonsense", "--tiny"), "unknown --method")
    one_line_error(run("train.py", "--method", "self", "--tiny"), "not built yet")
    one_line_error(run("sample.py", "--ckpt", str(tmp_path / "missing.pt")), "not found")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint" * 100)
    one_line_error(run("sample.py", "--ckpt", str(bad)), "cannot read checkpoint")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(b"\x00" * 1000)
    one_line_error(run("train.py", "--tiny", "--steps", "1", "--data", str(videos), "--out", str(tmp_path / "r")),
                   str(videos))
    if not os.path.exists(os.path.join(ROOT, "checkpoints", "default.pt")):   # until a default model is shipped
        one_line_error(run("sample.py", "--seconds", "1"), "train.py")
    out = tmp_path / "zero.mp4"
    one_line_error(run("sample.py", "--ckpt", trained, "--seconds", "0", "--out", str(out)), "seconds")
    assert not out.exists()


def _ddp_worker(rank, world_size, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, ROOT)
    import train

    torch.set_num_threads(1)
    args = train.parse(["--method", "teacher", "--tiny", "--steps", "3", "--batch", "4", "--device", "cpu",
                        "--out", os.path.join(out, "run"), "--seed", "1"])
    model = train.train(args)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_identical_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    start = torch.load(tmp_path / "run" / "ckpt_0000003.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert start["step"] == 3


def test_resampling_trains_end_to_end_then_streams(tmp_path):
    out = str(tmp_path / "rs")
    r = run("train.py", "--method", "resampling", "--tiny", "--steps", "4", "--resample-warmup", "1", "--topk", "1",
            "--out", out)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(os.path.join(out, "ckpt_0000004.pt"), weights_only=True)
    assert ckpt["method"] == "resampling" and ckpt["config"]["topk"] == 1
    r = run("sample.py", "--ckpt", out, "--seconds", "1", "--topk", "2", "--out", str(tmp_path / "rs.mp4"))
    assert r.returncode == 0 and "top-k 2" in r.stdout, r.stderr
    assert sum(1 for _ in imageio.get_reader(str(tmp_path / "rs.mp4"))) == 16
