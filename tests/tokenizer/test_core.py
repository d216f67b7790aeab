import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    TOKENIZER_KINDS,
    Tokenizer,
    TokenizerTrainConfig,
    load_tokenizer,
    render_chat_template,
    train_tokenizer,
)

VARIED_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; they'll see 1234567 items!",
    "안녕하세요, 세계! 한국어 문장을 토큰화합니다.",
    "你好，世界。这是一个中文句子，用来测试分词器。",
    "日本語のテキストもあります。カタカナとひらがな。",
    "Emoji: 🙂🚀👩‍👩‍👧 and symbols ©®™ — “quotes” and…",
    "def add(a, b):\n    return a + b  # adds\n\n\tif x:\n        pass\r\n",
    "Ｆｕｌｌ-width ＡＢＣ １２３ and ligature ﬁ and ① ㎏",
    "   leading and trailing spaces   ",
    "Mixed: Привет мир, γειά σου κόσμε, مرحبا بالعالم",
]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? 🙂"},
]


def corpus() -> list[str]:
    return VARIED_TEXTS * 20


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    return train_tokenizer(corpus(), TokenizerTrainConfig(kind="byte_bpe", vocab_size=600, min_frequency=1))


def test_byte_bpe_round_trips_everything_without_unknowns(byte_bpe: Tokenizer) -> None:
    unseen = "Zebra ∑ ∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 뷁 \x00 control"  # characters never seen in training
    for text in [*VARIED_TEXTS, unseen]:
        assert byte_bpe.decode(byte_bpe.encode(text)) == text
    assert byte_bpe.unk_id is None


def test_cl100k_split_keeps_digits_in_groups_of_three(byte_bpe: Tokenizer) -> None:
    pieces = byte_bpe.backend.pre_tokenizer.pre_tokenize_str("x 1234567 it's")
    # ByteLevel maps the space to 'Ġ'; the regex splits numbers into <=3 digit groups and contractions apart.
    assert [p for p, _ in pieces] == ["x", "Ġ", "123", "456", "7", "Ġit", "'s"]


def test_special_tokens_and_ids(byte_bpe: Tokenizer) -> None:
    assert [byte_bpe.bos_id, byte_bpe.eos_id, byte_bpe.pad_id] == [0, 1, 2]
    im_start = byte_bpe.token_to_id("<|im_start|>")
    assert im_start is not None
    # special tokens in text are matched whole, not split by the regex
    assert byte_bpe.encode("<|im_start|>user")[0] == im_start
    assert byte_bpe.encode("hi", add_special_tokens=True)[0] == byte_bpe.bos_id
    assert byte_bpe.decode(byte_bpe.encode("<|im_end|>x"), skip_special_tokens=True) == "x"


@pytest.mark.parametrize(
    ("kind", "add_bos"), [(kind, True) for kind in TOKENIZER_KINDS] + [("byte_bpe", False)]
)
def test_saved_folder_loads_in_transformers_and_encodes_identically(
    kind: str, add_bos: bool, tmp_path
) -> None:
    cfg = TokenizerTrainConfig(kind=kind, vocab_size=400, min_frequency=1, add_bos_token=add_bos)
    tok = train_tokenizer(corpus(), cfg)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert hf.bos_token == tok.bos_token and hf.eos_token == tok.eos_token and hf.pad_token == tok.pad_token
    assert hf.eos_token_id == tok.eos_id and len(hf) == tok.vocab_size
    for text in VARIED_TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == tok.encode(text, add_special_tokens=True)
        assert (tok.encode(text, add_special_tokens=True)[0] == tok.bos_id) == add_bos
        ids = tok.encode(text)
        assert hf.decode(ids) == tok.decode(ids)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.sha256() == tok.sha256()
    assert all(reloaded.encode(t) == tok.encode(t) for t in VARIED_TEXTS)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("with_system", [False, True])
def test_chat_template_matches_transformers(
    byte_bpe: Tokenizer, tmp_path, add_generation_prompt, with_system
) -> None:
    byte_bpe.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    ours = byte_bpe.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_default_template_ends_assistant_turns_with_eos(byte_bpe: Tokenizer) -> None:
    text = byte_bpe.apply_chat_template(CONVERSATION[:3])
    assert text.endswith("4<|im_end|><|end_of_text|>\n")
    ids = byte_bpe.encode(text)
    assert ids.count(byte_bpe.eos_id) == 1


# A template in the style of real Hub templates: namespace, loop controls, tojson, raise_exception, bos_token.
HUB_STYLE_TEMPLATE = """{{ bos_token }}{% set ns = namespace(system='') %}
{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}
{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
[{{ m['role'] | upper }}]{% if loop.first and ns.system %} ({{ ns.system }}){% endif %} {{ m['content'] }}
{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


def test_hub_style_template_matches_transformers(byte_bpe: Tokenizer, tmp_path) -> None:
    byte_bpe.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    tools = [{"name": "add", "description": "<adds> & returns"}]
    for gen in (False, True):
        ours = byte_bpe.apply_chat_template(CONVERSATION, gen, chat_template=HUB_STYLE_TEMPLATE, tools=tools)
        theirs = hf.apply_chat_template(
            CONVERSATION,
            tokenize=False,
            add_generation_prompt=gen,
            chat_template=HUB_STYLE_TEMPLATE,
            tools=tools,
        )
        assert ours == theirs
    assert '"<adds> & returns"' in ours  # tojson does not HTML-escape


def test_chat_template_is_sandboxed_and_can_raise() -> None:
    from jinja2.exceptions import SecurityError, TemplateError

    with pytest.raises(TemplateError, match="no tools"):
        render_chat_template("{{ raise_exception('no tools') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ messages.append(1) }}", [])


def test_loads_folder_written_by_transformers(byte_bpe: Tokenizer, tmp_path) -> None:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=byte_bpe.backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=2048,
    )
    hf.chat_template = HUB_STYLE_TEMPLATE
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "<|im_end|>" and tok.eos_id == hf.eos_token_id
    assert tok.model_max_length == 2048
    for text in VARIED_TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.apply_chat_template(CONVERSATION, True) == hf.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


def test_load_without_tokenizer_json_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_nfkc_changes_full_width_and_compatibility_characters() -> None:
    plain = train_tokenizer(corpus(), TokenizerTrainConfig(vocab_size=500, min_frequency=1))
    nfkc = train_tokenizer(
        corpus(), TokenizerTrainConfig(vocab_size=500, min_frequency=1, normalization="nfkc")
    )
    normalize = nfkc.backend.normalizer.normalize_str
    assert normalize("ＡＢＣ１２３") == "ABC123"  # full-width Latin and digits
    assert normalize("ﬁ ① ㎏ ｶﾀｶﾅ") == "fi 1 kg カタカナ"  # ligature, circled digit, unit, half-width kana
    assert normalize("한국어 中文") == "한국어 中文"  # precomposed Hangul and CJK are already NFKC
    # the NFKC tokenizer maps full-width text onto the same ids as its ASCII form; the plain one does not
    assert nfkc.encode("ＡＢＣ") == nfkc.encode("ABC")
    assert plain.encode("ＡＢＣ") != plain.encode("ABC")
    # ... and so no longer round-trips it
    assert nfkc.decode(nfkc.encode("ＡＢＣ")) == "ABC"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        TokenizerTrainConfig(kind="sentencepiece")
    with pytest.raises(ValueError, match="normalization"):
        TokenizerTrainConfig(normalization="nfx")


def test_tokenizer_config_json_fields(byte_bpe: Tokenizer, tmp_path) -> None:
    byte_bpe.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert config["eos_token"] == "<|end_of_text|>" and config["model_max_length"] == 8192


def test_loads_legacy_folders_and_named_chat_templates(byte_bpe: Tokenizer, tmp_path) -> None:
    # older transformers folders: named tokens only in special_tokens_map.json (AddedToken dicts allowed),
    # chat templates as a list of named templates
    (tmp_path / "tokenizer.json").write_text(byte_bpe.backend.to_str(), encoding="utf-8")
    eos = {
        "content": "<|im_end|>",
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
    }
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "pad_token": "<|pad|>"}))
    templates = [
        {"name": "tool_use", "template": "tools!"},
        {"name": "default", "template": "{{ eos_token }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": templates, "model_max_length": 1e30})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_id == byte_bpe.pad_id and tok.bos_token is None
    assert tok.model_max_length == 8192  # transformers' "unknown" sentinel is not kept
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_end|>"
    assert tok.encode("hello world") == byte_bpe.encode("hello world")


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_split_digits_makes_every_digit_a_token_and_loads_in_transformers(kind: str, tmp_path) -> None:
    numbers = [f"What is {a} + {b}? It is {a + b} in 2024." for a in range(0, 999, 7) for b in (13, 58, 901)]
    cfg = TokenizerTrainConfig(kind=kind, vocab_size=400, min_frequency=1, split_digits=True)
    tok = train_tokenizer(numbers, cfg)
    text = "What is 123 + 456? It is 579 in 2024."
    ids = tok.encode(text)
    pieces = [tok.decode([i]).strip().removeprefix("##") for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "1234565792024" and all(len(p) == 1 for p in digit_pieces)
    if kind == "byte_bpe":
        assert tok.decode(ids) == text
    tok.save(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"] == ids
    without = train_tokenizer(numbers, TokenizerTrainConfig(kind=kind, vocab_size=400, min_frequency=1))
    assert len(without.encode(text)) < len(ids)  # the default merges digits
