"""Paired differences: intervals over seeds (Student t) and over images (bootstrap), and
the table's verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gaq.bench.paired import interval, paired_table, seed_paired_table


def test_interval_over_seeds_is_student_t_of_the_seed_means():
    rng = np.random.default_rng(1)
    per_seed = {s: rng.normal(30 + s, 1.0, size=64) for s in range(4)}
    mean, low, high, how = interval(per_seed)
    means = [v.mean() for v in per_seed.values()]
    ref = stats.t.interval(0.95, len(means) - 1, loc=np.mean(means), scale=stats.sem(means))
    assert mean == pytest.approx(np.mean(means))
    assert (low, high) == pytest.approx(ref, rel=1e-4)  # the t table has 3 decimals
    assert how == "t over 4 seeds"


def test_bootstrap_interval_over_images_has_the_normal_width():
    values = np.random.default_rng(2).normal(0.0, 2.0, size=400)
    mean, low, high, how = interval({0: values})
    assert low < mean < high and how == "bootstrap over 400 images"
    normal_half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(normal_half, rel=0.15)


def _rows(method, seed, values):
    return pd.DataFrame({"model": "m", "bits": "W4A8", "method": method, "seed": seed,
                         "image": range(len(values)), "metric": "psnr", "value": values})


def test_table_resolves_a_paired_shift_that_image_spread_would_hide():
    rng = np.random.default_rng(3)
    base = rng.normal(25.0, 4.0, size=128)  # large image-to-image spread
    rows = pd.concat([
        _rows("gaq", 0, base),
        _rows("tfmq", 0, base - 0.3 + rng.normal(0, 0.2, 128)),  # 0.3 dB worse, paired
        _rows("rtn", 0, base + rng.normal(0, 0.2, 128)),  # no difference
    ])
    md = paired_table(rows, "toy")
    line = {row.split("|")[1].strip(): row for row in md.splitlines() if row.startswith("| ")}
    assert "**resolved**" in line["TFMQ-DM"] and "−0.3" in line["TFMQ-DM"]
    assert "not resolved" in line["RTN"]
    # unpaired, the same 0.3 dB shift is far inside either method's own interval
    lo, hi = (float(x) for x in line["GAQ"].split("|")[3].strip(" []").split(","))
    assert hi - lo > 1.0


def test_no_per_image_rows_no_table():
    assert paired_table(_rows("gaq", 0, [])[:0], "toy") is None


def _set_rows(method, fid_by_seed, bits="W4A8"):
    return pd.DataFrame({"model": "m", "bits": bits, "method": method,
                         "seed": list(fid_by_seed), "metric": "fid",
                         "value": list(fid_by_seed.values()),
                         "timestamp": pd.Timestamp("2026-01-01", tz="UTC")})


def test_set_metrics_pair_by_seed_and_resolve_what_the_seed_spread_hides():
    # FID moves a lot from seed to seed (the noise draw), and both rows of a seed share it
    seed_fid = {0: 3.0, 1: 5.0, 2: 4.0, 3: 7.0, 4: 3.5}
    gaq = {s: v + 0.05 * s for s, v in seed_fid.items()}
    worse = {s: v + 0.6 + 0.05 * ((s * 7) % 3) for s, v in seed_fid.items()}
    same = {s: v + (0.1 if s % 2 else -0.1) for s, v in seed_fid.items()}
    metrics = pd.concat([_set_rows("gaq", gaq), _set_rows("tfmq", worse),
                         _set_rows("rtn", same), _set_rows("fp", seed_fid, bits="FP")])
    md = seed_paired_table(metrics, "toy")
    line = {row.split("|")[1].strip(): row for row in md.splitlines() if row.startswith("| ")}
    d = [worse[s] - gaq[s] for s in seed_fid]
    mean = np.mean(d)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=mean, scale=stats.sem(d))
    assert f"**+{mean:.2f} [+{low:.2f}, +{high:.2f}]**" in line["TFMQ-DM"]
    # read as independent rows, the same difference is far from resolved
    indep = float(line["TFMQ-DM"].split("(±")[1].split(")")[0])
    assert indep > 2 * mean
    assert "**" not in line["RTN"]
    assert "FP" not in line  # FP is the reference of every row, not a compared method


def test_set_metrics_need_two_common_seeds_and_the_anchor():
    one = pd.concat([_set_rows("gaq", {0: 3.0}), _set_rows("tfmq", {0: 4.0})])
    assert seed_paired_table(one, "toy") is None
    assert seed_paired_table(_set_rows("tfmq", {0: 4.0, 1: 5.0}), "toy") is None
