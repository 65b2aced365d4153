"""The expert load of a mixture-of-experts run (trainer/moe_monitor.py) and its dashboard
(trainer/report_moe.py).

A real run logs, at every logged step, moe/aux_loss equal to the mean of its micro-batches'
load-balancing losses recomputed from the router logits its forwards made, and moe/load/block.N /
moe/load_max/block.N equal to the shares counted by hand from the same routing (recorded by hooks
on the sparse blocks); a router forced to collapse is flagged once, naming the block and expert; 2
ddp ranks log the load of one process on the same global batch; the page draws a block x expert
heatmap whose cells hold the logged shares, and in Chromium its slider shows an earlier step's.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import QUICK, read_metrics, run_cli, torchrun
from omegaconf import OmegaConf
from test_report import Elements, browser, chart, chromium_command  # noqa: F401  (browser: a fixture)

from trainer.config import ConfigError, ModelConfig
from trainer.model import GPT
from trainer.model.moe import load_balancing_loss
from trainer.moe_monitor import ExpertWatch, sparse_blocks
from trainer.report import main as report_main
from trainer.report_svg import group_order, viridis

REPO = Path(__file__).resolve().parent.parent
E, K = 4, 2  # experts, top k
SPARSE = [0, 2]  # the sparse blocks of a 3-block model
MOE = [  # QUICK's synthetic run with 3 blocks, the first and the last sparse (a later override wins)
    *QUICK, "model.n_layer=3", "model.mlp=swiglu", f"model.n_experts={E}", f"model.n_experts_per_token={K}",
    f"model.moe_layers=[{SPARSE[0]},{SPARSE[1]}]", "model.router_aux_loss_coef=0.01", "logger.progress_bar=false",
    "train.log_interval=1",
]  # fmt: skip


def train_recording(args: list[str], run_dir: Path, callbacks: tuple = ()) -> list[dict]:
    """train() in this process; each training micro-batch's routing as its hooks saw it:
    {block: (router logits, top-k indices), "aux": the model's moe_aux_loss}, in order."""
    from trainer import loop
    from trainer.__main__ import compose_config

    cfg, composed = compose_config(args)
    micro_batches: list[dict] = [{}]
    build = loop.build_run

    def build_and_record(cfg, run_dir):
        run = build(cfg, run_dir)
        model = run.strategy.unwrapped()
        for block, mlp in sparse_blocks(model):

            def keep(module, args, out, block=block):
                if module.training:
                    micro_batches[-1][block] = (module.router_logits.detach().clone(), module.last_topk.clone())

            mlp.register_forward_hook(keep)

        def close(module, args, out):
            if module.training:
                micro_batches[-1]["aux"] = module.moe_aux_loss.clone()
                micro_batches.append({})

        model.register_forward_hook(close)
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "build_run", build_and_record)
        loop.train(cfg, run_dir, callbacks)
    (run_dir / ".hydra").mkdir()  # what Hydra writes for a run from the command line
    OmegaConf.save({k: v for k, v in composed.items() if k != "hydra"}, run_dir / ".hydra" / "config.yaml")
    return micro_batches[:-1]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """4 steps of 2 micro-batches each, logged every step: the run, and its micro-batches' routing."""
    tmp = tmp_path_factory.mktemp("moe")
    args = [*MOE, "train.max_steps=4", "train.grad_accum_steps=2", f"data.cache_dir={tmp / 'cache'}"]
    return tmp / "run", train_recording(args, tmp / "run")


def test_logged_load_and_aux_loss_are_those_of_the_step_s_routing(moe_run: tuple[Path, list[dict]]) -> None:
    run_dir, micro_batches = moe_run
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and len(micro_batches) == 2 * len(rows)
    for row in rows:
        step = micro_batches[2 * row["step"] - 2 : 2 * row["step"]]  # its 2 micro-batches
        aux = [load_balancing_loss([mb[b][0] for b in SPARSE], E, K).item() for mb in step]  # by hand, from logits
        assert [mb["aux"].item() for mb in step] == pytest.approx(aux, rel=1e-6)  # what the model kept
        assert row["moe/aux_loss"] == pytest.approx(sum(aux) / 2, rel=1e-6)
        for b in SPARSE:
            slots = Counter(e for mb in step for e in mb[b][1].flatten().tolist())  # token slots per expert
            total = sum(slots.values())
            assert total == K * row["tokens"] / row["step"]  # k slots for every token of the step
            shares = [slots[e] / total for e in range(E)]
            assert row[f"moe/load/block.{b}"] == pytest.approx(shares, rel=1e-5)  # logged to 6 digits
            assert row[f"moe/load_max/block.{b}"] == pytest.approx(max(shares) * E, rel=1e-12)
        assert not any(k.endswith("block.1") for k in row if k.startswith("moe/"))  # block 1 is dense
        assert row["moe/collapsed"] == 0
    assert 1.0 < max(row[f"moe/load_max/block.{b}"] for row in rows for b in SPARSE) < E / K  # not trivial


class ZeroRouters:
    """After every step, every router's weight set to zero: all logits tie, and top-1 picks the same
    expert for every token (the router gets no gradient: its one routing weight is renormalised to 1)."""

    def on_step_end(self, run, result, metrics):
        with torch.no_grad():
            for _, mlp in sparse_blocks(run.strategy.unwrapped()):
                mlp.router.weight.zero_()


def test_a_collapsed_router_is_flagged_once_naming_block_and_expert(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = [*MOE, "model.n_experts_per_token=1", "model.router_aux_loss_coef=0", "train.max_steps=4",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_recording(args, tmp_path / "run", callbacks=(ZeroRouters(),))
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["moe/collapsed"] == 0  # the first step routes with the initial (random) routers
    for row in rows[1:]:
        assert row["moe/collapsed"] == len(SPARSE)
        for b in SPARSE:
            assert row[f"moe/load_max/block.{b}"] == E  # E / k: every token to one expert
            assert sorted(row[f"moe/load/block.{b}"]) == [0, 0, 0, 1]
    warnings = [r.getMessage() for r in caplog.records if "expert collapse" in r.getMessage()]
    experts = {b: rows[1][f"moe/load/block.{b}"].index(1) for b in SPARSE}
    assert warnings == [  # once, when they collapse: not again while they stay collapsed
        f"expert collapse at step 2: block.0 routes 100.0% of its tokens to expert {experts[0]}, block.2 routes "
        f"100.0% of its tokens to expert {experts[2]} (monitor.moe_collapse_share=0.9); "
        "model.router_aux_loss_coef=0: no loss balances the load"
    ]
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("expert load:")]
    assert started == [
        "expert load: 2 sparse blocks of 4 experts, top 1; a block's busiest expert is flagged as collapsed at a "
        "share of tokens >= 0.9 (monitor.moe_collapse_share), balanced routing gives 0.25"
    ]


class OneRank:
    world_size = 1

    def all_reduce_sum(self, value: torch.Tensor, what: str = "sum") -> torch.Tensor:
        return value


def tiny_moe(**overrides) -> GPT:
    fields = dict(vocab_size=32, n_layer=2, n_embd=16, n_head=2, mlp="swiglu", n_experts=E, bias=False)
    return GPT(ModelConfig(**{**fields, **overrides}))


def test_the_rule_counts_tokens_not_slots_and_is_off_where_every_token_takes_every_expert() -> None:
    """Hand-set routings through ExpertLoad: shares summed over micro-batches; collapse at a share of
    tokens (slots x k), which k = E always reaches (no flag there); a threshold balanced routing
    reaches is refused naming the setting."""
    model = tiny_moe(n_experts_per_token=2)
    watch = ExpertWatch.of(model, collapse_share=0.9)
    load = watch.start()
    (_, first), (_, second) = sparse_blocks(model)
    model.moe_aux_loss = torch.tensor(2.5)
    first.last_topk, second.last_topk = torch.tensor([[3, 0]] * 9 + [[3, 1]]), torch.tensor([[0, 1], [2, 3]] * 5)
    load.add()
    model.moe_aux_loss = torch.tensor(1.5)
    first.last_topk, second.last_topk = torch.tensor([[3, 2]] * 10), torch.tensor([[1, 0], [3, 2]] * 5)
    load.add()
    metrics, warning = load.metrics(OneRank(), step=7, shares=True)
    assert metrics == {
        "moe/aux_loss": 2.0,
        "moe/load_max/block.0": 2.0,  # expert 3 in all 20 tokens: 20 of 40 slots, twice the mean
        "moe/load/block.0": [9 / 40, 1 / 40, 10 / 40, 20 / 40],
        "moe/load_max/block.1": 1.0,
        "moe/load/block.1": [0.25] * 4,
        "moe/collapsed": 1,
    }
    assert warning.startswith("expert collapse at step 7: block.0 routes 100.0% of its tokens to expert 3 (")
    everyone = ExpertWatch.of(tiny_moe(n_experts_per_token=E), collapse_share=0.9)
    load = everyone.start()
    for _, mlp in sparse_blocks(everyone.model):
        mlp.last_topk = torch.tensor([[0, 1, 2, 3]] * 5)
    everyone.model.moe_aux_loss = torch.tensor(4.0)
    load.add()
    metrics, warning = load.metrics(OneRank(), step=1, shares=False)
    assert metrics["moe/collapsed"] == 0 and warning is None and "moe/load/block.0" not in metrics
    with pytest.raises(ConfigError, match=r"monitor.moe_collapse_share=0.5 is at or below .* k / E = 2/4"):
        ExpertWatch.of(tiny_moe(n_experts_per_token=2), collapse_share=0.5)
    assert ExpertWatch.of(tiny_moe(n_experts=0, mlp="gelu"), collapse_share=0.9) is None  # dense: no watch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync is a CUDA notion")
def test_accumulating_a_micro_batch_has_no_host_sync_on_a_gpu() -> None:
    model = tiny_moe(n_experts_per_token=2).cuda()
    watch = ExpertWatch.of(model, collapse_share=0.9)
    idx = torch.randint(0, 32, (4, 16), device="cuda")
    model(idx, targets=idx)  # sets every block's routing and the aux loss
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        load = watch.start()
        load.add()
        load.add()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    metrics, _ = load.metrics(OneRank(), step=1, shares=True)
    assert sum(metrics["moe/load/block.0"]) == pytest.approx(1.0)


@pytest.mark.slow  # 12 s: the all-reduced counts (the reduction also runs, unchecked, in test_expert_parallel)
def test_two_ddp_ranks_log_the_load_of_one_process(tmp_path: Path) -> None:
    """The same global batch of 8 rows: one process in 2 micro-batches of 4, or 2 ranks with one each."""
    args = [*MOE, "train.max_steps=2", "train.micro_batch_size=4", "train.global_batch_size=8",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    one = run_cli(*args, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "trainer", *args, "parallel=ddp", f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    single, ranks = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in single] == [r["step"] for r in ranks] == [1, 2]
    slots = 8 * 32 * K  # of each block, per step
    for a, b in zip(single, ranks, strict=True):
        assert a["moe/aux_loss"] == pytest.approx(b["moe/aux_loss"], rel=1e-5)  # the same micro-batches
        for block in SPARSE:
            key = f"moe/load/block.{block}"
            # step 1: the same weights route the same tokens alike; step 2: to a slot or two of fp32 rounding
            assert a[key] == pytest.approx(b[key], abs=1e-6 if a["step"] == 1 else 2.5 / slots)
            assert a[key] != pytest.approx([1 / E] * E, abs=1e-3)  # not a trivially balanced load
            assert a[f"moe/load_max/block.{block}"] == pytest.approx(
                b[f"moe/load_max/block.{block}"], abs=E * 2.5 / slots
            )


# -- the dashboard ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_page(moe_run: tuple[Path, list[dict]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page of the MoE run beside a dense synthetic run."""
    from test_report import synthetic_run

    tmp = tmp_path_factory.mktemp("moe_page")
    synthetic_run(tmp / "dense", steps=10)
    page = tmp / "page.html"
    assert report_main([str(moe_run[0]), str(tmp / "dense"), "--out", str(page)]) == 0
    return page


def cells(svg: Elements) -> list[list[float]]:
    """An expert heatmap's cells' data-value, a row of E per block (the cells come row by row)."""
    flat = [float(a["data-value"]) for a in svg.find("rect") if "data-expert" in a]
    assert len(flat) == E * len(svg.find("g", **{"class": "hm-row"}))
    return [flat[i : i + E] for i in range(0, len(flat), E)]


def test_page_has_the_expert_heatmaps_of_the_moe_run_only(moe_page: Path, moe_run: tuple[Path, list[dict]]) -> None:
    text, rows = moe_page.read_text(), read_metrics(moe_run[0])
    page = Elements(text)
    kinds = {a["id"]: a["data-chart"] for a in page.find("svg") if "data-chart" in a}
    assert {k: v for k, v in kinds.items() if "moe" in v or "expert" in v} == {
        "moe-aux-loss": "moe-aux-loss",
        "moe-load-heatmap-0": "moe-load-heatmap",
        "expert-heatmap-0": "expert-heatmap",
    }  # run 0 is the MoE run; the dense run 1 has none, and is not said to be missing them
    assert not page.find("p", **{"class": "nodata"})
    experts = chart(text, "expert-heatmap-0")
    assert [a["data-group"] for a in experts.find("g", **{"class": "hm-row"})] == [f"block.{b}" for b in SPARSE]
    last = rows[-1]
    assert cells(experts) == [last[f"moe/load/block.{b}"] for b in SPARSE]  # the last logged step's shares
    hi = max(v for b in SPARSE for row in rows for v in row[f"moe/load/block.{b}"])
    fills = [a["fill"] for a in experts.find("rect") if "data-expert" in a]
    assert fills == [viridis(v / hi) for b in SPARSE for v in last[f"moe/load/block.{b}"]]
    assert f"block.2 expert 3: {last['moe/load/block.2'][3]:.2%}" in text
    history = chart(text, "moe-load-heatmap-0")
    assert [a["data-group"] for a in history.find("g", **{"class": "hm-row"})] == ["block.0", "block.2"]
    assert sorted(["block.10", "block.2.mlp", "block.2"], key=group_order) == ["block.2", "block.2.mlp", "block.10"]
    (aux,) = json_data(text, "moe-aux-loss")["lines"]  # the MoE run's alone
    assert aux["label"] == "run aux loss" and aux["y"] == pytest.approx([r["moe/aux_loss"] for r in rows], rel=1e-5)
    data = json_data(text, "expert-heatmap-0")  # the slider's steps
    assert data["steps"] == [1, 2, 3, 4] and data["shares"][0] == [rows[0][f"moe/load/block.{b}"] for b in SPARSE]


def json_data(text: str, chart_id: str) -> dict:
    start = text.index(f'<script type="application/json" data-for="{chart_id}">')
    return json.loads(text[text.index(">", start) + 1 : text.index("</script>", start)])


@pytest.mark.heavy
def test_expert_heatmap_renders_and_its_slider_shows_each_logged_step(
    moe_page: Path,
    moe_run: tuple[Path, list[dict]],
    browser: str,  # noqa: F811 (test_report's fixture)
    tmp_path: Path,
) -> None:
    command = chromium_command(browser, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom")
    dom = subprocess.run([*command, moe_page.as_uri() + "#selftest"], capture_output=True, text=True, timeout=120)
    body = Elements(dom.stdout).find("body")[0]
    assert "data-errors" not in body and "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    assert body["data-rendered"] == body["data-charts"]  # every chart drew something
    result = json.loads(body["data-selftest-experts"])["expert-heatmap-0"]
    assert "error" not in result and result["size"][0] > 0 and result["size"][1] > 0 and result["slider"]
    rows = read_metrics(moe_run[0])
    hi = max(v for b in SPARSE for row in rows for v in row[f"moe/load/block.{b}"])
    for state, row in ((result["last"], rows[-1]), (result["first"], rows[0]), (result["back"], rows[-1])):
        assert state["step"] == f"step {row['step']}"
        shown = state["cells"]  # a row per block: (data-value, fill, hover text) per expert
        assert [len(r) for r in shown] == [E] * len(SPARSE)
        for b, cells_of_block in zip(SPARSE, shown, strict=True):
            shares = row[f"moe/load/block.{b}"]
            assert [v for v, _, _ in cells_of_block] == shares
            for (v, fill, tip), e in zip(cells_of_block, range(E), strict=True):
                want = bytes.fromhex(viridis(v / hi)[1:])  # the page's colour, within rounding
                assert max(abs(x - y) for x, y in zip(bytes.fromhex(fill[1:]), want, strict=True)) <= 1, (fill, v)
                assert tip == f"block.{b} expert {e}: {100 * v:.2f}%"
    assert result["first"]["cells"] != result["last"]["cells"]  # the slider changed what is shown
