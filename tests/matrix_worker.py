"""Trains the matrix's cells of one column (tests/matrix.py), in one process or under torchrun:

    python tests/matrix_worker.py OUT FINETUNE_DIR reference|none FEATURE [FEATURE ...]
    torchrun --nproc_per_node 2 tests/matrix_worker.py OUT FINETUNE_DIR ddp|fsdp|zero1-3 FEATURE [...]

Per feature, into OUT/<column>/<feature>/: `full` (train() for STEPS steps, a checkpoint at the
half), `resumed` (a fresh run dir resumed from full's mid-run checkpoint), and on rank 0 `export`
(python -m trainer.export's main on full) and, for rows that ask, generate.txt (trainer.generate's
main on full). A cell that raises writes its traceback to error.txt and the next cell goes on.

Every train() here runs the real loop, strategy and checkpointer. Launching one torchrun per cell
would spend most of the sweep importing torch and DeepSpeed, so the cells of a column share one
process group, started here: train() leaves a group it did not start as it found it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matrix  # noqa: E402


def machine_overrides(finetune: Path, feature: str, out: Path) -> list[str]:
    data, model = matrix.BY_NAME[feature].data, matrix.BY_NAME[feature].model
    held_out = [f"eval.files=[{finetune / 'chat.jsonl'}]"] if feature == "eval" else []  # text it never trains on
    return [f"model.pretrained={finetune / model}", f"data.path={finetune / f'{data}.jsonl'}",
            f"data.cache_dir={out / 'cache'}", *held_out]  # fmt: skip


def start_group() -> None:
    """Under torchrun: the process group every cell's train() runs in (a group train() did not
    start, it leaves as it found it)."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))


@contextlib.contextmanager
def rank_log(run_dir: Path):
    """This rank's log file in the run dir, as `python -m trainer`'s Hydra logging config writes it."""
    import logging

    from trainer.loggers import RankFileHandler

    handler = RankFileHandler(str(run_dir / "logs" / f"rank{os.environ.get('RANK', '0')}.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run_cell(out: Path, finetune: Path, column: str, feature: str) -> None:
    from trainer.config.load import compose_config
    from trainer.loop import train

    rank = int(os.environ.get("RANK", "0"))
    where = out / column / feature
    args = [*matrix.overrides(feature, None if column == "reference" else column),
            *machine_overrides(finetune, feature, out)]  # fmt: skip
    cfg, _ = compose_config(args)
    with rank_log(where / "full"):
        train(cfg, where / "full")
    mid = where / "full" / "checkpoints" / f"step_{matrix.MID:08d}"
    cfg, _ = compose_config([*args, f"train.resume={mid}"])
    with rank_log(where / "resumed"):
        train(cfg, where / "resumed")
    if rank != 0:
        return
    from trainer import export, generate

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = export.main([str(where / "full"), "--out", str(where / "export")])
    if code != 0:
        raise RuntimeError(f"trainer.export exited {code}: {text.getvalue()}")
    if matrix.BY_NAME[feature].generate:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            code = generate.main([str(where / "full"), "--prompt", "Q1", "--max-new-tokens", "4"])
        if code != 0:
            raise RuntimeError(f"trainer.generate exited {code}")
        (where / "generate.txt").write_text(text.getvalue())


def main() -> None:
    out, finetune, column, *features = sys.argv[1:]
    out, finetune = Path(out), Path(finetune)
    start_group()
    for feature in features:
        where = out / column / feature
        where.mkdir(parents=True, exist_ok=True)
        try:
            run_cell(out, finetune, column, feature)
            (where / "done").write_text("ok\n")
        except BaseException:  # noqa: B036 (SystemExit from a refusal too: recorded, then the next cell)
            (where / f"error.rank{os.environ.get('RANK', '0')}.txt").write_text(traceback.format_exc())


if __name__ == "__main__":
    main()
