"""GAQ's tuning study (gaq/gaq_tuning.py) and the meta step's minibatch coverage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gaq.gaq_tuning import Setting, StudyConfig, render, run_study, summarise, write
from gaq.meta import MetaConfig, _minibatches
from gaq.reconstruction import BlockData

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(sizes: list[int]) -> BlockData:
    data = BlockData("memory")
    start = 0
    for n in sizes:
        index = torch.arange(start, start + n)
        data.add({"args": (index.float()[:, None],), "kwargs": {}, "target": index.float(),
                  "t": index % 3, "index": index})
        start += n
    return data


@pytest.mark.parametrize("batch", [4, 5, 32])
def test_epoch_coverage_sees_every_row_once_per_epoch(batch):
    data = _data([7, 7, 6])  # 20 rows in three captured batches of unequal size
    per_epoch = math.ceil(20 / batch)
    cfg = MetaConfig(coverage="epochs", iters=3 * per_epoch, batch_size=batch)
    batches = list(_minibatches(data, cfg, torch.Generator().manual_seed(0)))
    seen = [b["index"] for b in batches]
    assert len(seen) == cfg.iters
    for e in range(3):
        epoch = torch.cat(seen[e * per_epoch:(e + 1) * per_epoch])
        assert sorted(epoch.tolist()) == list(range(20))
    for b in batches:  # each row's inputs, target and index stay together
        assert torch.equal(b["target"], b["index"].float())
        assert torch.equal(b["args"][0][:, 0], b["index"].float())


def test_random_coverage_is_unchanged_and_the_default():
    """The default draws exactly what the meta step always drew (cell ids and committed
    GAQ results depend on it), and is not written into the config."""
    data = _data([8, 8])
    cfg = MetaConfig(iters=4, batch_size=4)
    assert cfg.coverage == "random" and "coverage" not in cfg.to_dict()
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = [b["index"] for b in _minibatches(data, cfg, gen_a)]
    want = [data.sample(4, gen_b)["index"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert MetaConfig(coverage="epochs").to_dict()["coverage"] == "epochs"
    with pytest.raises(ValueError, match="coverage"):
        MetaConfig(coverage="sometimes")


@pytest.mark.slow
def test_study_runs_on_a_tiny_pipeline_and_renders(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    settings = (Setting("base"), Setting("epochs 1", {"coverage": "epochs", "iters": 2}),
                Setting("no L_GM", {"matching": False}))
    cfg = StudyConfig(model=str(tiny_pipeline_dir), steps=4, interval=2, train_trajectories=4,
                      test_trajectories=2, blocks=2, seeds=(0, 1), weight_iters=2,
                      eval_minibatches=1,
                      base=MetaConfig(iters=1, batch_size=4, matching_scale="paper",
                                      diagnostic_rows=0, groups=2))
    record = run_study(cfg, settings, device="cpu", log=lambda m: None)
    rows = record["rows"]
    assert len(rows) == 2 * 2 * 3 and len(record["blocks"]) == 2
    # 2 kept timesteps: 4 training trajectories, 1 validation and 2 test ones each
    assert (record["rows_train"], record["rows_validation"], record["rows_test"]) == (8, 2, 4)
    for r in rows:
        assert r["heldout_uniform"] > 0 and math.isfinite(r["heldout_learned"])
        assert r["heldout_change"] == pytest.approx(r["heldout_learned"] / r["heldout_uniform"]
                                                    - 1)
    # the uniform reference is one AdaRound per (block, seed), shared by every setting
    for block in record["blocks"]:
        for seed in (0, 1):
            ref = {r["heldout_uniform"] for r in rows if r["block"] == block and r["seed"] == seed}
            assert len(ref) == 1
    assert all(r["matching_to_val_ratio"] == 0 for r in rows if r["setting"] == "no L_GM")
    summary = summarise(record)
    assert [s["setting"] for s in summary] == ["base", "epochs 1", "no L_GM"]
    assert all(s["n"] == 4 for s in summary)
    paths = write(json.loads(json.dumps(record)), tmp_path / "out")
    assert [p.name for p in paths] == ["study.json", "study.md", "proxy_vs_heldout.png"]
    text = render(record)
    assert all(f"| {s.name} |" in text for s in settings)
