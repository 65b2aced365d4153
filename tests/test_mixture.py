"""data.mixture: sources drawn by weight in one global order that depends on the seed alone; each
rank reads only its rows' windows; the sampler resumes bitwise at the same or another world size;
tokens drawn per source are logged; 1 and 2 ranks train to the same losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_metrics, torchrun
from test_prepare import WideTokenizer, byte_stream, prepared, write_corpus

from trainer.__main__ import compose_config
from trainer.checkpoint import step_dir_name
from trainer.config import ConfigError, DataConfig
from trainer.data import build_data, shard_for_rank
from trainer.data.cache import split_point
from trainer.data.mixture import MixtureSampler
from trainer.loop import train

SEQ_LEN = 16
WEIGHTS = {"web": 6.0, "code": 3.0, "books": 1.0}  # shares 0.6, 0.3, 0.1


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """Three prepared directories of different sizes and words, and their token streams."""
    root = tmp_path_factory.mktemp("mixture")
    made = {}
    for i, (name, documents) in enumerate({"web": 400, "code": 150, "books": 60}.items()):
        vocabulary = [f"{name}{j}" for j in range(12)]
        texts = write_corpus(root / f"{name}.jsonl", documents, seed=i, vocabulary=vocabulary)
        prepared(root / f"{name}.jsonl", root / name, shard_tokens=2000)
        made[name] = (root / name, byte_stream(texts))
    return made


def mixture_cfg(sources, weights: dict[str, float] = WEIGHTS) -> DataConfig:
    entries = [{"name": n, "path": str(sources[n][0]), "weight": w} for n, w in weights.items()]
    return DataConfig(source="shards", mixture=entries, val_fraction=0.05)


def binomial_bound(n: int, p: float, z: float = 4.5) -> float:
    """z standard deviations of a Binomial(n, p) count: exceeded with probability < 1e-5 per source."""
    return z * math.sqrt(n * p * (1 - p))


def test_sources_are_drawn_in_proportion_to_their_weights(sources) -> None:
    data = build_data(mixture_cfg(sources), SEQ_LEN, seed=3)
    sampler = data.train.sampler(3)
    drawn = np.concatenate([sampler.next_global_batch(64) for _ in range(150)])  # 9,600 samples
    source_of = np.searchsorted(data.train.offsets, drawn, side="right") - 1
    total = sum(WEIGHTS.values())
    for s, (name, weight) in enumerate(WEIGHTS.items()):
        count, p = int((source_of == s).sum()), weight / total
        assert abs(count - len(drawn) * p) <= binomial_bound(len(drawn), p), (name, count)
        assert sampler.tokens_drawn()[name] == count * SEQ_LEN
        windows = drawn[source_of == s] - data.train.offsets[s]
        first_epoch = windows[: data.train.windows[s]]  # each source's own epochs: no window twice in one
        assert len(set(first_epoch.tolist())) == len(first_epoch)
    assert sum(sampler.tokens_drawn().values()) == len(drawn) * SEQ_LEN


def test_the_global_order_depends_on_the_seed_alone(sources) -> None:
    """Not on the batch size (so not on the world size): batches of 8 and of 24 give one sequence."""
    train = build_data(mixture_cfg(sources), SEQ_LEN, seed=0).train
    small, large = train.sampler(5), train.sampler(5)
    by_8 = np.concatenate([small.next_global_batch(8) for _ in range(30)])
    by_24 = np.concatenate([large.next_global_batch(24) for _ in range(10)])
    np.testing.assert_array_equal(by_8, by_24)
    assert small.state_dict() == large.state_dict()
    assert not np.array_equal(by_8, np.concatenate([train.sampler(6).next_global_batch(24) for _ in range(10)]))


class RecordingSet:
    """A ShardSet that records the stream positions it reads."""

    def __init__(self, shards):
        self.shards, self.starts = shards, []

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        self.starts += np.asarray(starts).tolist()
        return self.shards.read(starts, length)


def test_each_rank_reads_its_rows_and_the_world_gives_one_batch(sources) -> None:
    """Rank r of 2 reads the windows of its rows and no other; the two ranks' rows, concatenated, are
    the single process's batch, bitwise."""
    cfg = mixture_cfg(sources)
    whole = build_data(cfg, SEQ_LEN, seed=1).train
    ranks = [build_data(cfg, SEQ_LEN, seed=1).train for _ in range(2)]
    for split in ranks:
        split.sets = [RecordingSet(s) for s in split.sets]
    samplers, reference = [split.sampler(1) for split in ranks], whole.sampler(1)
    for _ in range(20):
        global_batch = reference.next_global_batch(12)
        x, y = whole.get_batch(global_batch)
        shards = []
        for r, (split, sampler) in enumerate(zip(ranks, samplers, strict=True)):
            mine = shard_for_rank(sampler.next_global_batch(12), r, 2)
            before = [len(s.starts) for s in split.sets]
            shards.append(split.get_batch(mine))
            read = sorted((s, start) for s, recorder in enumerate(split.sets) for start in recorder.starts[before[s] :])
            source_of = np.searchsorted(split.offsets, mine, side="right") - 1
            asked = sorted(zip(source_of.tolist(), ((mine - split.offsets[source_of]) * SEQ_LEN).tolist(), strict=True))
            assert read == asked
        torch.testing.assert_close(torch.cat([s[0] for s in shards]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([s[1] for s in shards]), y, rtol=0, atol=0)


def test_the_windows_are_the_sources_token_streams(sources) -> None:
    data = build_data(mixture_cfg(sources), SEQ_LEN, seed=0)
    sampler = data.train.sampler(0)
    indices = np.concatenate([sampler.next_global_batch(16) for _ in range(4)])
    x, y = data.train.get_batch(indices)
    for row, index in enumerate(indices):
        s = int(np.searchsorted(data.train.offsets, index, side="right")) - 1
        stream = sources[list(WEIGHTS)[s]][1]
        start = (index - data.train.offsets[s]) * SEQ_LEN
        assert start + SEQ_LEN + 1 <= split_point(len(stream), 0.05)  # training never reads validation tokens
        assert x[row].tolist() == stream[start : start + SEQ_LEN].tolist()
        assert y[row].tolist() == stream[start + 1 : start + SEQ_LEN + 1].tolist()


def test_validation_mixes_each_sources_tail_in_order(sources) -> None:
    data = build_data(mixture_cfg(sources), SEQ_LEN, seed=0)
    n = len(data.val)  # the sum of the sources' validation windows
    x, y = data.val.get_batch(np.arange(n))
    tails = {name: stream[split_point(len(stream), 0.05) :] for name, (_, stream) in sources.items()}
    taken = dict.fromkeys(WEIGHTS, 0)

    def next_window(name: str) -> list[int]:  # the source's next validation window: in stream order, cycling
        w = taken[name] % data.val.windows[list(WEIGHTS).index(name)]
        return tails[name][w * SEQ_LEN : (w + 1) * SEQ_LEN + 1].tolist()

    for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
        (name,) = [name for name in WEIGHTS if row == next_window(name)]
        taken[name] += 1
    for name, weight in WEIGHTS.items():
        p = weight / sum(WEIGHTS.values())
        assert abs(taken[name] - n * p) <= binomial_bound(n, p)
    again, _ = data.val.get_batch(np.arange(n))
    torch.testing.assert_close(again, x, rtol=0, atol=0)  # the same windows at every evaluation


def test_the_sampler_resumes_bitwise_and_refuses_another_mixture(sources) -> None:
    train = build_data(mixture_cfg(sources), SEQ_LEN, seed=2).train
    original = train.sampler(2)
    for _ in range(60):  # far enough for the small source to be in its third epoch
        original.next_global_batch(256)
    state = json.loads(json.dumps(original.state_dict()))
    assert state["position"] == 60 * 256 and state["sources"][2]["epoch"] >= 2
    resumed = train.sampler(0)
    resumed.load_state_dict(state)
    assert resumed.tokens_drawn() == original.tokens_drawn()
    for _ in range(10):
        np.testing.assert_array_equal(resumed.next_global_batch(16), original.next_global_batch(16))
    other = build_data(mixture_cfg(sources, {"web": 6.0, "code": 3.0, "books": 2.0}), SEQ_LEN, seed=2).train
    with pytest.raises(ValueError, match=r"weights .* data.mixture changed since the checkpoint"):
        other.sampler(2).load_state_dict(state)
    shorter = MixtureSampler(list(WEIGHTS), [w - 1 for w in train.windows], list(WEIGHTS.values()), 2, SEQ_LEN)
    with pytest.raises(ValueError, match="the data or train.seq_len changed since the checkpoint"):
        shorter.load_state_dict(state)


def test_sources_prepared_with_different_tokenizers_are_refused(tmp_path: Path, sources) -> None:
    write_corpus(tmp_path / "wide.jsonl", 30)
    prepared(tmp_path / "wide.jsonl", tmp_path / "wide", 1000, WideTokenizer())
    cfg = mixture_cfg(sources, {"web": 1.0})
    cfg.mixture.append({"name": "wide", "path": str(tmp_path / "wide"), "weight": 1.0})
    with pytest.raises(ConfigError) as info:
        build_data(cfg, SEQ_LEN, seed=0)
    assert str(info.value) == (
        "data.mixture: data.mixture source 'web' was prepared with the byte tokenizer (byte) and data.mixture "
        "source 'wide' with wide (wide): prepare every source with one --tokenizer"
    )


# -- end to end: python -m trainer and torchrun --------------------------------------------------

STEPS, INTERVAL = 8, 4


def run_args(sources, run_dir: Path, *extra: str) -> list[str]:
    mixture = ",".join(f"{{name:{n},path:{sources[n][0]},weight:{w}}}" for n, w in WEIGHTS.items())
    return [
        "data=shards", f"data.mixture=[{mixture}]", "data.val_fraction=0.05", "model.n_layer=2", "model.n_embd=64",
        "model.bias=false", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8",
        f"train.max_steps={STEPS}", "train.log_interval=1", "train.eval_interval=4", "train.eval_batches=2",
        f"checkpoint.interval={INTERVAL}", "checkpoint.keep=5", "train.sample_tokens=0", "logger.wandb=false",
        "logger.progress_bar=false", "parallel=ddp", "optim.warmup_steps=2", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def one_process(sources, run_dir: Path, *extra: str) -> list[dict]:
    cfg, _ = compose_config(run_args(sources, run_dir, *extra)[:-1])
    train(cfg, run_dir)
    return read_metrics(run_dir)


def checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / step_dir_name(INTERVAL)


def sampler_state(run_dir: Path) -> dict:
    """The sampler part of the run's last checkpoint."""
    meta = json.loads((run_dir / "checkpoints" / step_dir_name(STEPS) / "meta.json").read_text())
    return meta["parts"]["sampler"]


def columns(rows: list[dict], key: str, after: int = 0) -> list:
    return [row[key] for row in rows if key in row and row["step"] > after]


@pytest.mark.slow  # ~14-20 s on 2 CPU cores: one torchrun launch and three runs in this process
def test_one_and_two_ranks_train_alike_and_resume_at_another_world_size(tmp_path: Path, sources) -> None:
    """A mixture run on 1 process and on 2 ranks (DDP, the same global batch of 8): the same losses
    (to fp32 reduction order, 1e-5 relative) and bitwise the same tokens drawn per source, in the
    weights' proportions. Resumed from the 2-rank run's step-4 checkpoint on 1 process, it continues
    with the 2-rank run's batches (the same losses to 1e-5, the same tokens drawn); resumed on 1
    process from the 1-process checkpoint, it is bitwise the run that never stopped."""
    single = one_process(sources, tmp_path / "one")
    result = torchrun("-m", "trainer", *run_args(sources, tmp_path / "two"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    double = read_metrics(tmp_path / "two")
    names = [f"data/tokens/{n}" for n in WEIGHTS]
    assert columns(single, "step") == columns(double, "step") == list(range(1, STEPS + 1))
    assert columns(double, "loss") == pytest.approx(columns(single, "loss"), rel=1e-5)
    assert columns(double, "val_loss") == pytest.approx(columns(single, "val_loss"), rel=1e-5)
    for name in names:
        assert columns(double, name) == columns(single, name)
    last = double[-1]
    drawn = STEPS * 8
    assert sum(last[name] for name in names) == last["tokens"] == drawn * 32
    for name, weight in zip(names, WEIGHTS.values(), strict=True):
        p = weight / sum(WEIGHTS.values())
        assert abs(last[name] / 32 - drawn * p) <= binomial_bound(drawn, p)

    after = one_process(sources, tmp_path / "resumed-on-one", f"train.resume={checkpoint(tmp_path / 'two')}")
    assert columns(after, "loss", INTERVAL) == pytest.approx(columns(double, "loss", INTERVAL), rel=1e-5)
    for name in names:
        assert columns(after, name, INTERVAL) == columns(double, name, INTERVAL)
    again = one_process(sources, tmp_path / "resumed-same", f"train.resume={checkpoint(tmp_path / 'one')}")
    assert columns(again, "loss", INTERVAL) == columns(single, "loss", INTERVAL)  # bitwise
    # every run ends with the same sampler state: the same samples drawn, from every source, at every world size
    states = [sampler_state(tmp_path / run) for run in ("one", "two", "resumed-on-one", "resumed-same")]
    assert states[0]["position"] == drawn and all(state == states[0] for state in states)
