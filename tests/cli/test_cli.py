"""The command line end to end on a tiny checkpoint: each subcommand, its output files and its errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llada.cli.generation import run_chat, run_generate
from llada.cli.main import main
from llada.engine.answer_text import answer_text
from llada.engine.settings import GenerationSettings
from llada.model.loading import load
from llada.model.quantize import Fp8Linear, Int8Linear
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel

SMALL = ["--steps", "4", "--gen-length", "8", "--block-length", "4", "--device", "cpu"]
SETTINGS = GenerationSettings(gen_length=8, block_length=4, policy="fixed", steps=4)


def test_generate_prints_an_answer(checkpoint_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "Hello", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n")
    again = run_generate(str(checkpoint_dir), "Hello", SETTINGS, device="cpu")
    assert printed == again + "\n"  # deterministic at temperature 0
    # The engine's exact mode and the reference sampler agree; the reference also runs from the CLI.
    exact = run_generate(str(checkpoint_dir), "Hello", GenerationSettings(**{**SETTINGS.__dict__, "cache": "none",
                                                                           "early_stop": False}), device="cpu")
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "Hello", "--sampler", "reference",
                 *SMALL]) == 0
    assert capsys.readouterr().out == exact + "\n"
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "Hello", "--sampler", "reference",
                 "--policy", "threshold", *SMALL]) == 2
    assert "needs the engine" in capsys.readouterr().err


def test_infill_keeps_the_text_around_its_gaps(checkpoint_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["infill", "--model", str(checkpoint_dir), "the cat [MASK*3] on the mat"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed.startswith("the cat ") and printed.endswith(" on the mat") and len(printed) > len("the cat  on the mat")
    assert main(["infill", "--model", str(checkpoint_dir), "no gap"]) == 2
    assert "no gap to fill" in capsys.readouterr().err
    assert main(["infill", "--model", str(checkpoint_dir), "a [MASK*2] b", "--steps", "5"]) == 2
    assert "steps must be between 1 and" in capsys.readouterr().err


def test_infill_with_a_question_prints_only_the_filled_answer(checkpoint_dir: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    assert main(["infill", "--model", str(checkpoint_dir), "--question", "Name three animals",
                 "cat,[MASK*2], dog"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed.startswith("cat,") and printed.endswith(", dog") and "Name three" not in printed
    assert main(["infill", "--model", str(checkpoint_dir), "--question", "Q", "no gap"]) == 2
    assert "no gap to fill" in capsys.readouterr().err


def test_answer_text_stops_at_eos(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("the fox", add_special_tokens=False)
    tail = tokenizer.encode(" is lazy", add_special_tokens=False)
    assert answer_text(tokenizer, ids + [tokenizer.ids.eot] + tail) == "the fox"
    assert answer_text(tokenizer, ids + [tokenizer.ids.eos, tokenizer.ids.eos]) == "the fox"


def test_chat_streams_and_keeps_history(checkpoint_dir: Path) -> None:
    stdin = io.StringIO("Hi there\n/reset\nSecond question\n/exit\n")
    stdout = io.StringIO()
    run_chat(str(checkpoint_dir), SETTINGS, device="cpu", stdin=stdin, stdout=stdout)
    transcript = stdout.getvalue()
    assert transcript.count("> ") == 4 and "(history cleared)" in transcript


def test_ctrl_c_exits_cleanly(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C at the chat prompt ends the command with status 130 and one line, not a traceback."""

    class Interrupted(io.StringIO):
        def readline(self, *args) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    assert main(["chat", "--model", str(checkpoint_dir), "--device", "cpu"]) == 130
    error = capsys.readouterr().err
    assert "llada chat: interrupted" in error and "Traceback" not in error


def test_score_writes_jsonl(checkpoint_dir: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "The fox", "answer": " jumps", "id": 7}\n\n{"prompt": "a", "answer": " b c"}\n')
    output = tmp_path / "out" / "scored.jsonl"
    assert main(["score", "--model", str(checkpoint_dir), "--input", str(pairs), "--output", str(output),
                 "--mc-num", "8", "--batch-size", "4", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row.get("id") for row in rows] == [7, None]
    assert all(row["log_likelihood"] < 0 and row["stderr"] >= 0 and row["answer_tokens"] >= 1 for row in rows)


@pytest.mark.parametrize("content,message", [('{"prompt": "a"}\n', ":1: each line needs"),
                                             ('{"prompt": "a", "answer": "b"}\n{broken\n', ":2: invalid JSON"),
                                             ("", "no prompt/answer pairs")])
def test_score_reports_bad_lines(checkpoint_dir: Path, tmp_path: Path, capsys, content: str, message: str) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(content)
    output = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(checkpoint_dir), "--input", str(pairs), "--output", str(output)]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_info_of_checkpoint_and_preset(checkpoint_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(checkpoint_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in LLaDAModel.from_pretrained(checkpoint_dir).parameters())
    assert info["tokenizer"]["mask"] == info["config"]["mask_token_id"]
    assert main(["info", "8b"]) == 0
    assert json.loads(capsys.readouterr().out)["weights_memory_gib"]["bf16"] == pytest.approx(14.93, abs=0.01)


def test_convert_changes_dtype_and_shards(checkpoint_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "bf16"
    assert main(["convert", str(checkpoint_dir), str(target), "--dtype", "bf16", "--max-shard-size", "50KB"]) == 0
    assert (target / "model.safetensors.index.json").is_file() and (target / "tokenizer.json").is_file()
    original = LLaDAModel.from_pretrained(checkpoint_dir)
    converted = LLaDAModel.from_pretrained(target)
    assert converted.dtype == torch.bfloat16
    for a, b in zip(original.parameters(), converted.parameters()):
        assert torch.equal(a.to(torch.bfloat16), b)


@pytest.mark.parametrize(("dtype", "layer_type"), [("int8", Int8Linear), ("fp8", Fp8Linear)])
def test_quantized_dtypes_load_for_inference_only(checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  dtype: str, layer_type: type) -> None:
    model, _ = load(str(checkpoint_dir), "cpu", dtype)
    assert model.quantized == dtype and isinstance(model.blocks[0].q_proj, layer_type)
    assert model.wte.weight.dtype == torch.float32  # the rest as --dtype auto
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "The fox", "--dtype", dtype,
                 "--gen-length", "8", "--block-length", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["convert", str(checkpoint_dir), str(tmp_path / "q"), "--dtype", dtype]) == 2  # checkpoints stay exact
    assert f"unknown --dtype {dtype!r}" in capsys.readouterr().err


def test_init_creates_a_loadable_checkpoint(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some words to learn a tokenizer from, some words again and again. " * 20)
    target = tmp_path / "fresh"
    assert main(["init", str(target), "--train-tokenizer-on", str(corpus), "--vocab-size", "300"]) == 0
    model, tokenizer = LLaDAModel.from_pretrained(target), Tokenizer.from_pretrained(target)
    assert model.config.mask_token_id == tokenizer.ids.mask and model.config.vocab_size == tokenizer.vocab_size


def test_errors_exit_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "x")]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err


def test_bad_sampling_settings_are_reported(checkpoint_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--model", str(checkpoint_dir), "--prompt", "x", "--gen-length", "10", "--block-length", "4"]
    assert main(args) == 2
    assert "multiple of block_length" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "other_cache", "error"), [("--keep-prompt", "none", "keep_prompt needs a cache"),
                                                           ("--reuse-decided", "prefix", "reuse_decided needs cache='dual'")])
def test_cache_refining_flags(flag: str, other_cache: str, error: str, checkpoint_dir: Path,
                              capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--model", str(checkpoint_dir), "--prompt", "x", "--gen-length", "8", "--block-length", "4",
            flag, "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--cache", other_cache]) == 2
    assert error in capsys.readouterr().err


def test_console_script_help() -> None:
    result = subprocess.run([sys.executable, "-m", "llada", "generate", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "examples:" in result.stdout and "--block-length" in result.stdout


def test_tokenizer_train_then_data_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """tokenizer train -> data tokenize -> data sft, as a user would chain them."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_text(f"Document number {i}. " * 40)
    assert main(["tokenizer", "train", str(texts / "*.txt"), "--vocab-size", "300", "--output",
                 str(tmp_path / "tok")]) == 0
    assert "-token tokenizer (of 300 asked for" in capsys.readouterr().out
    assert main(["data", "tokenize", str(texts / "*.txt"), "--tokenizer", str(tmp_path / "tok"), "--output",
                 str(tmp_path / "packed"), "--workers", "1"]) == 0
    assert "3 files (0 reused from an earlier run), 3 documents" in capsys.readouterr().out
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]}) + "\n")
    assert main(["data", "sft", str(chats), "--tokenizer", str(tmp_path / "tok"), "--output",
                 str(tmp_path / "sft")]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 1
    assert main(["data", "tokenize", str(texts / "*.md"), "--tokenizer", str(tmp_path / "tok"), "--output",
                 str(tmp_path / "x")]) == 2
    assert "llada data tokenize: error: input" in capsys.readouterr().err


def test_plot_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for name, offset in (("a", 0.0), ("b", 0.5)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": 5.0 - 0.1 * s + offset, "lr": 1e-3, "tokens_per_s": 100.0, "skipped": False}
                for s in range(1, 6)] + [{"step": 3, "loss": float("nan"), "lr": 1e-3, "tokens_per_s": 1.0,
                                          "skipped": True}]
        rows[-2]["eval_loss"] = 4.0
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "a")]) == 0 and (tmp_path / "a" / "curves.png").is_file()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    # A post-training run gets a fourth panel, its reward: a wider figure.
    rows = [{"step": s, "loss": 0.1, "lr": 1e-3, "tokens_per_s": 9.0, "reward_mean": 0.1 * s} for s in range(1, 6)]
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["plot", str(tmp_path / "rl")]) == 0

    def width(png: Path) -> int:
        return int.from_bytes(png.read_bytes()[16:20], "big")

    assert width(tmp_path / "rl" / "curves.png") > width(tmp_path / "a" / "curves.png") * 1.2


def test_shipped_demo_model_is_the_default(capsys: pytest.CaptureFixture) -> None:
    """generate without --model uses models/demo, which loads in the official layout, within the size
    limits (shards of at most 16 MiB, 64 MiB in all), and answers a held-out sum right."""
    from llada.model.loading import DEMO_MODEL

    assert DEMO_MODEL.is_dir() and (DEMO_MODEL / "model.safetensors.index.json").is_file()
    shards = [path.stat().st_size for path in DEMO_MODEL.glob("*.safetensors")]
    assert max(shards) <= 16 * 2**20 and sum(shards) <= 64 * 2**20
    assert main(["generate", "--prompt", "What is 87 + 93?", "--gen-length", "32", "--block-length", "8"]) == 0
    assert capsys.readouterr().out.strip() == "180"
    model = LLaDAModel.from_pretrained(DEMO_MODEL)
    assert model.dtype == torch.bfloat16 and 20e6 < model.config.num_parameters() < 30e6


def test_deterministic_generation_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--deterministic``: the shipped model's answers to a file of prompts are the same in batches of
    3 as one by one; with ``--compile`` it is refused by name."""
    prompts = tmp_path / "prompts.jsonl"
    questions = ["What is 87 + 93?", "Reverse the list: apple, river, stone, cloud", "What is 64 - 29?"]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    answers = []
    for batch in ("1", "3"):
        output = tmp_path / f"answers{batch}.jsonl"
        assert main(["generate", "--deterministic", "--input", str(prompts), "--output", str(output),
                     "--batch-size", batch, "--gen-length", "16", "--block-length", "8"]) == 0
        answers.append([json.loads(line)["answer"] for line in output.read_text().splitlines()])
    assert answers[0] == answers[1] and answers[0][0] == "180"
    assert main(["generate", "--deterministic", "--compile", "--prompt", "Hi"]) == 2
    assert "drop compile" in capsys.readouterr().err


def test_generate_file_answers_every_line_in_batches(checkpoint_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello", "id": 1}\n\n{"messages": [{"role": "user", "content": "The fox"}]}\n'
                       '{"prompt": "Unicode café"}\n')
    output = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", str(checkpoint_dir), "--input", str(prompts), "--output", str(output),
                 "--batch-size", "2", *SMALL]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [1, None, None] and "messages" in rows[1]
    assert all(r["finish_reason"] in ("stop", "length") and r["steps"] >= 1 for r in rows)
    # Batched answers equal one-prompt answers.
    assert rows[0]["answer"] == run_generate(str(checkpoint_dir), "Hello", SETTINGS, device="cpu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert main(["generate", "--model", str(checkpoint_dir), "--input", str(bad), *SMALL]) == 2
    assert ":2: each line needs" in capsys.readouterr().err
    for line, message in (('{"messages": []}', ":1: no non-empty list field 'messages'"),
                          ('{"messages": [{"role": "robot", "content": "x"}]}', ":1: unknown role 'robot'"),
                          ('{"messages": [{"role": "user"}]}', ":1: messages: message 0 needs")):
        bad.write_text(line + "\n")
        assert main(["generate", "--model", str(checkpoint_dir), "--input", str(bad), *SMALL]) == 2
        assert message in capsys.readouterr().err


def test_serve_builds_the_server_from_its_flags(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    from llada.server.runner import DrainingServer

    calls = []
    monkeypatch.setattr(DrainingServer, "run", lambda server: calls.append(server.config))
    monkeypatch.setenv("LLADA_API_KEY", "from-env")
    assert main(["serve", "--model", str(checkpoint_dir), "--port", "0", "--max-batch", "4", "--max-queue", "9",
                 "--max-connections", "50", "--gen-length", "64", "--block-length", "16", "--threshold", "0.7",
                 "--device", "cpu"]) == 0
    options, = calls
    app, config = options.app, options.app.state.config
    assert (options.host, options.port) == ("127.0.0.1", 0)  # loopback unless told otherwise
    assert options.limit_concurrency == config.max_connections == 50
    assert (config.model_name, config.api_key, config.max_batch, config.max_queue) == ("tiny", "from-env", 4, 9)
    assert (config.settings.gen_length, config.settings.block_length, config.settings.threshold) == (64, 16, 0.7)
    assert app.state.worker.scheduler.max_batch == 4
    assert main(["serve", "--model", str(checkpoint_dir), "--sampler", "reference"]) == 2
    assert "decodes with the engine" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint_dir), "--gen-length", "2048", "--max-gen-length", "1024"]) == 2
    assert "max_gen_length" in capsys.readouterr().err


@pytest.mark.parametrize(("options", "error"), [
    (["--prompt", "x", "--batch-size", "4"], "--batch-size go with --input"),
    (["--prompt", "x", "--output", "out.jsonl", "--batch-size", "4"], "--output and --batch-size go with --input"),
    (["--input", "in.jsonl", "--show-prompt"], "--show-prompt goes with --prompt"),
])
def test_generate_refuses_options_of_the_other_input_mode(options: list[str], error: str, checkpoint_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(checkpoint_dir), *options])
    assert exit_info.value.code == 2
    assert error in capsys.readouterr().err


def test_generate_refuses_a_batch_size_below_one(checkpoint_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    assert main(["generate", "--model", str(checkpoint_dir), "--input", str(prompts), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_every_generation_setting_has_a_flag() -> None:
    """settings_from_args reads GenerationSettings' fields by name: each needs its flag (early_stop is
    --no-early-stop), else a new setting would silently keep its default on the command line."""
    from llada.cli.common import settings_from_args
    from llada.cli.main import build_parser
    from llada.engine.options import setting_names

    args = build_parser().parse_args(["generate", "--prompt", "x", "--logits-eos-inf", "--remasking", "random",
                                      "--refresh-every", "2", "--no-early-stop"])
    assert set(setting_names()) - {"early_stop"} <= set(vars(args))
    settings = settings_from_args(args)
    assert settings.logits_eos_inf and settings.remasking == "random" and settings.refresh_every == 2
    assert not settings.early_stop and not settings.confidence_eos_eot_inf


def test_info_refuses_a_truncated_shard(checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", str(checkpoint_dir), str(tmp_path / "sharded"), "--max-shard-size", "100KB"]) == 0
    assert main(["info", str(tmp_path / "sharded")]) == 0
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    assert main(["info", str(tmp_path / "sharded")]) == 2
    assert f"{shard.name} is not a readable safetensors file" in capsys.readouterr().err


def test_device_and_dtype_errors_name_the_choices(checkpoint_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "a", "--dtype", "float8"]) == 2
    assert "int8 / fp8" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "a", "--device", "cuda"]) == 2
        assert "asks for a GPU, but this torch build sees none" in capsys.readouterr().err
