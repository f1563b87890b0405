"""Videos end to end against transformers' references (tests/fixtures/video/refs.json, made by
make_video_refs.py in an environment with torchvision): the sampled frames, timestamps, grids and
pixel values of Qwen3VLVideoProcessor, the prompt ids of Qwen3VLProcessor, and the greedy fp32 tokens of
Qwen3_5MoeForConditionalGeneration.generate, on the seeded tiny checkpoint of vision_helpers.py (rebuilt
here from the same seed). Clips: frame rates 10, 12, 25 and 30, sizes not multiples of 32, fewer frames
than min_frames, an odd number of frames, more than max_frames allows, one in Matroska."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner
from vision_helpers import build_tiny_vlm, make_image

from qwen35_lite.cli import app
from qwen35_lite.model.vision.video import VideoProcessorConfig
from qwen35_lite.runtime.engine import Engine, EngineOptions
from qwen35_lite.runtime.sampling import SamplingParams
from qwen35_lite.runtime.session import ChatSession, ChatSettings
from qwen35_lite.runtime.video import Video, load_video

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "video"
REFS = json.loads((FIXTURES / "refs.json").read_text())
CASES = REFS["cases"]
OPTS = EngineOptions(device="cpu", dtype="float32", offline=True)


def clip(name: str) -> Path:
    return FIXTURES / (f"{name}.mkv" if name == "odd" else f"{name}.mp4")


@pytest.fixture(scope="module")
def vlm(module_tmp) -> Path:
    out = build_tiny_vlm(module_tmp("video") / "vlm")
    (out / "video_preprocessor_config.json").write_text(
        (FIXTURES / "video_preprocessor_config.json").read_text()
    )
    return out


@pytest.fixture(scope="module")
def engine(vlm) -> Engine:
    return Engine.load(vlm, OPTS)


@pytest.fixture(scope="module")
def picture(module_tmp) -> Path:
    spec = REFS["mixed_image"]
    path = module_tmp("pic") / "pic.png"
    make_image(spec["width"], spec["height"], seed=spec["seed"]).save(path)
    return path


def media(case: dict, picture: Path) -> list:
    return ([picture] if case["image"] else []) + [Video(str(clip(n))) for n in case["clips"]]


@pytest.mark.parametrize("name", [n for n in CASES if n != "mixed"])
def test_frames_grid_timestamps_and_pixels_equal_transformers(name):
    ref = CASES[name]
    cfg = VideoProcessorConfig.from_dir(FIXTURES)
    v = load_video(clip(name), cfg)
    assert [list(v.grid)] == ref["video_grid_thw"]
    assert v.frames == len(ref["frames_indices"][0])
    assert v.timestamps == pytest.approx(ref["timestamps"][0], abs=0)
    assert list(v.pixel_values.shape) == ref["pixel_shape"]
    assert v.pixel_values.dtype == torch.float32
    assert hashlib.sha256(v.pixel_values.numpy().tobytes()).hexdigest() == ref["pixel_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_session_ids_and_greedy_tokens_equal_transformers(engine, picture, name):
    ref = CASES[name]
    s = ChatSession(
        engine, ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=REFS["n_new"])
    )
    events = list(s.send(ref["text"], images=media(ref, picture)))
    reply = s.last_reply
    assert reply.prompt_ids == ref["input_ids"]
    assert reply.tokens == ref["tokens"]
    frames = sum(len(i) for i in ref["frames_indices"])
    assert events[-1].stats["video_frames"] == frames
    assert events[-1].stats["video_tokens"] == sum(t * h * w // 4 for t, h, w in ref["video_grid_thw"])


@pytest.mark.slow
def test_cli_image_and_videos_in_order_equal_transformers(vlm, engine, picture, monkeypatch):
    """--image then two --video: the mixed case's prompt (image first, then the clips in order)."""
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: engine))
    ref = CASES["mixed"]
    args = ["run", "-m", str(vlm), "--device", "cpu", "--dtype", "float32", "--offline", "--json"]
    args += ["--temperature", "0", "--max-new-tokens", str(REFS["n_new"])]
    args += ["--video", str(clip("rate10")), "--image", str(picture), "--video", str(clip("odd"))]
    # typed video, image, video: the image must come second, so the ids differ from the reference's ...
    out = CliRunner().invoke(app, [*args, ref["text"]])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["prompt_ids"] != ref["input_ids"]
    # ... and image first gives exactly the reference.
    args = args[:-6] + ["--image", str(picture), "--video", str(clip("rate10")), "--video", str(clip("odd"))]
    out = CliRunner().invoke(app, [*args, ref["text"]])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["prompt_ids"] == ref["input_ids"]
    assert result["tokens"] == ref["tokens"]
    assert result["stats"]["video_frames"] == 9


@pytest.mark.slow
def test_server_video_url_parts(engine, tmp_path):
    """A video_url data URL gives the reference prompt; local paths only under --allowed-local-media-path;
    vLLM's mm_processor_kwargs sample it; a bad clip is a 400 naming it by its place."""
    import base64

    from test_server import ThreadServer, post

    from qwen35_lite.server.app import create_app

    ref = CASES["rate10"]
    url = "data:video/mp4;base64," + base64.b64encode(clip("rate10").read_bytes()).decode()

    def body(url, **extra):
        parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": ref["text"]}]
        return {"model": "vlm", "messages": [{"role": "user", "content": parts}], "max_tokens": 6, **extra}

    s = ThreadServer(create_app(engine, "vlm", api_key="k"))
    try:
        r = post(s, {**body(url), "temperature": 0}, key="k")
        assert r.status == 200, r.body
        assert r.body["usage"]["prompt_tokens"] == len(ref["input_ids"])
        r = post(s, body(str(clip("rate10"))), key="k")
        assert (
            r.status == 400 and "a video_url that is a local path was refused" in r.body["error"]["message"]
        )
        long = "data:video/mp4;base64," + base64.b64encode(clip("long").read_bytes()).decode()
        full = post(s, body(long), key="k").body["usage"]["prompt_tokens"]
        fewer = post(s, body(long, mm_processor_kwargs={"fps": 0.5}), key="k").body["usage"]["prompt_tokens"]
        assert full == len(CASES["long"]["input_ids"]) and fewer < full
        r = post(s, body(long, mm_processor_kwargs={"num_frames": 3}), key="k")
        assert (
            r.status == 400
            and "mm_processor_kwargs.num_frames is not supported" in r.body["error"]["message"]
        )
        bad = "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()
        r = post(s, body(bad), key="k")
        assert r.status == 400 and r.body["error"]["message"].startswith("video 1 is not a video we read")
    finally:
        s.stop()
    s = ThreadServer(create_app(engine, "vlm", api_key="k", media_dir=FIXTURES.resolve()))
    try:
        r = post(s, body(str(clip("rate10"))), key="k")
        assert r.status == 200 and r.body["usage"]["prompt_tokens"] == len(ref["input_ids"])
    finally:
        s.stop()


@pytest.mark.slow
def test_chat_video_command_save_and_load(engine, picture, tmp_path, capsys):
    """/video attaches (metadata checked now), the message sends it with /image's in order; the stats
    line shows the frames; /save and /load keep the video part; a bad clip is one error line."""
    from qwen35_lite.cli.chat_repl import Repl
    from qwen35_lite.cli.ui import UI

    ref = CASES["mixed"]
    s = ChatSession(
        engine, ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=REFS["n_new"])
    )
    repl = Repl(UI(), s)
    repl.handle(f"/image {picture}")
    repl.handle(f"/video {clip('rate10')}")
    repl.handle(f"/video {FIXTURES / 'refs.json'}")  # refused now, not attached
    repl.handle(f"/video {clip('odd')}")
    repl.handle("/video")
    err = capsys.readouterr().err
    assert "attached rate10.mp4 (100x70, 2.0 s; 4 frames, 12 tokens) to the next message" in err
    assert "images for the next message: pic.png, rate10.mp4, odd.mkv" in err
    assert err.count("error: ") == 1 and "not a video we read" in err and "Traceback" not in err
    repl.handle(ref["text"])
    err = capsys.readouterr().err
    assert "video 9 frames, 24 tok" in err
    assert s.last_reply.prompt_ids == ref["input_ids"] and s.last_reply.tokens == ref["tokens"]
    parts = s.messages[0]["content"]
    assert [p["type"] for p in parts] == ["image", "video", "video", "text"]
    s.save(tmp_path / "chat.json")
    other = ChatSession(engine, ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=2))
    other.load(tmp_path / "chat.json")
    assert other.messages == s.messages
    list(other.send("And then?"))  # the history re-rendered whole: its clips decoded again
    assert other.last_reply.prompt_ids[: len(ref["input_ids"]) - 3] == ref["input_ids"][:-3]
