"""The command line's rough edges, filed by a tester (issue 9): bad flag values, odd input bytes, help and
version, make-checkpoint --force, bench over its context, NaN logits, units and plurals in the stats, and
the CPU dtype rule. Each bad input must end as one `error:` line and a `hint:` line, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qwen35_lite.cli import app
from qwen35_lite.cli.tools import bench, flowed_help, info
from qwen35_lite.cli.ui import cache_rows, format_stats, human_bytes, plural
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.errors import CheckpointError
from qwen35_lite.plan import cpu_features
from qwen35_lite.plan.device import pick_dtype
from qwen35_lite.runtime.sampling import SamplingParams, make_sampler
from qwen35_lite.text.tokenizer import Tokenizer, as_valid_text
from qwen35_lite.weights.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = SyntheticSpec(hidden_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)
FINAL_NORM = "model.language_model.norm.weight"


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    """A small fp32 checkpoint in several shards (the NaN case rewrites the small one with the norms)."""
    return write_checkpoint(module_tmp("hard") / "tiny", SMALL, dtype=torch.float32, shard_bytes=8 << 20)


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


_ENGINES: dict = {}


@pytest.fixture(autouse=True)
def reuse_engines(monkeypatch):
    """Load each (checkpoint, options) once: parsing the 33 MB tokenizer per invocation costs seconds."""
    from qwen35_lite.runtime.engine import Engine, EngineOptions

    load = Engine.load.__func__

    def cached(cls, model, opts=None, provider_factory=None, on_progress=None):
        key = (str(model), repr(opts or EngineOptions()), repr(getattr(provider_factory, "keywords", None)))
        if key not in _ENGINES:
            _ENGINES[key] = load(cls, model, opts, provider_factory, on_progress)
        return _ENGINES[key]

    monkeypatch.setattr(Engine, "load", classmethod(cached))


def cli(*args, input: str | bytes | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception  # an unexpected error is a bug: show its traceback
    return result


def assert_one_line_error(r, *words: str, code: int) -> None:
    """Exit `code`; stderr is exactly `error: ...` (naming `words`) and `hint: ...`; no traceback, no box."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), r.stderr
    for w in words:
        assert w in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "╭" not in r.stderr


# ---- bad flag values: refused before the load, one line and a hint -----------------------------------

BAD_FLAGS = [
    (("--cpu-mem", "nan"), 2, "--cpu-mem"),
    (("--cpu-mem", "inf"), 2, "--cpu-mem"),
    (("--cpu-mem", "0"), 2, "--cpu-mem"),
    (("--gpu-mem", "-1"), 2, "--gpu-mem"),
    (("--gpu-mem", "nan"), 2, "--gpu-mem"),
    (("--cpu-mem", "1e300"), 2, "1 PiB"),  # finite, but an overflow in the plan
    (("--gpu-mem", "2e6"), 2, "1 PiB"),
    (("--device", "cpu", "--gpu-mem", "4"), 1, "--gpu-mem"),
    (("--device", "cpu", "--gpu-experts", "2"), 1, "--gpu-experts"),
    (("--device", "cpu", "--gpu-mem", "4", "--gpu-experts", "2"), 1, "--gpu-mem and --gpu-experts"),
    (("--device", "cpu", "--cpu-compute", "on"), 1, "--cpu-compute"),
    (("--cpu-compute", "sometimes"), 2, "--cpu-compute"),
    (("--raw", "--system", "be brief"), 2, "--system"),
    (("--top-p", "2"), 2, "top_p"),
    (("--ctx", "1"), 2, "--ctx"),
    (("--dtype", "int4"), 2, "int4"),
    (("--modle", "x"), 2, "--modle"),
    (("--cpu-threads", "0"), 2, "--cpu-threads"),
    (("--cpu-threads", "two"), 2, "--cpu-threads"),
    (("--cpu-threads", str((os.cpu_count() or 1) + 1)), 2, f"the {os.cpu_count()} CPUs"),
]


@pytest.mark.parametrize("args,code,word", BAD_FLAGS, ids=[" ".join(a) for a, _, _ in BAD_FLAGS])
def test_bad_flag_values_are_one_line_with_a_hint(ckpt, args, code, word):
    assert_one_line_error(cli("run", "-m", ckpt, *args, "hi"), word, code=code)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_gpu_flags_without_a_gpu_are_refused_but_info_plans_for_a_named_gpu(ckpt):
    r = cli("run", "-m", ckpt, "--gpu-mem", "4", "hi")
    assert_one_line_error(r, "--gpu-mem", "no CUDA GPU", code=1)
    assert "--device cuda" in r.stderr
    assert_one_line_error(cli("info", "-m", ckpt, "--gpu-mem", "4"), "--gpu-mem", code=1)
    planned = cli("info", "-m", ckpt, "--device", "cuda", "--gpu-mem", "4", "--json")
    assert planned.exit_code == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["device"] == "cuda" and plan["gpu_budget"] == 4 << 30


def test_missing_prompt_and_unknown_command_are_usage_errors():
    assert_one_line_error(cli("run", "-m", "x"), "PROMPT", code=2)
    assert_one_line_error(cli("runn"), "runn", code=2)


# ---- help, version, bare command ---------------------------------------------------------------------


def test_version_prints_the_package_version():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"qwen35-lite {version('qwen35-lite')}"


def test_bare_command_shows_the_help_and_exits_0():
    r = cli()
    assert r.exit_code == 0, r.stderr
    assert "Usage:" in r.stdout
    for command in ("run", "chat", "info", "bench", "make-checkpoint"):
        assert command in r.stdout


@pytest.mark.parametrize("command", [[], ["run"], ["chat"], ["info"], ["bench"], ["make-checkpoint"]])
def test_help_shows_no_bool_type_on_flags(command):
    r = cli(*command, "--help")
    assert r.exit_code == 0
    assert "<bool>" not in r.stdout
    assert "--help" in r.stdout


def test_run_usage_names_the_prompt_in_capitals():
    r = cli("run", "--help")
    assert "PROMPT" in r.stdout and "{prompt}" not in r.stdout


def test_info_and_bench_help_are_whole_sentences():
    for command in (info, bench):
        summary, *rest = flowed_help(command).split("\n\n")
        assert summary.endswith(".") and "\n" not in "".join(rest)
        assert all(p.endswith(".") for p in rest)


# ---- prompts: several words, bytes that are not UTF-8, stdin's trailing newline ----------------------


def run_json(ckpt, *args, input: str | bytes | None = None) -> dict:
    r = cli("run", "-m", ckpt, "--json", "--raw", "-t", "0", "-n", "1", *args, input=input)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_unquoted_words_are_one_prompt(ckpt, tok):
    assert run_json(ckpt, "hello", "there", "friend")["prompt_ids"] == tok.encode("hello there friend")


def test_stdin_bytes_that_are_not_utf8_become_replacement_characters(ckpt, tok):
    out = run_json(ckpt, "-", input=b"caf\xe9 \xff\xfe ok \n\n")
    assert out["prompt_ids"] == tok.encode("caf\ufffd \ufffd\ufffd ok")  # and the trailing newlines dropped


@pytest.mark.slow
def test_argv_bytes_that_are_not_utf8_become_replacement_characters(ckpt, tok):
    """A real process: only there does Python turn argv bytes into lone surrogates."""
    cmd = [sys.executable, "-m", "qwen35_lite.cli", "run", "-m", str(ckpt), "--json", "--raw", "-n", "1"]
    p = subprocess.run([*cmd, b"caf\xe9"], cwd=ROOT, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert b"Traceback" not in p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["prompt_ids"] == tok.encode("caf\ufffd")


@pytest.mark.slow
def test_chat_reads_bytes_that_are_not_utf8(ckpt):
    r = cli("chat", "-m", ckpt, "--raw", "-t", "0", "-n", "2", input=b"caf\xe9\n/exit\n")
    assert r.exit_code == 0, r.stderr
    assert "error" not in r.stderr and "Traceback" not in r.stderr


def test_lone_surrogates_are_replaced_before_tokenising():
    assert as_valid_text("caf\udce9") == "caf\ufffd"  # an escaped byte, as argv gives it
    assert as_valid_text("a\ud800b") == "a\ufffdb"  # a surrogate from elsewhere (JSON)
    assert as_valid_text("ça va") == "ça va"


# ---- stats: load time, units, plurals ----------------------------------------------------------------


def test_load_time_is_in_the_json_stats_and_the_stats_line(ckpt):
    stats = run_json(ckpt, "hi")["stats"]
    assert isinstance(stats["load_s"], float) and stats["load_s"] >= 0
    r = cli("run", "-m", ckpt, "--raw", "-t", "0", "-n", "1", "hi")
    assert r.exit_code == 0 and " load " in r.stderr


def test_sizes_are_binary_units_and_never_round_to_zero():
    assert human_bytes(0) == "0 B" and human_bytes(900) == "900 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 << 20) == "5.0 MiB"
    assert human_bytes(3 << 30) == "3.00 GiB"
    stats = {"peak_rss_bytes": 700 << 20, "disk_bytes": 4096, "disk_bytes_per_token": 2048, "load_s": 1.25}
    line = format_stats(stats)
    assert "peak RSS 700.0 MiB" in line and "disk 2.0 KiB/tok" in line and "load 1.2 s" in line
    assert " GB" not in line and " MB" not in line


def test_counts_are_pluralised():
    assert plural(1, "layer") == "1 layer" and plural(2, "layer") == "2 layers"
    assert plural(1, "miss", "misses") == "1 miss" and plural(0, "miss", "misses") == "0 misses"
    rows = dict(cache_rows({"ram_slots_per_layer": 1, "ram_hits": 1, "ram_misses": 1, "bytes_read": 10}))
    assert rows["RAM tier"] == "1 slot per layer, 1 hit / 1 miss"


# ---- NaN logits: the checkpoint is corrupt, not a torch error ---------------------------------------


def test_sampler_refuses_nan_and_infinite_logits():
    for temperature in (0.0, 0.7):
        sample = make_sampler(SamplingParams(temperature=temperature, seed=0))
        for bad in (math.nan, math.inf):
            logits = torch.zeros(16)
            logits[3] = bad
            with pytest.raises(CheckpointError, match="corrupt"):
                sample(logits)
        assert 0 <= sample(torch.zeros(16)) < 16


@pytest.mark.slow
def test_a_checkpoint_with_nan_weights_is_reported_as_corrupt(ckpt, tmp_path):
    bad = tmp_path / "nan"
    bad.mkdir()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    damaged = index["weight_map"][FINAL_NORM]
    for f in ckpt.iterdir():
        if f.name != damaged:
            (bad / f.name).symlink_to(f)
    tensors = load_file(ckpt / damaged)
    tensors[FINAL_NORM] = torch.full_like(tensors[FINAL_NORM], math.nan)
    save_file(tensors, bad / damaged, metadata={"format": "pt"})
    r = cli("run", "-m", bad, "--raw", "-t", "0.7", "-n", "2", "hi")
    assert_one_line_error(r, "NaN", "corrupt", code=1)


# ---- make-checkpoint --force --------------------------------------------------------------------------

TINY_ARGS = ("--layers", "1", "--experts", "2", "--top-k", "1", "--hidden", "16", "--dtype", "float32")


def test_make_checkpoint_refuses_a_file_even_with_force(tmp_path):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    assert_one_line_error(cli("make-checkpoint", out, "--force"), "is a file", code=1)
    assert out.read_text() == "keep me"


def test_make_checkpoint_force_replaces_the_old_shards(tmp_path):
    out = tmp_path / "ckpt"
    first = cli("make-checkpoint", out, *TINY_ARGS, "--shard-size-mb", "4")
    assert first.exit_code == 0, first.stderr
    assert len(list(out.glob("*.safetensors"))) >= 3
    (out / "notes.txt").write_text("mine")
    again = cli("make-checkpoint", out, *TINY_ARGS, "--force")
    assert again.exit_code == 0, again.stderr
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == ["model-00001-of-00001.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert (out / "notes.txt").read_text() == "mine"  # only the checkpoint's own files are removed
    assert "1 shard)" in again.stdout and "MiB" in again.stdout
    Checkpoint(out)  # loads: no shard is missing or left over


def test_make_checkpoint_shards_get_the_mode_of_the_other_files(tmp_path):
    out = tmp_path / "ckpt"
    assert cli("make-checkpoint", out, *TINY_ARGS).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone would make the shard 0600


def test_make_checkpoint_too_large_is_refused_before_anything_is_made(tmp_path):
    out = tmp_path / "new" / "ckpt"
    r = cli("make-checkpoint", out, "--experts", "99999999999", "--hidden", "99999999")
    assert_one_line_error(r, "would be", "PiB", "free", code=1)
    assert not (tmp_path / "new").exists()  # no directory left behind


def test_make_checkpoint_over_the_available_ram_is_refused(tmp_path, monkeypatch):
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=64 << 20))
    r = cli("make-checkpoint", tmp_path / "ckpt", "--size", "small")
    assert_one_line_error(r, "RAM", "64.0 MiB is available", code=1)
    assert not (tmp_path / "ckpt").exists()


def test_make_checkpoint_that_fails_midway_removes_the_directory_it_made(tmp_path, monkeypatch):
    from qwen35_lite.convert import synthetic

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "save_file", full_disk)
    r = cli("make-checkpoint", tmp_path / "ckpt", *TINY_ARGS)
    assert_one_line_error(r, "No space left on device", code=1)
    assert not (tmp_path / "ckpt").exists()


# ---- devices, files a flag names, Ctrl+C during the imports ----------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_cuda_index_without_a_gpu_is_one_line(ckpt):
    assert_one_line_error(
        cli("run", "-m", ckpt, "--device", "cuda:99", "hi"), "cuda:99", "no CUDA GPU", code=1
    )


def test_a_cuda_index_past_the_gpus_is_refused(monkeypatch):
    from qwen35_lite.errors import InputError
    from qwen35_lite.plan.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match="has 2 CUDA GPUs") as e:
        pick_device("cuda:99")
    assert "cuda:0 to cuda:1" in e.value.hint
    with pytest.raises(InputError, match="unknown device"):
        pick_device("cuda:x")


def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "tools.fifo"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize(
    "make,words",
    [
        (_fifo, ["a FIFO", "not a regular file"]),
        (lambda d: Path("/dev/zero"), ["a character device"]),
        (lambda d: d, ["a directory"]),
    ],
    ids=["fifo", "dev-zero", "directory"],
)
def test_tools_must_be_a_regular_file(ckpt, tmp_path, make, words):
    """Never blocks on a FIFO, never reads /dev/zero until memory runs out."""
    assert_one_line_error(cli("run", "-m", ckpt, "--tools", make(tmp_path), "hi"), *words, code=1)


def test_tools_file_over_the_cap_is_refused_while_reading(ckpt, tmp_path, monkeypatch):
    from qwen35_lite.cli import options
    from qwen35_lite.runtime import user_files

    big = tmp_path / "tools.json"
    big.write_text("[" + " " * 3000 + "]")
    monkeypatch.setattr(options, "MAX_TOOLS_BYTES", 2048)
    reads = []
    monkeypatch.setattr(user_files, "READ_CHUNK", 1024)
    real = user_files._read_capped

    def counted(f, cap):
        out = real(f, cap)
        reads.append(f.tell())
        return out

    monkeypatch.setattr(user_files, "_read_capped", counted)
    assert_one_line_error(cli("run", "-m", ckpt, "--tools", big, "hi"), "over the 2 KiB limit", code=1)
    assert reads == [2049]  # stopped one byte past the cap, not read whole


def test_ctrl_c_while_the_cli_imports_exits_130_without_a_traceback(tmp_path):
    """The interrupt lands inside `import torch`, the slow part of the first second of `chat`."""
    code = (
        "import builtins, os, signal, sys\n"
        "real = builtins.__import__\n"
        "def hooked(name, *a, **k):\n"
        "    if name == 'torch':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = hooked\n"
        "sys.argv = ['qwen35-lite', 'chat', '-m', sys.argv[1]]\n"
        "from qwen35_lite.cli import main\n"
        "main()\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr


def test_run_json_text_is_the_answer_as_generated(ckpt):
    """On this checkpoint the greedy reply to "hi" opens with a space: kept, as the server's content keeps
    it (the stream of token texts, joined)."""
    from qwen35_lite.runtime.engine import Engine, EngineOptions
    from qwen35_lite.runtime.generate import TokenEvent
    from qwen35_lite.runtime.session import ChatSession, ChatSettings

    out = json.loads(cli("run", "-m", ckpt, "--json", "--no-think", "-t", "0", "-n", "4", "hi").stdout)
    engine = Engine.load(str(ckpt), EngineOptions())
    session = ChatSession(
        engine, ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=4, think="off")
    )
    streamed = "".join(e.text for e in session.send("hi") if isinstance(e, TokenEvent) and not e.thinking)
    assert streamed[0].isspace() and out["text"] == streamed
    assert session.messages[-1]["content"] == streamed.strip()  # the history holds the trimmed turn


# ---- bench: a workload over the context is refused ----------------------------------------------------


def test_bench_refuses_more_tokens_than_the_context(ckpt):
    r = cli("bench", "-m", ckpt, "--prompt-tokens", "8", "--new-tokens", "4", "--ctx", "10")
    assert_one_line_error(r, "12", "10", code=1)
    assert "--ctx 12" in r.stderr


@pytest.mark.slow
def test_bench_names_the_cpu_and_its_bf16_support_and_the_load_time(ckpt):
    r = cli("bench", "-m", ckpt, "--prompt-tokens", "8", "--new-tokens", "2", "--ctx", "10", "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["generated_tokens"] == 2 and result["cpu"] and result["load_s"] >= 0
    assert result["cpu_native_bf16"] in (True, False, None)
    table = cli("bench", "-m", ckpt, "--prompt-tokens", "8", "--new-tokens", "2")
    assert table.exit_code == 0 and "bf16" in table.stdout and "load" in table.stdout


# ---- dtype auto on a CPU without native bf16 ----------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_ckpt(module_tmp) -> Path:
    return write_checkpoint(module_tmp("bf16") / "tiny", SMALL, dtype=torch.bfloat16)


@pytest.mark.parametrize("native,cpu_dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_dtype_is_float32_only_on_a_cpu_without_bf16(bf16_ckpt, ckpt, monkeypatch, native, cpu_dtype):
    monkeypatch.setattr(cpu_features, "cpu_has_native_bf16", lambda: native)
    stored = Checkpoint(bf16_ckpt)
    assert pick_dtype("auto", stored, "cpu") == cpu_dtype
    assert pick_dtype("auto", stored, "cuda") == torch.bfloat16  # a GPU computes bf16 natively
    assert pick_dtype("bfloat16", stored, "cpu") == torch.bfloat16  # asked for: kept
    r = cli("info", "-m", bf16_ckpt, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dtype"] == str(cpu_dtype).removeprefix("torch.")
    assert ("no native bfloat16" in r.stderr) == (not native)
    assert (plan["dtype_note"] is not None) == (not native)
    fp32 = cli("info", "-m", ckpt, "--device", "cpu")  # stored in float32: nothing to explain
    assert fp32.exit_code == 0 and "bfloat16" not in fp32.stderr, fp32.stderr


def test_bf16_detection_reads_the_cpu_flags(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu_features, "CPUINFO", cpuinfo)
    detect = cpu_features.cpu_has_native_bf16.__wrapped__
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f\n")
    assert detect() is False
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert detect() is True
    cpuinfo.write_text("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert detect() is True


# ---- hints that can work -------------------------------------------------------------------------------


def test_context_hints_offer_only_what_can_work(ckpt):
    """`run` has no chat to /clear; --ctx is suggested only below the model's maximum, which it names."""
    from qwen35_lite.plan.sizes import fmt_gib
    from qwen35_lite.runtime.generate import context_hint

    r = cli("run", "-m", ckpt, "--raw", "--ctx", 16, "-n", 1, "word " * 40)
    assert r.exit_code == 1 and "/clear" not in r.stderr and "raise --ctx" in r.stderr
    assert context_hint("shorten", 0, 4096, 4096) == "shorten"
    assert context_hint("shorten", 9, 4096, 4096) == "shorten, or /clear the conversation"
    assert "up to 262144" in context_hint("shorten", 9, 4096, 262144)
    assert fmt_gib(3 * 1024) == "3.0 KiB" and fmt_gib(5 << 30) == "5.00 GiB"


def test_system_in_raw_chat_is_refused_and_the_chat_goes_on(ckpt):
    r = cli("chat", "-m", ckpt, "--raw", "-n", 2, input="/system be brief\nhello\n")
    assert r.exit_code == 0 and "no effect in --raw mode" in r.stderr and "Traceback" not in r.stderr
