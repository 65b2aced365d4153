"""Faults that end cleanly: a checkpoint write that fails (a full disk for real on a small tmpfs,
and a write made to fail at each file in turn), a rank that hangs in a collective, a corrupted
token cache. The two-rank cases run tests/fault_worker.py under torchrun.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from unittest import mock

import fault_worker
import numpy as np
import pytest
import torch
from fault_worker import failing_writes
from helpers import QUICK, build, read_metrics, torchrun

from trainer.__main__ import compose_config
from trainer.checkpoint import Checkpointer, CheckpointStore, CheckpointWriteError, RNGState, save_weights, verify
from trainer.config import DataConfig
from trainer.data import build_data
from trainer.data import cache as cache_module
from trainer.loop import train
from trainer.parallel.dist import CollectiveError, collective
from trainer.state import TrainState
from trainer.step import train_step

REPO = Path(__file__).resolve().parent.parent
GLOO_TIMEOUT = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"  # fmt: skip
GLOO_PEER_GONE = "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2947"


# -- checkpoint writes that fail ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def strategy():
    """A small GPT under parallel=none that has taken one step (AdamW state exists)."""
    strategy = build(fault_worker.config("none"))
    tokens = torch.randint(fault_worker.MODEL.vocab_size, (2, 17))
    train_step(strategy, tokens[:, :-1], tokens[:, 1:], 1, clip_grad_norm=1.0)
    return strategy


def parts(strategy, step: int) -> dict:
    return {**strategy.checkpoint_parts(), "train_state": TrainState(step=step), "rng": RNGState(0)}


def assert_only_the_first_checkpoint(root: Path) -> None:
    checkpoints = root / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]  # no .tmp, no step 2
    assert (checkpoints / "latest").read_text() == "step_00000001\n"
    assert verify(checkpoints / "step_00000001") is None


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's async save, on one process
@pytest.mark.parametrize("async_save", [False, True])
def test_a_write_failing_at_any_file_leaves_the_previous_checkpoint(strategy, async_save: bool, tmp_path: Path):
    """ENOSPC at the 1st, 2nd, ... file a save opens (the model's info.json, its DCP shard and
    metadata, the RNG files, meta.json, the manifest, `latest`): one line, the temp dir gone, the
    previous checkpoint and `latest` untouched. Then other errnos, and an fsync that fails."""
    checkpointer = Checkpointer(CheckpointStore(tmp_path, keep=2))
    with failing_writes(tmp_path) as counted:
        checkpointer.save(1, parts(strategy, 1))
    assert len(counted.opened) == 8 and counted.opened[-1].endswith("latest.tmp")
    root = tmp_path / "checkpoints"
    line = "checkpoint step_00000002 not written: {} ({}): {}; the newest complete checkpoint is step_00000001"
    full = line.format("No space left on device", root, "free space or point hydra.run.dir elsewhere")
    cases = [(n, errno.ENOSPC, full) for n in range(1, len(counted.opened) + 1)]
    cases += [
        (3, errno.EDQUOT, line.format("Disk quota exceeded", root, "free space or point hydra.run.dir elsewhere")),
        (5, errno.EACCES, line.format("Permission denied", root, f"make {root} writable or point hydra.run.dir elsewhere")),
        (2, errno.EIO, line.format("Input/output error", root, "check the disk (dmesg) or point hydra.run.dir elsewhere")),
    ]  # fmt: skip
    for n, code, message in cases:
        with failing_writes(tmp_path, n, code), pytest.raises(CheckpointWriteError) as raised:
            checkpointer.save(2, parts(strategy, 2), async_save=async_save)
            checkpointer.wait()  # an async save's failure surfaces here
        assert str(raised.value) == message, (n, code)
        assert_only_the_first_checkpoint(tmp_path)

    eio = OSError(errno.EIO, os.strerror(errno.EIO))
    with (
        mock.patch.object(os, "fsync", side_effect=eio),
        pytest.raises(CheckpointWriteError, match="Input/output error"),
    ):
        checkpointer.save(2, parts(strategy, 2), async_save=async_save)  # fsync: a delayed write error
        checkpointer.wait()
    assert_only_the_first_checkpoint(tmp_path)
    checkpointer.save(2, parts(strategy, 2), async_save=async_save)  # nothing stuck: the next save commits
    checkpointer.wait()
    assert (root / "latest").read_text() == "step_00000002\n" and verify(root / "step_00000002") is None


def test_a_save_removes_what_a_killed_save_left(strategy, tmp_path: Path):
    store = CheckpointStore(tmp_path)
    (store.root / "step_00000007.tmp" / "model").mkdir(parents=True)  # killed mid-save at another step
    (store.root / "latest.tmp").write_text("step_00000007\n")  # killed while moving `latest`
    Checkpointer(store).save(1, parts(strategy, 1))
    assert sorted(p.name for p in store.root.iterdir()) == ["latest", "step_00000001"]
    assert store.committed() == "step_00000001"


def test_final_weights_that_cannot_be_written_are_one_line(tmp_path: Path):
    weights = {"w": torch.ones(256, 256)}
    with mock.patch("trainer.checkpoint.store.save_file", side_effect=_safetensors_enospc):
        with pytest.raises(CheckpointWriteError) as raised:
            save_weights(tmp_path / "checkpoints" / "final", weights)
    assert str(raised.value) == (
        f"final weights not written: No space left on device ({tmp_path / 'checkpoints'}): free space or point "
        "hydra.run.dir elsewhere"
    )
    assert not list((tmp_path / "checkpoints").iterdir())  # no final.tmp left


def _safetensors_enospc(*_args, **_kwargs):  # what safetensors' save_file raised on a full tmpfs
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 16 MB tmpfs (mount as root); skipped where mounting is not permitted."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


class FillTheDisk:
    """After step 2 (step 1's checkpoint is committed), fill the disk to leave half a checkpoint free."""

    def __init__(self, mount_point: Path) -> None:
        self.ballast = mount_point / "ballast"

    def on_step_end(self, run, result, metrics):
        if run.state.step == 2:
            checkpoint = sum(p.stat().st_size for p in (run.run_dir / "checkpoints" / "step_00000001").rglob("*"))
            disk = os.statvfs(self.ballast.parent)
            self.ballast.write_bytes(bytes(disk.f_bavail * disk.f_frsize - checkpoint // 2))


def test_a_full_disk_stops_training_with_one_line_and_resume_works_once_freed(small_tmpfs: Path, tmp_path: Path):
    """A real ENOSPC, in the middle of the model's shard: the run stops (continuing would train on
    with nowhere to save it), step 1 stays whole and `latest`; freed, the run resumes from it."""
    run_dir = small_tmpfs / "run"
    args = [
        *QUICK, f"data.cache_dir={tmp_path / 'cache'}", "logger.progress_bar=false", "train.max_steps=3",
        "checkpoint.interval=1", "checkpoint.keep=1", "train.log_interval=1", "train.eval_interval=100",
    ]  # fmt: skip
    filler = FillTheDisk(small_tmpfs)
    with pytest.raises(CheckpointWriteError) as raised:
        train(compose_config(args)[0], run_dir, callbacks=(filler,))
    assert str(raised.value) == (
        f"checkpoint step_00000002 not written: No space left on device ({run_dir / 'checkpoints'}): free space or "
        "point hydra.run.dir elsewhere; the newest complete checkpoint is step_00000001"
    )
    assert_only_the_first_checkpoint(run_dir)

    filler.ballast.unlink()  # the fix the line names
    train(compose_config([*args, "train.resume=auto"])[0], run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003\n"
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3]


# -- collectives that cannot finish ---------------------------------------------------------------------


def test_a_collective_timeout_becomes_one_line_naming_rank_and_collective():
    with pytest.raises(CollectiveError) as raised, collective("all_reduce (loss sum)"):
        raise RuntimeError(GLOO_TIMEOUT)
    assert str(raised.value) == (
        "rank 0: all_reduce (loss sum) timed out after 5 s waiting for other ranks: a rank is hung or died; "
        "see the other ranks' output"
    )
    with pytest.raises(CollectiveError) as raised, collective("barrier"):
        raise RuntimeError(GLOO_PEER_GONE)
    assert str(raised.value) == (
        "rank 0: barrier failed: another rank closed its connection (it died or was stopped); see the other ranks' output"
    )
    with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied$"), collective("forward"):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")  # not about other ranks: as it was


# -- the token cache ------------------------------------------------------------------------------------


def corpus_config(tmp_path: Path) -> DataConfig:
    (tmp_path / "corpus").mkdir(exist_ok=True)
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300))  # ~8k tokens, 16 kB
    (tmp_path / "corpus" / "a.py").write_text(text)
    return DataConfig(
        source="files", path=str(tmp_path / "corpus"), tokenizer="byte", cache_dir=str(tmp_path / "cache")
    )


def corrupt_bytes(tokens: Path) -> None:
    with open(tokens, "r+b") as f:
        f.seek(5000)
        f.write(b"\xff\xff\xff\xff")


def truncate(tokens: Path) -> None:
    os.truncate(tokens, tokens.stat().st_size - 2)


def garble_meta(tokens: Path) -> None:
    (tokens.parent / "meta.json").write_text('{"tokens": 12')


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (corrupt_bytes, "bytes 4,096-6,144 of tokens.bin do not match their checksum"),
        (truncate, "tokens.bin is 19,360 bytes, meta.json says 19,362: truncated or overwritten"),
        (garble_meta, "meta.json is unreadable or incomplete"),
    ],
)
def test_a_corrupted_token_cache_is_rebuilt_not_trained_on(damage, problem, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache_module, "CHECKSUM_CHUNK", 2048)  # several chunks in a small cache
    cfg = corpus_config(tmp_path)
    build_data(cfg, seq_len=16, seed=0)
    (tokens,) = (tmp_path / "cache").glob("files-byte-*/tokens.bin")
    fresh = np.fromfile(tokens, dtype=np.uint16)
    damage(tokens)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        data = build_data(cfg, seq_len=16, seed=0)
    assert [r.getMessage() for r in caplog.records] == [
        f"token cache {tokens.parent} is corrupted ({problem}): rebuilding it"
    ]
    assert "cache built" in data.describe()
    np.testing.assert_array_equal(np.fromfile(tokens, dtype=np.uint16), fresh)
    np.testing.assert_array_equal(np.concatenate([data.train.tokens, data.val.tokens]), fresh)


def test_a_verified_cache_is_read_again_only_once_it_changed(tmp_path, monkeypatch, caplog):
    """verified.json records tokens.bin's stat after a full check; while the stat is the same the
    checksums are not read again. A cache from before checksums gets them, trusted as it is."""
    monkeypatch.setattr(cache_module, "RACY_NS", -1)  # record the stat at once (else: 2 s after the last write)
    cfg = corpus_config(tmp_path)
    build_data(cfg, seq_len=16, seed=0)
    (tokens,) = (tmp_path / "cache").glob("files-byte-*/tokens.bin")
    meta_path, verified = tokens.parent / "meta.json", tokens.parent / "verified.json"
    assert not verified.exists()  # a fresh build is checked whole at its next use
    build_data(cfg, seq_len=16, seed=0)
    assert json.loads(verified.read_text())["bytes"] == tokens.stat().st_size

    with mock.patch.object(cache_module, "chunk_checksums", side_effect=AssertionError("read again")):
        assert "cache hit" in build_data(cfg, seq_len=16, seed=0).describe()
    corrupt_bytes(tokens)
    later = tokens.stat().st_mtime_ns + 1_000_000_000  # a write after the check, by its timestamp
    os.utime(tokens, ns=(later, later))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert "cache built" in build_data(cfg, seq_len=16, seed=0).describe()
    assert len(caplog.records) == 1 and "do not match their checksum" in caplog.records[0].getMessage()

    meta = json.loads(meta_path.read_text())
    checksums = meta.pop("crc32")
    meta_path.write_text(json.dumps(meta))  # as format 1 wrote it, before checksums
    assert "cache hit" in build_data(cfg, seq_len=16, seed=0).describe()
    assert json.loads(meta_path.read_text())["crc32"] == checksums


# -- two ranks under torchrun -----------------------------------------------------------------------------


@pytest.mark.heavy
def test_a_hung_rank_ends_the_job_naming_the_rank_and_the_collective(tmp_path: Path):
    """Rank 1 never comes to the step; with parallel.timeout_s=5 rank 0 fails in the step's first
    collective (DDP's gradient all-reduce in backward) and the whole job ends, well within a minute."""
    started = time.monotonic()
    result = torchrun(str(REPO / "tests" / "fault_worker.py"), "hang", str(tmp_path), cwd=REPO)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert (
        "error: rank 0: forward / backward (parallel=ddp gradient sync) timed out after 5 s waiting for other "
        f"ranks: a rank is hung or died; see {tmp_path / 'logs' / 'rank1.log'}"
    ) in result.stderr.splitlines()
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"  # the hung rank sleeps for 300 s


@pytest.mark.heavy
def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path: Path):
    """Rank 1's first file (its DCP shard) or last (its RNG state) cannot be written, in sync and
    async saves: both ranks raise the same line, nobody hangs, and the next save commits."""
    result = torchrun(str(REPO / "tests" / "fault_worker.py"), "failed-write", str(tmp_path), cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [Path(f).name for f in ranks[1]["files"]] == ["__1_0.distcp", "rank1.json", "rank1.safetensors"]
    line = (
        f"checkpoint step_00000002 not written: No space left on device on rank 1 ({tmp_path / 'run' / 'checkpoints'}): "
        "free space or point hydra.run.dir elsewhere; the newest complete checkpoint is step_00000001"
    )
    for case in ("sync, first file", "sync, last file", "async, first file", "async, last file"):
        assert ranks[0][case] == ranks[1][case] == line, case
        left = ranks[0][f"{case} left"]
        assert left == {"entries": ["latest", "step_00000001"], "latest": "step_00000001", "verify": None}, case
    assert ranks[0]["then"] == ranks[1]["then"] == "step_00000002"
