from lmforge.data.text import duplicate_stats, normalize_for_hash, split_words, word_hashes


def test_split_words_separates_punctuation():
    assert split_words("Don't stop... now, ok?") == ["Don't", "stop", "...", "now", ",", "ok", "?"]
    assert split_words("Don't stop... now, ok?", symbols=False) == ["Don't", "stop", "now", "ok"]


def test_duplicate_stats_counts_repeats_after_first():
    assert duplicate_stats(["ab", "c", "ab", "ab", "c"]) == (3, 5)
    assert duplicate_stats([]) == (0, 0)


def test_normalize_for_hash():
    assert normalize_for_hash("  Hello,\tWORLD — it’s   “fine”! ") == "hello world its fine"
    assert normalize_for_hash("Ｆｕｌｌ width") == "full width"


def test_word_hashes_ignore_case_and_punctuation():
    hashes, counts = word_hashes(["Hello, world! hello WORLD", "", "x", "world—hello", "héllo"])
    assert counts.tolist() == [4, 0, 1, 2, 1]
    hello, world, x = hashes[0], hashes[1], hashes[4]
    assert len({hello, world, x, hashes[7]}) == 4  # "héllo" differs from "hello"
    assert hashes[:7].tolist() == [hello, world, hello, world, x, world, hello]
    # A word hashes the same wherever it sits in the batch.
    alone, _ = word_hashes(["world"])
    assert alone[0] == world


def test_word_hashes_of_documents_longer_than_a_piece():
    (word,), _ = word_hashes(["word"])
    hashes, counts = word_hashes(["intro", "word " * 300_000, "outro"])  # 1.5 MB: cut at spaces
    assert counts.tolist() == [1, 300_000, 1]
    assert (hashes[1:-1] == word).all()
    # A single 1.5 MB "word" has no place to cut: it is split into pieces (it is junk either way).
    _, counts = word_hashes(["x" * 1_500_000])
    assert counts.tolist() == [2]


def test_word_hashes_keep_multibyte_characters_whole():
    # "Å" is C3 85 in UTF-8: the 0x85 byte must not be taken for a separator (U+0085 is one).
    hashes, counts = word_hashes(["ÅÅ bÅ", "a\u2003b\u0085c"])
    assert counts.tolist() == [2, 3]
    assert hashes[0] != hashes[1]


def reference_word_hash(word: str) -> int:
    """sum c_j * B^j (mod 2^64) over the word's UTF-8 bytes, avalanched by MurmurHash3's fmix64."""
    mask, value = (1 << 64) - 1, 0
    for j, c in enumerate(word.encode()):
        value = (value + c * pow(0x100000001B3, j, 1 << 64)) & mask
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        value = ((value ^ (value >> 33)) * multiplier) & mask
    return value ^ (value >> 33)


def test_word_hashes_match_a_reference_over_every_separator():
    from lmforge.data.text import _SEPARATOR_CHARS, fold_case_and_punctuation

    texts = [
        "Ünïcode wörds"
        + "".join(f"x{i}{c}Y{i}" for i, c in enumerate(_SEPARATOR_CHARS))
        + " 中文。日本語、ok",
        "plain ascii, with punctuation!\tand\ttabs\r\nand\x1cfile\x1fseparators",
        "",
        "—“”…",
        "ΣΑΣ Straße ǅ",
    ]
    hashes, counts = word_hashes(texts)
    words = [w for t in texts for w in fold_case_and_punctuation(t).split()]
    assert counts.tolist() == [len(fold_case_and_punctuation(t).split()) for t in texts]
    assert hashes.tolist() == [reference_word_hash(w) for w in words]


def test_word_hashes_of_ascii_documents_fold_case_as_str_lower():
    """ASCII documents skip ``str.lower`` (the byte table lowercases them): same words and hashes as the
    reference, also next to non-ASCII documents in the same group and in a document cut into pieces."""
    from lmforge.data.text import fold_case_and_punctuation

    letters = "".join(chr(c) for c in range(ord("A"), ord("Z") + 1))
    texts = [
        f"{letters} {letters.lower()} MiXeD-CaSe@WORDS[1]{{2}}~Z",
        "Ärger ÜBER Straße",
        "ABC " * 300_000 + "TAIL",  # 1.2 MB: cut into pieces at spaces
    ]
    hashes, counts = word_hashes(texts)
    words = [w for t in texts for w in fold_case_and_punctuation(t).split()]
    assert counts.tolist() == [len(fold_case_and_punctuation(t).split()) for t in texts]
    distinct = {w: reference_word_hash(w) for w in set(words)}
    assert hashes.tolist() == [distinct[w] for w in words]
    assert distinct["abc"] == reference_word_hash("abc") != reference_word_hash("ABC")
