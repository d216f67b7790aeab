import io
import re

import pytest
import torch

from lmforge.cli import main
from lmforge.infer import LLMEngine, SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import save_pretrained
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-model")
    tokenizer = train_tokenizer(
        ["hello there, how are you today?"] * 10, TokenizerTrainConfig(vocab_size=300)
    )
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=256)
    save_pretrained(Transformer(cfg), folder)
    tokenizer.save(folder)
    return folder


def test_generate_streams_the_engine_output(model_dir, capsys):
    assert (
        main(["generate", str(model_dir), "--prompt", "hello", "--max-tokens", "6", "--temperature", "0"])
        == 0
    )
    printed = capsys.readouterr().out
    expected = LLMEngine.from_pretrained(model_dir).generate(
        ["hello"], SamplingParams(max_tokens=6, temperature=0)
    )
    assert printed == expected[0].outputs[0].text + "\n"


def test_generate_several_prompts_and_beams(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "hi", "--prompt", "how", "--max-tokens", "4"]
    assert main([*args, "--beams", "3", "--n", "2"]) == 0
    # each completion starts a line with its [prompt.completion] tag (a completion's text may hold newlines)
    tags = re.findall(r"^\[\d+\.\d+\]", capsys.readouterr().out, flags=re.MULTILINE)
    assert tags == ["[0.0]", "[0.1]", "[1.0]", "[1.1]"]


def test_generate_rejects_bad_sampling_flags(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_uses_the_template_and_keeps_the_conversation(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\n/exit\n"))
    assert (
        main(["chat", str(model_dir), "--max-tokens", "5", "--temperature", "0", "--system", "be brief"]) == 0
    )
    out = capsys.readouterr().out
    engine = LLMEngine.from_pretrained(model_dir)
    params = SamplingParams(max_tokens=5, temperature=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    first = (
        engine.generate(
            [
                engine.tokenizer.encode(
                    engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                )
            ],
            params,
        )[0]
        .outputs[0]
        .text
    )
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "how are you"}]
    second = (
        engine.generate(
            [
                engine.tokenizer.encode(
                    engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                )
            ],
            params,
        )[0]
        .outputs[0]
        .text
    )
    assert out.count("assistant> ") == 2
    assert f"assistant> {first}\n" in out and f"assistant> {second}\n" in out


def test_generate_with_a_draft_model_matches_plain_greedy(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "hello", "--max-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--draft", str(model_dir), "--num-draft-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "draft acceptance" in captured.err


def test_generate_reports_a_broken_model_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit, match="cannot load"):
        main(["generate", str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit, match="not a model folder"):
        main(["chat", str(tmp_path / "missing")])


def test_generate_in_bf16_without_fusion_runs(model_dir, capsys):
    argv = ["generate", str(model_dir), "--prompt", "hello", "--max-tokens", "4", "--temperature", "0"]
    assert main([*argv, "--dtype", "bfloat16", "--no-fuse"]) == 0
    assert main([*argv, "--pack-weights"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit):  # argparse refuses a dtype the engine does not offer
        main([*argv, "--dtype", "float16"])
