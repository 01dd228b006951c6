"""The reproduction verdict: numbers judged by a measured numerical tolerance, conclusions
by the comparisons the reference resolves, one line that passes or fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from gaq.bench import reproduce, results, verdict

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "w4a8"
needs_reference = pytest.mark.skipif(not (REFERENCE / "per_image.parquet").exists(),
                                     reason="the committed w4a8 reference is not here")
BASE = {"model": "m", "method": "rtn", "bits": "W4A8", "seed": 0}


def _judged(metrics: pd.DataFrame) -> pd.Series:
    return ~metrics["metric"].isin(reproduce.COST_METRICS | reproduce._SKIP)


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return reproduce.reference_metrics(REFERENCE)


@pytest.fixture(scope="module")
def reference_conclusions() -> pd.DataFrame:
    return verdict.conclusions(REFERENCE, "gaq")


def _run_folder(tmp_path: Path) -> Path:
    """A copy of the committed reference as a run's folder, to perturb."""
    run = tmp_path / "run" / "w4a8"
    run.mkdir(parents=True)
    for path in REFERENCE.glob("*.parquet"):
        shutil.copyfile(path, run / path.name)
    return run


def _verdict(run_dir: Path, reference: pd.DataFrame, ref_conclusions: pd.DataFrame,
             tolerance: verdict.Tolerance | None) -> tuple[bool, str, pd.DataFrame]:
    table = reproduce.compare(results.read(run_dir / "metrics.parquet"), reference, tolerance)
    checks = verdict.check_conclusions(ref_conclusions, verdict.conclusions(run_dir, "gaq"))
    ok, line = verdict.verdict(table, checks)
    return ok, line, checks


@needs_reference
def test_the_reference_reproduces_itself(reference, reference_conclusions):
    checks = verdict.check_conclusions(reference_conclusions, reference_conclusions)
    ok, line = verdict.verdict(reproduce.compare(reference, reference,
                                                 verdict.read_tolerance(REFERENCE)), checks)
    resolved = int(reference_conclusions["resolved"].sum())
    assert ok and line.startswith("REPRODUCED: ")
    assert f"conclusions preserved: {resolved} of {resolved}" in line and resolved > 0


@needs_reference
@pytest.mark.parametrize("measured", [True, False], ids=["measured", "least"])
def test_a_relative_change_of_1e_5_in_every_value_reproduces(reference, measured):
    """What another CPU's float32 rounding does to every value (summaries without a noise
    floor included) is numerical, and passes."""
    tolerance = verdict.read_tolerance(REFERENCE) if measured else None
    if measured and tolerance is None:
        pytest.skip("the reference has no measured tolerance")
    run = reference.copy()
    judged = _judged(run)
    run.loc[judged, "value"] = run.loc[judged, "value"] * (1 + 1e-5)
    table = reproduce.compare(run, reference, tolerance)
    assert (table["verdict"] != "differs").all(), table[table["verdict"] == "differs"]
    ok, line = verdict.verdict(table, None)
    assert ok and line.startswith("REPRODUCED")
    assert "within numerical tolerance" in line


@needs_reference
def test_rtn_fid_moved_to_fp_fid_does_not_reproduce(reference):
    run = reference.copy()
    at = (run["model"] == "digits") & (run["metric"] == "fid")
    fp = run.loc[at & (run["method"] == "fp"), "value"].iloc[0]
    run.loc[at & (run["method"] == "rtn"), "value"] = fp
    table = reproduce.compare(run, reference, verdict.read_tolerance(REFERENCE))
    row = table.set_index(["model", "method", "metric"]).loc[("digits", "rtn", "fid")]
    assert row["verdict"] == "differs"
    ok, line = verdict.verdict(table, None)
    assert not ok and line.startswith("NOT REPRODUCED: 1 of ")
    assert "digits/rtn/W4A8/seed 0 fid" in line


@needs_reference
@pytest.mark.parametrize("tolerance", ["measured", "lax"])
def test_psnr_shifts_that_reverse_a_resolved_comparison_do_not_reproduce(
        tmp_path, reference, reference_conclusions, tolerance):
    """GAQ +0.40 dB and TFMQ-DM −0.40 dB at once on digits: the reference's resolved
    'TFMQ-DM − GAQ = +0.102 dB' (and its twin row, GAQ with uniform ω) is reversed. With a
    tolerance lax enough to pass every value, the flipped conclusion alone fails the
    verdict."""
    run_dir = _run_folder(tmp_path)
    shift = {"gaq": 0.40, "tfmq": -0.40}
    for name in ("per_image.parquet", "metrics.parquet"):
        df = pd.read_parquet(run_dir / name)
        for method, dv in shift.items():
            at = (df["model"] == "digits") & (df["method"] == method) & (df["metric"] == "psnr")
            df.loc[at, "value"] += dv
        df.to_parquet(run_dir / name)
    tol = (verdict.read_tolerance(REFERENCE) if tolerance == "measured" else
           verdict.Tolerance({"psnr": {"rel": 1.0, "abs": 1.0}}))
    ok, line, checks = _verdict(run_dir, reference, reference_conclusions, tol)
    assert not ok and line.startswith("NOT REPRODUCED")
    flipped = checks[checks["status"] == "reversed"].set_index(["model", "method"])
    assert ("digits", "tfmq") in flipped.index
    assert "reversed: digits W4A8 PSNR: " in line and " − GAQ +0.102 [+0.053, +0.157]" in line
    if tolerance == "lax":
        assert "values differ" not in line and "conclusion(s) flipped" in line


@needs_reference
def test_a_resolved_comparison_that_is_lost_does_not_reproduce(tmp_path, reference,
                                                               reference_conclusions):
    """TDQ − GAQ (+0.653 dB, resolved on digits) pulled to 0: no longer resolved."""
    run_dir = _run_folder(tmp_path)
    df = pd.read_parquet(run_dir / "per_image.parquet")
    digits = (df["model"] == "digits") & (df["metric"] == "psnr")
    gaq = df[digits & (df["method"] == "gaq")].set_index("image")["value"]
    tdq = digits & (df["method"] == "tdq")
    df.loc[tdq, "value"] = df.loc[tdq, "image"].map(gaq).to_numpy()
    df.to_parquet(run_dir / "per_image.parquet")
    _, line, checks = _verdict(run_dir, reference, reference_conclusions, None)
    row = checks.set_index(["kind", "model", "method"]).loc[("paired", "digits", "tdq")]
    assert row["status"] == "lost" and "lost: digits W4A8 PSNR: TDQ − GAQ" in line


def test_an_unresolved_comparison_may_not_become_a_resolved_reversal():
    key = {"kind": "paired", "model": "m", "bits": "W4A8", "metric": "psnr", "versus": "gaq"}
    ref = pd.DataFrame([key | {"method": "a", "estimate": 0.1, "low": -0.1, "high": 0.3,
                               "resolved": False},
                        key | {"method": "b", "estimate": 0.1, "low": -0.1, "high": 0.3,
                               "resolved": False},
                        key | {"method": "c", "estimate": 0.0, "low": 0.0, "high": 0.0,
                               "resolved": False}])
    run = ref.copy()
    run[["estimate", "low", "high", "resolved"]] = [[-0.5, -0.7, -0.3, True],  # reversal
                                                    [0.5, 0.3, 0.7, True],  # same way
                                                    [1e-4, 5e-5, 2e-4, True]]  # from 0
    status = verdict.check_conclusions(ref, run).set_index("method")["status"]
    assert status.to_dict() == {"a": "reversed", "b": "unresolved", "c": "unresolved"}
    ok, line = verdict.verdict(pd.DataFrame([BASE | {"metric": "fid", "verdict": "identical",
                                                     "reference": 1.0, "run": 1.0,
                                                     "tolerance": 0.0}]),
                               verdict.check_conclusions(ref, run))
    assert not ok and "conclusions preserved: 0 of 0" in line and "reversed" in line


def _class_acc_frames(run_value: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [BASE | {"metric": "class_acc", "value": 1.0},
            BASE | {"metric": "n_images", "value": 128.0}]
    ref = pd.DataFrame(rows)
    run = ref.copy()
    run.loc[0, "value"] = run_value
    return run, ref


@pytest.mark.parametrize(("images", "expected"), [(0, "differs"), (1, "within tolerance"),
                                                  (4, "within tolerance")])
def test_one_misclassified_image_is_judged_by_class_accuracys_tolerance(images, expected):
    """class_acc counts images: one image of 128 misclassified is a change of 1/128, which
    passes exactly when the measured tolerance allows at least one image (the FP row's
    zero spread across seeds plays no part)."""
    run, ref = _class_acc_frames(127 / 128)
    tol = verdict.Tolerance({"class_acc": {"images": images, "unit": "n_images"}})
    table = reproduce.compare(run, ref, tol)
    assert table.set_index("metric").loc["class_acc", "verdict"] == expected
    # no image allowed: only a count's float32 rounding, far below one image
    allowed = images / 128 + 1e-6 if images else verdict.MIN_REL
    assert table.set_index("metric").loc["class_acc", "tolerance"] == pytest.approx(allowed)


@needs_reference
def test_class_accuracy_has_a_tolerance_in_images_in_the_committed_reference():
    tol = verdict.read_tolerance(REFERENCE)
    if tol is None:
        pytest.skip("the reference has no measured tolerance")
    spec = tol.metrics["class_acc"]
    assert spec["unit"] == "n_images" and spec["images"] >= 0
    run, ref = _class_acc_frames(127 / 128)
    got = reproduce.compare(run, ref, tol).set_index("metric").loc["class_acc", "verdict"]
    assert got == ("within tolerance" if spec["images"] >= 1 else "differs")


def test_tolerance_is_the_margin_times_the_largest_change_per_metric():
    ref = pd.DataFrame([BASE | {"metric": "fid", "value": 20.0},
                        BASE | {"method": "gaq", "metric": "fid", "value": 10.0},
                        BASE | {"metric": "kid", "value": 1e-9},  # near 0: judged absolutely
                        BASE | {"method": "gaq", "metric": "kid", "value": 2.0},
                        BASE | {"metric": "mse", "value": 0.5},
                        BASE | {"metric": "precision", "value": 100 / 128},
                        BASE | {"metric": "n_images", "value": 128.0},
                        BASE | {"method": "gaq", "metric": "n_images", "value": 128.0}])
    a, b = ref.copy(), ref.copy()
    a.loc[0, "value"] = 20.002  # 1e-4 relative
    b.loc[1, "value"] = 10.003  # 3e-4 relative: the largest
    a.loc[2, "value"] = 1e-9 + 0.01
    b.loc[5, "value"] = 98 / 128  # two images
    tol = verdict.derive_tolerance(ref, {"a": a, "b": b}, margin=4.0)
    fid, kid, mse, prec = (tol.metrics[m] for m in ("fid", "kid", "mse", "precision"))
    assert fid["rel"] == pytest.approx(4 * 3e-4) and fid["max_change"]["b"] == pytest.approx(
        0.003)
    assert kid["abs"] == pytest.approx(0.04)
    assert mse["rel"] == verdict.MIN_REL and mse["changed"] == 0  # never moved: the least
    assert prec["images"] == 8 and prec["observed_images"] == 2
    assert tol.bound("fid", 20.0) == pytest.approx(20 * 4 * 3e-4)
    assert tol.bound("kid", 0.0) == pytest.approx(0.04)
    # every observed change is inside the derived tolerance
    for run in (a, b):
        assert (reproduce.compare(run, ref, tol)["verdict"] != "differs").all()


def test_a_tolerance_survives_a_reference_update(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_dir.mkdir()
    pd.DataFrame([BASE | {"metric": "fid", "value": 1.0}]).to_parquet(
        run_dir / "metrics.parquet")
    ref_dir.mkdir()
    verdict.write_tolerance(ref_dir, verdict.Tolerance({"fid": {"rel": 0.01, "abs": 0.0}}))
    reproduce.update_reference(run_dir, ref_dir, pd.DataFrame(columns=["model", "metric"]))
    assert verdict.read_tolerance(ref_dir).metrics["fid"]["rel"] == 0.01


def test_a_reference_update_keeps_only_each_cells_newest_run(tmp_path):
    # a run into a copy of the reference recomputes the cells a change touched: the rows
    # they replaced (older cell id, same model/method/bits/seed) must not reach the reference
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    run_dir.mkdir()
    stamp = pd.Timestamp("2026-12-01", tz="UTC")
    cells = [("old", "gaq", stamp), ("new", "gaq", stamp + pd.Timedelta(days=1)),
             ("keep", "rtn", stamp)]
    pd.DataFrame([BASE | {"method": m, "cell_id": c, "timestamp": t, "metric": "fid",
                          "value": float(i)} for i, (c, m, t) in enumerate(cells)]
                 ).to_parquet(run_dir / "metrics.parquet")
    pd.DataFrame([{"cell_id": c, "method": m, "image": 0, "value": 1.0}
                  for c, m, _ in cells]).to_parquet(run_dir / "per_image.parquet")
    reproduce.update_reference(run_dir, ref_dir, pd.DataFrame(columns=["model", "metric"]))
    for name in ("metrics.parquet", "per_image.parquet"):
        assert sorted(pd.read_parquet(ref_dir / name)["cell_id"]) == ["keep", "new"], name
    # the store the run wrote is left as it was
    assert len(pd.read_parquet(run_dir / "per_image.parquet")) == 3


def test_a_reference_update_keeps_the_noise_floor_only_while_fp_is_unchanged(tmp_path):
    ref_dir, run = tmp_path / "ref", tmp_path / "run" / "metrics.parquet"
    ref_dir.mkdir()
    run.parent.mkdir()

    def metrics(fp_cell: str) -> pd.DataFrame:
        base = results.read(tmp_path / "none.parquet")
        rows = [{"cell_id": c, "method": m, "model": "m", "bits": b, "seed": 0,
                 "metric": "fid", "value": 1.0, "benchmark": "b",
                 "timestamp": pd.Timestamp("2026-12-01", tz="UTC")}
                for c, m, b in ((fp_cell, "fp", "FP"), ("g1", "gaq", "W4A8"))]
        return pd.concat([base, pd.DataFrame(rows)], ignore_index=True)

    floor = pd.DataFrame({"model": ["m"], "metric": ["fid"], "n": [6], "sd": [0.5]})
    metrics("fp0").to_parquet(ref_dir / "metrics.parquet")
    assert reproduce.kept_floor(run, ref_dir) is None  # no floor in the reference yet
    floor.to_parquet(ref_dir / reproduce.FLOOR_FILE)
    metrics("fp0").to_parquet(run)
    assert reproduce.kept_floor(run, ref_dir).equals(floor)
    metrics("fp-new").to_parquet(run)  # FP itself was recomputed: measure again
    assert reproduce.kept_floor(run, ref_dir) is None


def test_paired_comparisons_are_the_paired_tables_numbers():
    from gaq.bench.paired import paired_comparisons, paired_table

    rows = []
    for i in range(16):
        for method, v in (("gaq", 30.0 + 0.01 * i), ("rtn", 25.0 + 0.5 * (i % 3)),
                          ("tfmq", 30.0 + 0.01 * i + (0.2 if i % 2 else -0.1))):
            rows.append({"model": "m", "bits": "W4A8", "seed": 0, "image": i, "cell_id": method,
                         "method": method, "metric": "psnr", "value": v})
    per_image = pd.DataFrame(rows)
    comp = paired_comparisons(per_image, "psnr", "gaq").set_index("method")
    text = paired_table(per_image, "b", anchor="gaq")
    for method, label in (("rtn", "RTN"), ("tfmq", "TFMQ-DM")):
        r = comp.loc[method]
        line = next(x for x in text.splitlines() if x.startswith(f"| {label} |"))
        shown = f"[{r['low']:+.3f}, {r['high']:+.3f}]".replace("-", "−")
        assert shown in line
        assert ("**resolved**" in line) == bool(r["resolved"])


def _fid_folder(folder: Path, fids: dict[str, list[float]]) -> Path:
    rows = []
    for method, values in fids.items():
        for seed, v in enumerate(values):
            bits = "FP" if method == "fp" else "W4A8"
            rows.append({"model": "m", "method": method, "bits": bits, "seed": seed,
                         "metric": "fid", "value": v, "cell_id": f"{method}{seed}",
                         "run_id": "r", "benchmark": folder.name, "preset": "cpu",
                         "w_bits": 4, "a_bits": 8, "setup": "cpu"})
    results.append(folder / "metrics.parquet", pd.DataFrame(rows))
    return folder


def test_a_bold_best_row_must_stay_best(tmp_path):
    fp = [5.0, 5.1, 4.9]
    ref = verdict.conclusions(_fid_folder(tmp_path / "ref" / "b", {
        "fp": fp, "rtn": [20.0, 20.2, 19.8], "gaq": [10.0, 10.1, 9.9]}))
    best = ref[ref["kind"] == "best"]
    assert best[["method", "metric"]].values.tolist() == [["gaq", "fid"]]
    same = verdict.conclusions(_fid_folder(tmp_path / "same" / "b", {
        "fp": fp, "rtn": [20.0, 20.2, 19.8], "gaq": [10.0, 10.1, 9.9]}))
    flipped = verdict.conclusions(_fid_folder(tmp_path / "flip" / "b", {
        "fp": fp, "rtn": [20.0, 20.2, 19.8], "gaq": [30.0, 30.1, 29.9]}))
    fewer = verdict.conclusions(_fid_folder(tmp_path / "fewer" / "b", {
        "fp": fp, "gaq": [10.0, 10.1, 9.9]}))

    def status(run: pd.DataFrame) -> str:
        checks = verdict.check_conclusions(ref, run)
        return checks[checks["kind"] == "best"]["status"].item()

    assert status(same) == "preserved"
    assert status(flipped) == "reversed"  # RTN is the bold one now
    assert status(fewer) == "not run"  # a run without RTN cannot say GAQ beats it
