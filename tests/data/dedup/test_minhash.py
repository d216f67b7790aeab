import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from lmforge.data.dedup.lsh import (
    cluster_near_duplicates,
    estimated_jaccard,
    jaccard,
    lsh_candidate_pairs,
    optimal_lsh_params,
)
from lmforge.data.dedup.minhash import MinHasher, first_affine_hit, mersenne_folding_fails

DATASKETCH_SCHEME = {"mersenne": "legacy", "affine32": "affine32"}


def random_text(rng: np.random.Generator, n_words: int, vocab: int = 3000) -> str:
    return " ".join(f"w{rng.integers(vocab)}" for _ in range(n_words))


@pytest.mark.parametrize("num_perm", [112, 128])
@pytest.mark.parametrize("scheme", ["mersenne", "affine32"])
def test_signatures_bit_identical_to_datasketch(scheme, num_perm):
    """Same shingle hashes + same seed -> exactly datasketch's hash values, for both permutation schemes."""
    rng = np.random.default_rng(0)
    hasher = MinHasher(num_perm=num_perm, scheme=scheme, seed=3)
    texts = [random_text(rng, int(rng.integers(0, 300))) for _ in range(20)] + ["two words", ""]
    signatures = hasher.signatures(texts, batch_size=7)
    for text, signature in zip(texts, signatures):
        reference = MinHash(num_perm=num_perm, seed=3, scheme=DATASKETCH_SCHEME[scheme], hashfunc=int)
        hashes = hasher.shingle_hashes(text)
        if len(hashes):
            reference.update_batch(hashes.tolist())
        np.testing.assert_array_equal(signature, reference.hashvalues)


def test_first_affine_hit_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(3000):
        m = int(rng.integers(1, 200))
        a, b = int(rng.integers(0, 3 * m)), int(rng.integers(0, m))
        lo = int(rng.integers(0, m))
        hi = int(rng.integers(lo, m))
        # (a x + b) mod m has period dividing m: no hit below m means no hit at all.
        expected = next((x for x in range(m) if lo <= (a * x + b) % m <= hi), None)
        assert first_affine_hit(a, b, m, lo, hi) == expected, (a, b, m, lo, hi)


def test_permutations_where_the_fast_mersenne_reduction_fails_are_computed_exactly():
    """A permutation made to hit v & (2^61 - 1) == 2^61 - 1 on a shingle, where v + (v >> 61) is off by
    one (mod 2^32), must still give datasketch's exact values."""
    text = "the quick brown fox jumps over the lazy dog and runs far away"
    hasher = MinHasher(num_perm=16, seed=5, scheme="mersenne")
    assert len(hasher._exact_rows) == 0 and not mersenne_folding_fails(int(hasher.a[0]), int(hasher.b[0]))
    x0 = int(hasher.shingle_hashes(text)[3])
    a, b = hasher.a.copy(), hasher.b.copy()
    b[0] = ((1 << 61) - 1 - int(a[0]) * x0) % (1 << 61)
    assert mersenne_folding_fails(int(a[0]), int(b[0]))
    v = (int(a[0]) * x0 + int(b[0])) % (1 << 64)
    assert (v + (v >> 61)) & 0xFFFFFFFF != v % ((1 << 61) - 1) & 0xFFFFFFFF  # folding alone is wrong here
    hasher._set_permutations(a, b)
    assert hasher._exact_rows.tolist() == [0]
    reference = MinHash(num_perm=16, scheme="legacy", hashfunc=int, permutations=(a, b))
    reference.update_batch(hasher.shingle_hashes(text).tolist())
    np.testing.assert_array_equal(hasher.signatures([text, "", "other words here"])[0], reference.hashvalues)


def test_low_halves_that_wrap_are_candidates():
    """Permutations crafted so a shingle's low 32 bits L sit within 7 of 2^32: ``L + (v >> 61)`` wraps to
    a tiny value (the true minimum) or the candidate bound overflows; the result must still be exact."""
    long_text = " ".join(f"w{i}" for i in range(300))
    hasher = MinHasher(num_perm=8, seed=2, scheme="mersenne")
    (x_single,) = hasher.shingle_hashes("one two")  # fewer words than an n-gram: a single shingle
    a, b = hasher.a.copy(), hasher.b.copy()
    rng = np.random.default_rng(9)

    def offset_for(k: int, x: int, low: int) -> int:  # b < 2^61 giving (a_k x + b) a low half of `low`
        return int(rng.integers(0, 1 << 29)) << 32 | (low - int(a[k]) * x) % (1 << 32)

    for x in hasher.shingle_hashes(long_text).tolist():
        b[1] = offset_for(1, x, (1 << 32) - 1)
        if (int(a[1]) * x + int(b[1])) % (1 << 64) >> 61:  # L + h wraps to h - 1
            break
    b[2] = offset_for(2, int(x_single), (1 << 32) - 3)  # F = L + 7 wraps
    b[3] = offset_for(3, int(x_single), (1 << 32) - 10)  # min F + 7 overflows
    hasher._set_permutations(a, b)
    assert len(hasher._exact_rows) == 0  # the fast path is what is tested
    texts = [long_text, "one two"]
    signatures = hasher.signatures(texts)
    assert signatures[0, 1] < 7
    for text, signature in zip(texts, signatures):
        reference = MinHash(num_perm=8, scheme="legacy", hashfunc=int, permutations=(a, b))
        reference.update_batch(hasher.shingle_hashes(text).tolist())
        np.testing.assert_array_equal(signature, reference.hashvalues)


def test_minimum_from_a_shingle_whose_low_half_is_not_the_smallest():
    """A permutation crafted so shingle 1's low 32 bits are one more than shingle 0's (the smallest) but
    its v >> 61 is smaller by two or more: the minimum comes from shingle 1."""
    hasher = MinHasher(num_perm=4, seed=4, scheme="mersenne")
    rng = np.random.default_rng(10)
    text = next(
        t
        for t in (f"a b c d e f{i}" for i in range(100))
        if np.diff(hasher.shingle_hashes(t).astype(np.int64))[0] % 2
    )
    x0, x1 = (int(x) for x in hasher.shingle_hashes(text))
    a, b = hasher.a.copy(), hasher.b.copy()
    while True:  # L1 = L0 + 1 needs a (x1 - x0) = 1 (mod 2^32); the high halves are drawn until h0 >= h1 + 2
        a[0] = int(rng.integers(0, 1 << 28)) << 32 | pow(x1 - x0, -1, 1 << 32)
        b[0] = int(rng.integers(0, 1 << 28)) << 32 | (1000 - int(a[0]) * x0) % (1 << 32)
        h0, h1 = ((int(a[0]) * x + int(b[0])) % (1 << 64) >> 61 for x in (x0, x1))
        if h0 >= h1 + 2:
            break
    hasher._set_permutations(a, b)
    assert len(hasher._exact_rows) == 0
    signature = hasher.signatures([text])[0]
    assert signature[0] == 1001 + h1
    reference = MinHash(num_perm=4, scheme="legacy", hashfunc=int, permutations=(a, b))
    reference.update_batch([x0, x1])
    np.testing.assert_array_equal(signature, reference.hashvalues)


@pytest.mark.parametrize("scheme", ["mersenne", "affine32"])
def test_signatures_of_many_documents_straddling_chunks_match_datasketch(scheme):
    rng = np.random.default_rng(8)
    hasher = MinHasher(num_perm=32, scheme=scheme)
    hasher._chunk = 128  # small chunks: most documents straddle chunk boundaries
    hasher._set_permutations(hasher.a, hasher.b)
    texts = [random_text(rng, int(rng.integers(0, 3 * hasher._chunk))) for _ in range(40)]
    hashes, offsets = hasher.shingle_hash_batch(texts)
    signatures = hasher.signatures_from_hashes(hashes, offsets)
    for i, signature in enumerate(signatures):
        reference = MinHash(num_perm=32, scheme=DATASKETCH_SCHEME[scheme], hashfunc=int)
        reference.update_batch(hashes[offsets[i] : offsets[i + 1]].tolist())
        np.testing.assert_array_equal(signature, reference.hashvalues)
    # Hashes outside the documents' ranges are ignored.
    framed = np.concatenate((hashes[::-1][:5], hashes, np.zeros(3, dtype=np.uint32)))
    np.testing.assert_array_equal(hasher.signatures_from_hashes(framed, offsets + 5), signatures)
    np.testing.assert_array_equal(hasher.signatures_from_hashes(hashes, offsets[3:]), signatures[3:])
    with pytest.raises(TypeError, match="uint32"):
        hasher.signatures_from_hashes(hashes.astype(np.uint64), offsets)


@pytest.mark.parametrize("scheme", ["mersenne", "affine32"])
def test_giant_document_is_sliced_without_changing_the_signature(scheme):
    rng = np.random.default_rng(1)
    hasher = MinHasher(num_perm=64, scheme=scheme)
    text = random_text(rng, 5 * hasher._chunk)
    reference = MinHash(num_perm=64, seed=1, scheme=DATASKETCH_SCHEME[scheme], hashfunc=int)
    reference.update_batch(hasher.shingle_hashes(text).tolist())
    np.testing.assert_array_equal(hasher.signatures([text, "a short one"])[0], reference.hashvalues)


def test_shingle_batches_agree_with_single_documents():
    hasher = MinHasher(ngram=3)
    texts = ["one two three four five", "six seven", "", "one two three four"]
    batch, offsets = hasher.shingle_hash_batch(texts)
    assert offsets.tolist() == [0, 3, 4, 4, 6]  # 3 trigrams, 1 whole-doc shingle, none, 2 trigrams
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(batch[offsets[i] : offsets[i + 1]], hasher.shingle_hashes(text))
    # Shared trigrams hash the same across documents; order matters.
    assert batch[0] == batch[4] and batch[1] == batch[5]
    assert hasher.shingle_hashes("c b a")[0] != hasher.shingle_hashes("a b c")[0]


def test_estimated_jaccard_tracks_exact_jaccard():
    rng = np.random.default_rng(2)
    hasher = MinHasher(num_perm=256, ngram=1)
    errors = []
    for overlap in (50, 150, 250, 350):
        a = [f"x{i}" for i in range(400)]
        b = a[:overlap] + [f"y{i}" for i in range(400 - overlap)]
        rng.shuffle(b)
        ha, hb = hasher.shingle_hashes(" ".join(a)), hasher.shingle_hashes(" ".join(b))
        sa, sb = hasher.signatures([" ".join(a), " ".join(b)])
        exact = jaccard(ha, hb)
        assert exact == pytest.approx(overlap / (800 - overlap))
        errors.append(abs(estimated_jaccard(sa, sb) - exact))
    # Standard error of the estimate is sqrt(J(1-J)/256) <= 0.031; allow 3 sigma.
    assert max(errors) < 0.095


def test_agreement_statistics_comparable_to_datasketch():
    """Mean |estimate - exact| over many pairs is the same order for ours and datasketch's default MinHash."""
    rng = np.random.default_rng(3)
    hasher = MinHasher(num_perm=128, ngram=1)
    ours, theirs = [], []
    for _ in range(40):
        base = [f"t{j}" for j in rng.choice(5000, 200, replace=False)]
        other = base[: int(rng.integers(20, 200))] + [f"u{j}" for j in range(int(rng.integers(0, 150)))]
        exact = len(set(base) & set(other)) / len(set(base) | set(other))
        sa, sb = hasher.signatures([" ".join(base), " ".join(other)])
        ours.append(abs(estimated_jaccard(sa, sb) - exact))
        ma, mb = MinHash(num_perm=128), MinHash(num_perm=128)
        ma.update_batch([w.encode() for w in base])
        mb.update_batch([w.encode() for w in other])
        theirs.append(abs(ma.jaccard(mb) - exact))
    assert np.mean(ours) < 0.05 and np.mean(theirs) < 0.05
    assert np.mean(ours) < 2 * np.mean(theirs) + 0.01


def planted_corpus(rng: np.random.Generator, n_base: int = 40):
    """Distinct base documents, each with 0-2 light edits of itself (a few words replaced)."""
    texts, cluster = [], []
    for c in range(n_base):
        words = random_text(rng, 200, vocab=100_000).split()
        texts.append(" ".join(words))
        cluster.append(c)
        for _ in range(int(rng.integers(0, 3))):
            edited = list(words)
            for pos in rng.choice(len(edited), 2, replace=False):
                edited[pos] = f"edit{rng.integers(10**6)}"
            texts.append(" ".join(edited))
            cluster.append(c)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.array(cluster)[order]


@pytest.mark.parametrize("verify", [False, True])
def test_planted_near_duplicates_are_found(verify):
    rng = np.random.default_rng(4)
    texts, truth = planted_corpus(rng)
    hasher = MinHasher(num_perm=128, ngram=5)
    signatures = hasher.signatures(texts)
    shingles = [hasher.shingle_hashes(t) for t in texts] if verify else None
    roots = cluster_near_duplicates(signatures, threshold=0.7, shingle_sets=shingles)
    # Clusters found == planted clusters, and each is represented by its smallest index.
    for c in np.unique(truth):
        members = np.flatnonzero(truth == c)
        assert set(roots[members].tolist()) == {members.min()}
    kept = roots == np.arange(len(texts))
    assert kept.sum() == len(np.unique(truth))


def test_verification_rejects_band_collisions_below_threshold():
    hasher = MinHasher(num_perm=128, ngram=1)
    a = " ".join(f"a{i}" for i in range(100))
    b = " ".join(f"a{i}" for i in range(60)) + " " + " ".join(f"b{i}" for i in range(40))  # J = 60/140
    signatures = hasher.signatures([a, b])
    # One band of one row: almost surely a candidate pair, but far below 0.9 exact similarity.
    pairs = lsh_candidate_pairs(signatures, bands=128, rows=1)
    assert pairs.tolist() == [[0, 1]]
    shingles = [hasher.shingle_hashes(a), hasher.shingle_hashes(b)]
    roots = cluster_near_duplicates(signatures, threshold=0.9, bands=128, rows=1, shingle_sets=shingles)
    assert roots.tolist() == [0, 1]
    assert cluster_near_duplicates(signatures, threshold=0.9, bands=128, rows=1).tolist() == [0, 0]


def test_candidate_pairs_agree_with_datasketch_lsh():
    """Same signatures, same (b, r): our bucket pairs are exactly datasketch MinHashLSH's query results."""
    rng = np.random.default_rng(5)
    texts, _ = planted_corpus(rng, n_base=15)
    hasher = MinHasher(num_perm=128, scheme="affine32")
    signatures = hasher.signatures(texts)
    bands, rows = optimal_lsh_params(0.5, 128)
    ours = {tuple(p) for p in lsh_candidate_pairs(signatures, bands, rows, all_pairs=True).tolist()}
    lsh = MinHashLSH(threshold=0.5, num_perm=128)
    assert (lsh.b, lsh.r) == (bands, rows)
    sketches = [MinHash(num_perm=128, hashvalues=s, scheme="affine32") for s in signatures]
    for i, m in enumerate(sketches):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m) if i != j}
    assert ours == theirs and ours


@pytest.mark.parametrize("verify", [False, True])
def test_minhash_dedup_step_across_tasks(two_passes, verify):
    from lmforge.data.dedup.minhash import MinHashDedup
    from lmforge.data.document import Document
    from lmforge.data.step import STEPS

    assert STEPS["minhash_dedup"] is MinHashDedup
    rng = np.random.default_rng(6)
    base = [random_text(rng, 150, vocab=100_000) for _ in range(4)]
    near = base[0].replace(base[0].split()[10], "changed", 1)
    tasks = [
        [Document("d3", base[0]), Document("d1", base[1])],
        [Document("d0", near), Document("d2", base[2]), Document("d9", base[1] + " tail")],
        [Document("d5", base[3])],
    ]
    step = MinHashDedup(threshold=0.7, verify=verify, batch_size=2)
    kept = two_passes(step, tasks)
    assert [[d.id for d in task] for task in kept] == [["d1"], ["d0", "d2"], ["d5"]]
    assert step.stats.removed == {"minhash_near_duplicate": 2}
    sizes = {d.id: d.meta.get("minhash_cluster_size") for task in kept for d in task}
    assert sizes == {"d1": 2, "d0": 2, "d2": None, "d5": None}


def test_minhash_dedup_configuration_is_checked():
    from lmforge.data.dedup.minhash import MinHashDedup

    assert (MinHashDedup(threshold=0.8).bands, MinHashDedup(threshold=0.8).rows) == optimal_lsh_params(
        0.8, 128
    )
    assert (MinHashDedup(bands=20, rows=5).bands, MinHashDedup(bands=20, rows=5).rows) == (20, 5)
    with pytest.raises(ValueError, match="both bands and rows"):
        MinHashDedup(bands=20)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        MinHashDedup(num_perm=64, bands=20, rows=5)
    with pytest.raises(ValueError, match="scheme"):
        MinHashDedup(scheme="sha1")


def test_minhash_removals_name_the_kept_document_and_cluster(two_passes):
    from lmforge.data.dedup.minhash import MinHashDedup
    from lmforge.data.document import Document

    rng = np.random.default_rng(7)
    base = [random_text(rng, 150, vocab=100_000) for _ in range(2)]
    tasks = [
        [Document("b", base[0]), Document("x", base[1])],
        [Document("a", base[0] + " end"), Document("c", base[0].replace(base[0].split()[5], "new", 1))],
        [Document("y", base[1])],
    ]
    step = MinHashDedup(threshold=0.7)
    removed = []
    step.exclude = lambda doc, name, reason: removed.append((doc.id, reason, dict(doc.meta)))
    kept = two_passes(step, tasks)
    assert [[d.id for d in task] for task in kept] == [["x"], ["a"], []]
    # "a" (task 1, position 0) is kept for its cluster, "x" (task 0, position 1) for the other.
    cluster_a = {"duplicate_of": "a", "minhash_cluster": "1:0"}
    assert sorted(removed) == [
        ("b", "minhash_near_duplicate", cluster_a),
        ("c", "minhash_near_duplicate", cluster_a),
        ("y", "minhash_near_duplicate", {"duplicate_of": "x", "minhash_cluster": "0:1"}),
    ]


@pytest.mark.parametrize("verify", [False, True])
def test_sharded_reduce_writes_the_same_decision(tmp_path, verify):
    from lmforge.data.dedup.minhash import MinHashDedup
    from lmforge.data.document import Document

    rng = np.random.default_rng(8)
    texts, _ = planted_corpus(rng, n_base=40)
    step = MinHashDedup(threshold=0.7, verify=verify)
    artifacts = []
    for t in range(4):
        docs = [Document(f"d{i}", text) for i, text in enumerate(texts) if i % 4 == t]
        artifacts.append(tmp_path / f"artifact-{t}")
        list(step.collect_stream(iter(docs), t, artifacts[-1]))
    (tmp_path / "whole").mkdir()
    step.reduce(artifacts, tmp_path / "whole")
    for n_parts in (2, 3):
        parts = [tmp_path / f"part-{k}-of-{n_parts}" for k in range(n_parts)]
        for k, part in enumerate(parts):
            step.reduce_part(artifacts, k, n_parts, part)
        merged = tmp_path / f"merged-{n_parts}"
        merged.mkdir()
        step.merge_parts(artifacts, parts, merged)
        for t in range(4):
            with (
                np.load(tmp_path / "whole" / f"task-{t:05d}.npz") as a,
                np.load(merged / f"task-{t:05d}.npz") as b,
            ):
                assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with np.load(tmp_path / "whole" / "task-00000.npz") as a:
        assert len(a["drop"]) > 0


def test_banding_presets():
    from lmforge.data.dedup.minhash import MinHashDedup

    assert (MinHashDedup(banding="balanced").bands, MinHashDedup(banding="balanced").rows) == (9, 13)
    recall = MinHashDedup(banding="recall")
    assert (recall.bands, recall.rows) == optimal_lsh_params(0.8, 128, 0.1, 0.9) == (14, 9)
    assert (MinHashDedup(banding="precision").bands, MinHashDedup(banding="precision").rows) == (
        optimal_lsh_params(0.8, 128, 0.9, 0.1)
    )
    with pytest.raises(ValueError, match="banding must be one of"):
        MinHashDedup(banding="fast")
    with pytest.raises(ValueError, match="not two"):
        MinHashDedup(banding="recall", false_negative_weight=0.7)


def test_default_scheme_is_datasketchs_and_part_of_the_run_fingerprint():
    """The default is affine32 (datasketch's own default); a run folder records the scheme, so one started
    with another scheme is not resumed with this one, and a recipe naming mersenne keeps it."""
    from lmforge.data.dedup.minhash import MinHashDedup
    from lmforge.data.pipeline import step_config

    assert MinHasher().scheme == "affine32"
    default = MinHashDedup()
    assert default.scheme == "affine32" and default.hasher.scheme == "affine32"
    assert step_config(default)["scheme"] == "affine32"
    named = MinHashDedup(scheme="mersenne")
    assert step_config(named)["scheme"] == "mersenne" and named.hasher.scheme == "mersenne"
    text = "a few words to sign here and there"
    assert not np.array_equal(default.hasher.signatures([text]), named.hasher.signatures([text]))


@pytest.mark.parametrize("scheme", ["mersenne", "affine32"])
def test_a_pickled_hasher_gives_the_same_signatures(scheme):
    """The work buffers are shared with torch views; a copy sent to a worker must rebuild them together."""
    import pickle

    rng = np.random.default_rng(11)
    texts = [random_text(rng, int(rng.integers(0, 200))) for _ in range(10)]
    hasher = MinHasher(num_perm=32, scheme=scheme)
    hasher._chunk = 64  # kept by the copy
    hasher._set_permutations(hasher.a, hasher.b)
    expected = hasher.signatures(texts)
    copy = pickle.loads(pickle.dumps(hasher))
    assert copy._chunk == 64
    np.testing.assert_array_equal(copy.signatures(texts), expected)


def test_affine_block_wraps_like_uint32_arithmetic_on_extreme_values():
    """The block ``a x + b (mod 2^32)`` is computed with int32 torch kernels: check the wrap-around bits."""
    hasher = MinHasher(num_perm=4, scheme="affine32")
    hasher._chunk = 16
    top = (1 << 32) - 1
    a = np.array([1, top, 1 << 31 | 1, 0x9E3779B1], dtype=np.uint32)
    b = np.array([0, top, 1 << 31, 12345], dtype=np.uint32)
    hasher._set_permutations(a, b)
    x = np.array([0, 1, 2, 7, 1 << 31, (1 << 31) - 1, top, top - 1] * 2, dtype=np.uint32)
    expected = np.array([[(int(ak) * int(xi) + int(bk)) % (1 << 32) for xi in x] for ak, bk in zip(a, b)])
    np.testing.assert_array_equal(hasher._affine_chunk(x), expected)
