import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import load_config
from lmforge.shards.curriculum import Curriculum, CurriculumStage
from lmforge.shards.format import ShardsError, ShardStats, build_manifest, write_manifest, write_shard
from lmforge.shards.loader import DataConfig, PackedLoader
from lmforge.shards.mixture import MixtureConfig

EOS = 0
SHA = "f" * 64


def make_shards(
    folder: Path, domains: dict[str, list[int]], docs_per_shard: int = 7
) -> dict[int, np.ndarray]:
    """A shards folder where every token is unique (EOS aside) and names its document: see ``doc_of``."""
    folder.mkdir(parents=True, exist_ok=True)
    records, docs, k = [], {}, 0
    for domain, lengths in domains.items():
        for first in range(0, len(lengths), docs_per_shard):
            arrays = []
            for n in lengths[first : first + docs_per_shard]:
                doc = np.array([k * 64 + p + 1 for p in range(n - 1)] + [EOS], dtype=np.int64)
                docs[k] = doc
                arrays.append(doc)
                k += 1
            stats = ShardStats(docs=len(arrays), tokens=sum(map(len, arrays)))
            name = f"{domain}-{first // docs_per_shard:05d}"
            records.append(write_shard(folder, name, arrays, np.dtype(np.uint16), stats, {"domain": domain}))
    write_manifest(folder, build_manifest(records, np.dtype(np.uint16), 1000, EOS, SHA))
    return docs


def doc_of(token: int) -> int:
    return (token - 1) // 64


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    make_shards(
        tmp_path / "s", {"web": list(rng.integers(2, 30, size=40)), "code": list(rng.integers(2, 30, 25))}
    )
    return tmp_path / "s"


def take(loader: PackedLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_batch_shapes_and_next_token_labels(shards: Path) -> None:
    batch = next(iter(PackedLoader(shards, seq_len=16, batch_size=4)))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])


def test_one_epoch_reads_every_document_once_in_shuffled_order(tmp_path: Path) -> None:
    docs = make_shards(tmp_path, {"d": [5, 9, 3, 12, 7, 4, 8, 6, 10, 2]})
    total = sum(len(d) for d in docs.values())
    seq_len = 6
    windows = (total - 1) // seq_len
    loader = PackedLoader(tmp_path, seq_len=seq_len, batch_size=1, seed=3)
    batches = take(loader, windows)
    stream = np.concatenate(
        [b["input_ids"][0].numpy() for b in batches] + [batches[-1]["labels"][0, -1:].numpy()]
    )
    # cut the stream at EOS: whole documents, each at most once, in an order other than the file order
    cuts = np.flatnonzero(stream == EOS) + 1
    whole = [doc_of(int(p[0])) for p in np.split(stream, cuts)[:-1]]
    assert len(set(whole)) == len(whole)
    for k, piece in zip(whole, np.split(stream, cuts)):
        assert np.array_equal(piece, docs[k])
    assert whole != sorted(whole)
    assert len(stream) == windows * seq_len + 1
    # the next batch starts epoch 1 from a fresh order
    assert loader.state_dict()["streams"]["d"]["epoch"] == 0
    next(loader)
    assert loader.state_dict()["streams"]["d"]["epoch"] == 1


def test_document_masking_restarts_positions_after_each_eos(shards: Path) -> None:
    loader = PackedLoader(shards, seq_len=32, batch_size=3, document_masking=True)
    for batch in take(loader, 5):
        ids, pos, seg = batch["input_ids"], batch["position_ids"], batch["segment_ids"]
        for r in range(ids.shape[0]):
            starts = [0] + [t for t in range(1, ids.shape[1]) if ids[r, t - 1] == EOS]
            expected_pos = np.zeros(ids.shape[1], dtype=np.int64)
            expected_seg = np.zeros(ids.shape[1], dtype=np.int64)
            for s, (a, b) in enumerate(zip(starts, [*starts[1:], ids.shape[1]])):
                expected_pos[a:b] = np.arange(b - a)
                expected_seg[a:b] = s
            assert np.array_equal(pos[r].numpy(), expected_pos)
            assert np.array_equal(seg[r].numpy(), expected_seg)
            # within a segment every token belongs to the same document
            for s in range(int(seg[r].max()) + 1):
                body = ids[r][(seg[r] == s) & (ids[r] != EOS)]
                assert len({doc_of(int(t)) for t in body}) <= 1


def test_same_seed_same_batches_other_seed_other_batches(shards: Path) -> None:
    a = take(PackedLoader(shards, seq_len=8, batch_size=2, seed=5), 6)
    b = take(PackedLoader(shards, seq_len=8, batch_size=2, seed=5), 6)
    c = take(PackedLoader(shards, seq_len=8, batch_size=2, seed=6), 6)
    assert_same(a, b)
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_ranks_are_disjoint_slices_of_the_global_batch(shards: Path) -> None:
    world, batch_size, steps = 3, 2, 4
    global_batches = take(PackedLoader(shards, seq_len=8, batch_size=batch_size * world, seed=1), steps)
    per_rank = [
        take(PackedLoader(shards, seq_len=8, batch_size=batch_size, seed=1, rank=r, world_size=world), steps)
        for r in range(world)
    ]
    seen = []
    for step in range(steps):
        for r in range(world):
            rows = per_rank[r][step]["input_ids"]
            assert torch.equal(rows, global_batches[step]["input_ids"][r::world])
            seen.extend(tuple(row.tolist()) for row in rows)
    # windows are disjoint stretches of the streams (all within one epoch here): no token is read twice
    # as an input (every token but EOS is unique in these shards)
    total_tokens = sum(PackedLoader(shards, 8, 1)._streams[d].tokens for d in ("web", "code"))
    assert steps * world * batch_size * 8 < total_tokens / 2
    inputs = [t for row in seen for t in row if t != EOS]
    assert len(set(inputs)) == len(inputs)


@pytest.mark.parametrize("document_masking", [False, True])
def test_resume_yields_the_same_batches_as_an_uninterrupted_run(shards: Path, document_masking: bool) -> None:
    def make() -> PackedLoader:
        mixture = MixtureConfig(strategy="fixed", weights={"web": 0.6, "code": 0.4})
        return PackedLoader(shards, 12, 3, seed=2, document_masking=document_masking, mixture=mixture)

    # 40 batches of 36 tokens cross several epochs of the smaller domain
    uninterrupted = take(make(), 40)
    first = make()
    take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # the state survives a JSON checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    assert_same(take(resumed, 23), uninterrupted[17:])
    assert resumed.state_dict()["streams"]["code"]["epoch"] >= 1


def test_resume_with_another_world_size_continues_the_global_stream(shards: Path) -> None:
    single = PackedLoader(shards, 8, 4, seed=0)
    take(single, 3)
    state = single.state_dict()
    expected = next(single)["input_ids"]
    for rank in range(2):
        loader = PackedLoader(shards, 8, 2, seed=0, rank=rank, world_size=2)
        loader.load_state_dict(state)
        assert torch.equal(next(loader)["input_ids"], expected[rank::2])


def test_load_state_from_other_seed_is_refused(shards: Path) -> None:
    state = PackedLoader(shards, 8, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(shards, 8, 2, seed=1).load_state_dict(state)


def test_validation_split_is_disjoint_and_one_pass(tmp_path: Path) -> None:
    docs = make_shards(tmp_path, {"d": [6] * 50})
    train = PackedLoader(tmp_path, seq_len=5, batch_size=4, val_fraction=0.2, num_epochs=1)
    val = PackedLoader(
        tmp_path, seq_len=5, batch_size=4, val_fraction=0.2, split="val", shuffle=False, num_epochs=1
    )

    def doc_ids(loader: PackedLoader) -> set[int]:
        return {doc_of(int(t)) for batch in loader for t in batch["input_ids"].flatten() if t != EOS}

    train_docs, val_docs = doc_ids(train), doc_ids(val)
    assert train_docs.isdisjoint(val_docs)
    assert len(val_docs) == 10 and len(train_docs) >= 38  # an epoch-end tail may be dropped
    assert train_docs | val_docs <= set(docs)
    with pytest.raises(StopIteration):
        next(val)  # finite: one pass, then stop


def test_realised_proportions_converge_to_the_weights(shards: Path) -> None:
    mixture = MixtureConfig(strategy="fixed", weights={"web": 0.8, "code": 0.2})
    loader = PackedLoader(shards, seq_len=4, batch_size=50, mixture=mixture)
    take(loader, 60)
    realised = loader.realised_proportions()
    assert realised["web"] == pytest.approx(0.8, abs=0.02)
    assert realised["code"] == pytest.approx(0.2, abs=0.02)


def test_domain_ids_name_the_domain_of_each_row(shards: Path) -> None:
    loader = PackedLoader(shards, 8, 16, return_domain_ids=True)
    batch = next(loader)
    assert loader.domains == ["code", "web"]
    for row, domain in zip(batch["input_ids"], batch["domain_ids"]):
        first_doc = doc_of(int(row[row != EOS][0]))
        assert (first_doc >= 40) == (loader.domains[domain] == "code")  # code documents are 40..64


def test_zero_weight_domain_is_never_drawn(shards: Path) -> None:
    docs_code = set(range(40, 65))  # code documents are 40..64 (web comes first)
    loader = PackedLoader(shards, 8, 8, mixture=MixtureConfig(strategy="fixed", weights={"web": 1.0}))
    docs = {doc_of(int(t)) for batch in take(loader, 10) for t in batch["input_ids"].flatten() if t != EOS}
    assert not docs_code & docs
    assert loader.realised_proportions() == {"code": 0.0, "web": 1.0}


def test_curriculum_stage_switch_changes_seq_len_and_mixture(shards: Path) -> None:
    stages = [
        CurriculumStage("general", tokens=160, seq_len=8, mixture=MixtureConfig(strategy="proportional")),
        CurriculumStage("code", tokens=0, seq_len=16, mixture=MixtureConfig("fixed", {"code": 1.0})),
    ]
    curriculum = Curriculum(stages)
    loader = PackedLoader(shards, seq_len=4, batch_size=2, curriculum=curriculum, auto_stage=False)
    assert loader.seq_len == 8
    seen = 0
    shapes = []
    while seen < 320:
        stage = curriculum.stage_at(seen)
        if stage != loader.stage:
            loader.set_stage(stage)
        batch = next(loader)
        shapes.append(tuple(batch["input_ids"].shape))
        seen += batch["input_ids"].numel()
    assert shapes[:10] == [(2, 8)] * 10 and set(shapes[10:]) == {(2, 16)}
    before = dict(loader.samples_drawn)
    take(loader, 5)
    assert loader.samples_drawn["web"] == before["web"]  # stage 2 draws code only
    # resume mid-stage-2 keeps the stage and its sequence length
    state = loader.state_dict()
    resumed = PackedLoader(shards, seq_len=4, batch_size=2, curriculum=curriculum, auto_stage=False)
    resumed.load_state_dict(state)
    assert resumed.seq_len == 16 and resumed.stage == 1
    assert_same(take(resumed, 2), take(loader, 2))


def test_loader_follows_the_curriculum_by_tokens_served_across_ranks(shards: Path) -> None:
    stages = [CurriculumStage("short", tokens=96, seq_len=8), CurriculumStage("long", seq_len=16)]
    ranks = [
        PackedLoader(shards, 4, 2, rank=r, world_size=2, curriculum=Curriculum(stages)) for r in range(2)
    ]
    # each global batch serves 2 ranks x 2 rows x 8 tokens = 32 tokens: stage 0 owns batches 1-3
    shapes = [[tuple(next(loader)["input_ids"].shape) for loader in ranks] for _ in range(5)]
    assert shapes == [[(2, 8), (2, 8)]] * 3 + [[(2, 16), (2, 16)]] * 2
    assert ranks[0].state_dict() == ranks[1].state_dict()
    assert ranks[0].tokens_served == 3 * 32 + 2 * 64


def test_tokenizer_hash_mismatch_is_refused(shards: Path) -> None:
    PackedLoader(shards, 8, 2, tokenizer_sha256=SHA)
    with pytest.raises(ShardsError, match="tokenizer sha256"):
        PackedLoader(shards, 8, 2, tokenizer_sha256="0" * 64)


def test_domain_too_small_for_one_sequence_is_a_clear_error(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardsError, match="too few"):
        PackedLoader(shards, seq_len=10_000, batch_size=1)
    # a finite pass (validation) skips a domain smaller than one sequence, as long as another can be read
    make_shards(tmp_path / "small", {"big": [30] * 10, "tiny": [3]})
    with pytest.raises(ShardsError, match="too few"):
        PackedLoader(tmp_path / "small", seq_len=20, batch_size=1)
    val = PackedLoader(tmp_path / "small", seq_len=20, batch_size=4, num_epochs=1, shuffle=False)
    rows = [row for batch in val for row in batch["input_ids"]]
    assert len(rows) == (300 - 1) // 20 and val.samples_drawn["tiny"] == 0


def test_data_config_from_yaml_dict_builds_the_loader(shards: Path) -> None:
    cfg = load_config(
        DataConfig,
        data={
            "shards": [str(shards)],
            "seq_len": 8,
            "document_masking": True,
            "mixture": {"strategy": "temperature", "temperature": 2.0},
            "curriculum": [{"name": "a", "tokens": 100, "seq_len": 8}, {"name": "b", "seq_len": 16}],
        },
    )
    loader = PackedLoader.from_config(cfg, batch_size=2)
    assert loader.curriculum is not None and len(loader.curriculum) == 2
    assert set(next(loader)) == {"input_ids", "labels", "position_ids", "segment_ids"}


def test_mixture_report_gives_target_and_realised_shares_per_stage(shards: Path) -> None:
    from lmforge.shards.loader import mixture_report

    cfg = DataConfig(
        shards=[str(shards)],
        seq_len=4,
        curriculum=[
            CurriculumStage("a", tokens=100, mixture=MixtureConfig("fixed", {"web": 0.9, "code": 0.1})),
            CurriculumStage("b", seq_len=8, mixture=MixtureConfig("temperature", temperature=1000.0)),
        ],
    )
    report = mixture_report(cfg, sequences=4000)
    assert [(s["stage"], s["seq_len"]) for s in report] == [("a", 4), ("b", 8)]
    first, second = report[0]["domains"], report[1]["domains"]
    assert first["web"]["weight"] == pytest.approx(0.9) and first["web"]["realised"] == pytest.approx(
        0.9, abs=0.02
    )
    assert second["code"]["weight"] == pytest.approx(0.5, abs=0.01)  # T -> infinity: uniform
    assert second["code"]["realised"] == pytest.approx(0.5, abs=0.03)
