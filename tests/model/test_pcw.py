import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.pcw import pcw_forward, pcw_generate, pcw_layout, split_windows


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    shape = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    return Transformer(ModelConfig(**{**shape, **overrides})).eval()


def reference_greedy(model, ids, n):
    out = []
    for _ in range(n):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def test_layout_positions_and_visibility():
    positions, visible = pcw_layout([3, 2], 2)
    assert positions.tolist() == [0, 1, 2, 0, 1, 3, 4]
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],  # window 2 never sees window 1
        [0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],  # task tokens see every window
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert visible.int().tolist() == expected
    with pytest.raises(ValueError):
        pcw_layout([3, 0], 1)


def test_split_windows():
    assert split_windows(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_windows([9, 1, 2, 3, 4], 2, bos_id=9) == [[9, 1, 2], [9, 3, 4]]
    with pytest.raises(ValueError, match="cannot fill"):
        split_windows([1, 2], 3)


def test_one_window_is_the_ordinary_forward_and_generate():
    model = tiny()
    context, task = [3, 9, 12, 40, 7, 7, 21], [5, 6]
    with torch.no_grad():
        plain = model(torch.tensor([context + task])).logits[0]
        torch.testing.assert_close(pcw_forward(model, [context], task), plain, atol=1e-5, rtol=1e-5)
        assert pcw_generate(model, context, task, 1, 6) == reference_greedy(model, context + task, 6)


def test_windows_never_attend_across_and_the_task_sees_them_all():
    model = tiny()
    a, b, task = [3, 9, 12, 40], [7, 21, 30], [5, 6]
    with torch.no_grad():
        logits = pcw_forward(model, [a, b], task)
        # each window's logits are those of the window alone, at positions 0..w-1
        torch.testing.assert_close(logits[:4], model(torch.tensor([a])).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[4:7], model(torch.tensor([b])).logits[0], atol=1e-5, rtol=1e-5)
        # changing window b leaves window a alone but changes the task tokens
        other = pcw_forward(model, [a, [8, 8, 8]], task)
        torch.testing.assert_close(other[:4], logits[:4])
        assert not torch.allclose(other[-2:], logits[-2:])
        # the task continues after the longest window (4): its logits are not those at positions 7, 8
        seq = model(torch.tensor([a + b + task])).logits[0]
        assert not torch.allclose(seq[-2:], logits[-2:])


def test_cached_generation_equals_the_one_pass_layout():
    model = tiny(seed=1)
    context, task = list(range(10, 31)), [5, 6, 7]
    n = 5
    got = pcw_generate(model, context, task, 3, n)
    windows = split_windows(context, 3)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            expected.append(int(pcw_forward(model, windows, task + expected)[-1].argmax()))
    assert got == expected
    assert pcw_generate(model, context, task, 3, n, stop_ids=[expected[1]]) == expected[:1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lmforge.model.hf import save_pretrained
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    folder = tmp_path_factory.mktemp("pcw-model")
    tokenizer = train_tokenizer(
        ["hello there, how are you today?\n"] * 10, TokenizerTrainConfig(vocab_size=300)
    )
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=256)
    save_pretrained(Transformer(cfg), folder)
    tokenizer.save(folder)
    return folder


def test_generate_command_with_parallel_windows(model_dir, capsys):
    from lmforge.cli import main
    from lmforge.model.hf import load_pretrained
    from lmforge.tokenizer import load_tokenizer

    prompt = "hello there, how are you\nhow are you today, hello there\nhello"
    args = ["generate", str(model_dir), "--prompt", prompt, "--max-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    engine_text = capsys.readouterr().out
    # one window: the same greedy reply as the engine's
    assert main([*args, "--pcw-windows", "1"]) == 0
    assert capsys.readouterr().out == engine_text
    assert main([*args, "--pcw-windows", "2"]) == 0
    model, tok = load_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    context, task = prompt.rsplit("\n", 1)
    ids = pcw_generate(model, tok.encode(context + "\n", add_special_tokens=True), tok.encode(task), 2, 6,
                       stop_ids=[tok.eos_id] if tok.eos_id is not None else [], bos_id=tok.bos_id)  # fmt: skip
    assert capsys.readouterr().out == tok.decode(ids, skip_special_tokens=True) + "\n"
    assert main([*args[:3], "no task line", "--pcw-windows", "2"]) == 2
