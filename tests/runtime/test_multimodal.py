"""Images end to end, with transformers as the oracle on a tiny random VLM (every tensor randomised):
prompt ids against its processor, greedy tokens against its generate (fp32) through ChatSession and the
CLI, a text turn after an image turn, the tower never loaded by text-only runs, and every bad image input
ending as one error line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner
from vision_helpers import build_tiny_vlm, load_tiny_vlm, make_image

from qwen35_lite.cli import app
from qwen35_lite.cli.chat_repl import Repl, split_image_paths
from qwen35_lite.cli.ui import UI
from qwen35_lite.errors import InputError
from qwen35_lite.model.vision.tower import vision_tensor_shapes
from qwen35_lite.runtime.engine import Engine, EngineOptions
from qwen35_lite.runtime.sampling import SamplingParams
from qwen35_lite.runtime.session import ChatSession, ChatSettings
from qwen35_lite.text.chat_template import BUILTIN_TEMPLATE
from qwen35_lite.weights.config import VisionConfig

ROOT = Path(__file__).resolve().parents[2]
IMAGE = 248056
N_NEW = 6
OPTS = EngineOptions(device="cpu", dtype="float32", offline=True)


@pytest.fixture(scope="module")
def vlm(module_tmp) -> Path:
    return build_tiny_vlm(module_tmp("e2e") / "vlm")


@pytest.fixture(scope="module")
def pics(module_tmp) -> dict[str, Path]:
    """Small images (a 64x64 minimum area keeps the image-token counts at 4 to 12), and bad files."""
    d = module_tmp("pics")
    out = {"a": d / "a.png", "b": d / "b b.jpg", "text": d / "notes.png", "trunc": d / "trunc.png"}
    make_image(100, 70).save(out["a"])
    make_image(64, 150, seed=1).save(out["b"], quality=95)
    out["text"].write_text("not an image\n")
    out["trunc"].write_bytes(out["a"].read_bytes()[: out["a"].stat().st_size // 2])
    return out


@pytest.fixture(scope="module")
def ref(vlm):
    return load_tiny_vlm(vlm, torch.float32)


@pytest.fixture(scope="module")
def processor(vlm):
    """transformers' Qwen3VLProcessor over the checkpoint's tokenizer and PIL image processor, with the
    chat template our engine uses (the tiny checkpoint ships none, so both render the built-in one)."""
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    def init(self, image_processor, tokenizer, video_processor, chat_template=None):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.video_processor, self.chat_template = video_processor, chat_template

    # ProcessorMixin insists on a video processor, which needs torchvision (absent here); videos are unused.
    original = ProcessorMixin.__init__
    ProcessorMixin.__init__ = init
    try:
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(vlm),
            tokenizer=AutoTokenizer.from_pretrained(vlm),
            video_processor=None,
            chat_template=BUILTIN_TEMPLATE.read_text(),
        )
    finally:
        ProcessorMixin.__init__ = original


_ENGINES: dict = {}


@pytest.fixture(autouse=True)
def reuse_engines(monkeypatch):
    """Load each (checkpoint, options) once for this file, in-process CLI runs included."""
    load = Engine.load.__func__

    def cached(cls, model, opts=None, provider_factory=None, on_progress=None):
        key = (str(model), repr(opts or EngineOptions()))
        if key not in _ENGINES:
            _ENGINES[key] = load(cls, model, opts, provider_factory, on_progress)
        return _ENGINES[key]

    monkeypatch.setattr(Engine, "load", classmethod(cached))


@pytest.fixture(scope="module")
def engine(vlm) -> Engine:
    return Engine.load.__func__(Engine, vlm, OPTS)


def session(engine: Engine) -> ChatSession:
    return ChatSession(engine, ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=N_NEW))


def hf_inputs(processor, messages: list[dict]):
    return processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )


def hf_greedy(ref, inputs, n: int = N_NEW) -> list[int]:
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def same_tokens(ours: list[int], theirs: list[int], stops) -> None:
    """Greedy tokens equal; ours may stop early on a stop id that transformers (no eos set) runs past."""
    assert ours == theirs[: len(ours)]
    assert len(ours) == N_NEW or ours[-1] in stops


def user(paths: list[Path], text: str) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": str(p)} for p in paths), {"type": "text", "text": text}]}  # fmt: skip


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# ---- against transformers ----------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["a"], ["a", "b"]], ids=["one", "two"])
def test_session_greedy_equals_transformers(engine, ref, processor, pics, names):
    paths = [pics[n] for n in names]
    ours = session(engine)
    assert ours.prompt_ids("Describe these.", images=paths).count(IMAGE) == len(paths)  # one per image
    list(ours.send("Describe these.", images=paths))
    theirs = hf_inputs(processor, [user(paths, "Describe these.")])
    assert ours.last_reply.prompt_ids == theirs["input_ids"][0].tolist()  # placeholders expanded
    assert ours.last_reply.prompt_ids.count(IMAGE) == int(theirs["image_grid_thw"].prod(-1).sum()) // 4
    same_tokens(ours.last_reply.tokens, hf_greedy(ref, theirs), engine.defaults.stop_ids)
    assert ours.cache.rope_delta < 0  # carried for the decode steps and later turns
    assert ours.messages[0]["content"][-1] == {"type": "text", "text": "Describe these."}


def test_cli_two_images_greedy_equals_transformers(vlm, ref, processor, pics, engine):
    r = cli(
        "run", "--model", vlm, "--device", "cpu", "--dtype", "float32", "--offline", "--json",
        "--temperature", "0", "--max-new-tokens", N_NEW, "--image", pics["a"], "--image", pics["b"], "Compare.",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "thinking", "tokens", "prompt_ids", "finish_reason", "stats", "tool_calls"}
    theirs = hf_inputs(processor, [user([pics["a"], pics["b"]], "Compare.")])
    assert out["prompt_ids"] == theirs["input_ids"][0].tolist()  # placeholders expanded, in --image order
    same_tokens(out["tokens"], hf_greedy(ref, theirs), engine.defaults.stop_ids)


def test_text_turn_after_image_turn_equals_one_prompt(engine, ref, processor, pics):
    """The second turn feeds only its new tokens at offset + rope_delta; transformers gets the whole
    conversation (the first turn's ids, the reply fed, then ours) as one prompt with the image."""
    ours = session(engine)
    list(ours.send("Look.", images=[pics["b"]]))
    fed_before = list(ours.cache.token_ids)
    list(ours.send("And the colours?"))
    second = ours.last_reply
    full = torch.tensor([fed_before + second.prompt_ids])
    first = hf_inputs(processor, [user([pics["b"]], "Look.")])
    inputs = {
        "input_ids": full,
        "attention_mask": torch.ones_like(full),
        "mm_token_type_ids": (full == IMAGE).int(),
        "pixel_values": first["pixel_values"],
        "image_grid_thw": first["image_grid_thw"],
    }
    assert second.prompt_ids.count(IMAGE) == 0
    same_tokens(second.tokens, hf_greedy(ref, inputs), engine.defaults.stop_ids)


def test_saved_image_chat_reloads_and_rerenders(engine, ref, processor, pics, tmp_path):
    """/save keeps the image parts (paths); /load re-renders and re-encodes them on a fresh cache."""
    first = session(engine)
    list(first.send("Look.", images=[pics["a"]]))
    first.save(tmp_path / "chat.json")
    again = session(engine)
    again.load(tmp_path / "chat.json")
    list(again.send("Again?"))
    theirs = hf_inputs(processor, [*again.messages[:2], {"role": "user", "content": "Again?"}])
    assert again.last_reply.prompt_ids == theirs["input_ids"][0].tolist()
    same_tokens(again.last_reply.tokens, hf_greedy(ref, theirs), engine.defaults.stop_ids)


# ---- chat ------------------------------------------------------------------------------------------


def test_chat_image_command_inline_paths_and_errors(engine, pics, capsys):
    s = session(engine)
    repl = Repl(UI(), s)
    repl.handle(f"/image {pics['a']}")
    repl.handle("/image")
    repl.handle(f"/image {pics['text']}")  # refused now, not attached
    repl.handle(f"/image {pics['trunc']}")
    err = capsys.readouterr().err
    assert "attached a.png (100x70) to the next message" in err
    assert "images for the next message: a.png" in err
    assert err.count("error: ") == 2 and "Traceback" not in err
    assert [p.name for p in repl.pending_images] == ["a.png"]

    repl.handle(f"What about {pics['b']} here?".replace(" b.jpg", "\\ b.jpg"))  # an escaped space
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    parts = s.messages[0]["content"]
    assert [Path(p["image"]).name for p in parts[:-1]] == ["a.png", "b b.jpg"]  # /image first, then typed
    assert parts[-1]["text"] == "What about here?"
    assert repl.pending_images == []

    # A bad image in a message: one error line, nothing sent, history unchanged.
    history = json.dumps(s.messages)
    repl.handle(f"{pics['trunc']} and this?")
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "truncated or corrupt" in err and "Traceback" not in err
    assert json.dumps(s.messages) == history

    # An image the history does not take: the session refuses it before feeding anything.
    offset = s.cache.offset
    with pytest.raises(InputError, match="image file not found"):
        list(s.send("x", images=[pics["a"].with_name("gone.png")]))
    assert json.dumps(s.messages) == history and s.cache.offset == offset


def test_split_image_paths(pics):
    text, found = split_image_paths(f"'{pics['b']}' then {pics['a']}, notes.png {pics['text'].parent}/x.png")
    assert found == [pics["b"]]  # "a.png," is not a file name; x.png does not exist
    assert text.startswith("then ")
    assert split_image_paths("no paths here") == ("no paths here", [])


# ---- errors through the CLI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_vision(vlm, module_tmp) -> Path:
    """The tiny VLM with its visual.* tensors removed (config.json still has a vision_config)."""
    out = module_tmp("novision") / "m"
    shutil.copytree(vlm, out)
    tensors = load_file(out / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".visual." not in f".{k}"}, out / "model.safetensors")
    return out


def assert_user_error(r, *words: str) -> None:
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), r.stderr
    assert all(w in lines[0] for w in words), r.stderr
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.slow
def test_cli_image_errors(vlm, pics, no_vision, engine):
    base = ("run", "--device", "cpu", "--dtype", "float32", "--offline", "--max-new-tokens", 2)
    assert_user_error(
        cli(*base, "--model", vlm, "--image", pics["a"].with_name("nope.png"), "hi"), "not found"
    )
    assert_user_error(cli(*base, "--model", vlm, "--image", pics["text"], "hi"), "not an image")
    assert_user_error(cli(*base, "--model", vlm, "--image", pics["trunc"], "hi"), "truncated")
    assert_user_error(cli(*base, "--model", no_vision, "--image", pics["a"], "hi"), "no vision tower")
    # The text fits the context, the image's tokens do not.
    n_text = len(session(engine).prompt_ids("hi", images=[pics["b"]]))  # one placeholder
    r = cli(*base, "--model", vlm, "--ctx", n_text + 2, "--image", pics["b"], "hi")
    assert_user_error(r, "image too large for the context")
    assert "--ctx" in r.stderr and "smaller image" in r.stderr and "36864 pixels" in r.stderr
    r = cli(*base, "--model", vlm, "--raw", "--image", pics["a"], "hi")
    assert r.exit_code == 2  # a usage error, before loading anything


# ---- the tower is loaded only for images ---------------------------------------------------------------

# Runs the CLI in a fresh interpreter; reports whether the engine loaded its tower and the peak RSS from
# the end of the engine load (Linux resets the high-water mark on "5" > clear_refs) to the end of the reply,
# so the load's own transient peak (tokenizer parsing) does not hide what the reply adds.
PROBE = textwrap.dedent(
    """
    import json, re, sys
    from qwen35_lite.cli import app
    from qwen35_lite.runtime.engine import Engine

    def peak_rss():
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    engines, load, after_load = [], Engine.load.__func__, []

    def loaded(cls, *a, **k):
        engines.append(load(cls, *a, **k))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        after_load.append(rss())
        return engines[-1]

    Engine.load = classmethod(loaded)
    try:
        app(sys.argv[1:], standalone_mode=False)
    finally:
        report = {"vision_loaded": engines[0].vision_loaded, "rss_after_load": after_load[0], "peak_rss": peak_rss()}
        print(json.dumps(report), file=sys.stderr)
    """
)
BIG = VisionConfig(depth=4, hidden_size=1024, num_heads=8, intermediate_size=4096, out_hidden_size=64,
                   num_position_embeddings=16)  # fmt: skip


@pytest.fixture(scope="module")
def big_tower(vlm, module_tmp) -> tuple[Path, int]:
    """The tiny VLM with a ~280 MB fp32 vision tower: big enough to stand out in peak RSS."""
    out = module_tmp("bigtower") / "m"
    shutil.copytree(vlm, out)
    tensors = load_file(out / "model.safetensors")
    prefix = next(k for k in tensors if k.endswith("visual.patch_embed.proj.weight")).removesuffix(
        "patch_embed.proj.weight"
    )
    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    shapes = vision_tensor_shapes(BIG)
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        tensors[prefix + name] = torch.randn(shape, generator=gen) * 0.02
    save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["vision_config"].update({k: getattr(BIG, k) for k in ("depth", "hidden_size", "num_heads", "intermediate_size")})  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out, sum(4 * torch.Size(s).numel() for s in shapes.values())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_text_only_run_never_loads_the_tower(big_tower, pics):
    path, tower_bytes = big_tower
    assert tower_bytes > 250e6
    args = ["run", "--model", path, "--offline", "--json", "--max-new-tokens", "2", "--temperature", "0"]
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", PROBE, *map(str, args + extra), "hi"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, extra in (("text", []), ("image", ["--image", str(pics["a"])]))
    }
    probes = {}
    for name, p in runs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["tokens"]
        probes[name] = json.loads(err.strip().splitlines()[-1])
    assert probes["text"]["vision_loaded"] is False and probes["image"]["vision_loaded"] is True
    # What each reply adds to the memory held after the load: the tower shows in the image run (less than
    # its full size: the allocator reuses pages the load freed) and is absent from the text run.
    added = {name: p["peak_rss"] - p["rss_after_load"] for name, p in probes.items()}
    # (Each run against its own after-load figure: two processes' after-load RSS differ by tens of MB with
    # the heap's layout, which moves with what was imported before the load.)
    assert added["text"] < 0.25 * tower_bytes < 0.5 * tower_bytes < added["image"], (added, tower_bytes)


def test_on_the_cpu_a_bf16_model_encodes_images_in_fp32(vlm, pics):
    """bf16 matmuls are 4-7x slower than fp32 on CPUs without bf16 units: the tower runs in fp32 and its
    rows are rounded to bf16 once, as they replace the placeholder embeddings."""
    from qwen35_lite.model.vision.preprocess import preprocess
    from qwen35_lite.runtime.multimodal import image_prompt, load_images

    engine = Engine.load(str(vlm), EngineOptions(device="cpu", dtype="bfloat16", offline=True))
    ids = [11, 248053, IMAGE, 248054, 22]
    prompt = image_prompt(engine, ids, [pics["a"]], engine.model.make_cache())
    assert engine.model.dtype == torch.bfloat16 and engine.vision().dtype == torch.float32
    assert prompt.embeds.dtype == torch.bfloat16
    pv, grid = preprocess(load_images([pics["a"]]), engine.image_config())
    rows = prompt.embeds[torch.tensor(prompt.ids) == IMAGE]
    assert torch.equal(rows, engine.vision().encode(pv, grid).to(torch.bfloat16))


def test_image_encode_reports_progress_per_block(engine, pics):
    seen: list[tuple[int, int]] = []
    s = session(engine)
    list(s.send("What is it?", images=[pics["a"]], on_encode=lambda done, total: seen.append((done, total))))
    depth = engine.cfg.vision.depth
    assert seen == [(i, depth) for i in range(1, depth + 1)]
