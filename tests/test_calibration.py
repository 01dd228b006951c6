"""Calibration sets: protocols, batch-size invariance, holdout balance, disk cache, forward loop."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from diffusers import DDPMScheduler

from gaq.calibration import (
    CalibrationCacheWarning,
    CalibrationSet,
    CalibrationSpec,
    calibration_key,
    default_cache_dir,
    forward_loop,
    per_timestep_loop,
    record_calibration,
)
from gaq.config import ConfigError
from gaq.errors import GaqError
from gaq.models.conditioning import ClassConditioning
from gaq.models.pipeline import Pipeline
from gaq.sampling import (
    SamplerConfig,
    draw,
    image_generators,
    sample_batch,
    sampling_timesteps,
)

MODEL_ID = "tiny-unet"


@pytest.fixture
def sched():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def spec(**kw: object) -> CalibrationSpec:
    defaults: dict[str, object] = dict(steps=4, interval=2, samples_per_step=3, batch_size=2)
    defaults.update(kw)
    return CalibrationSpec(**defaults)


def record(unet, sched, s, conditioning=None, **kw):
    kw.setdefault("cache", False)
    pipe = Pipeline(unet, sched) if conditioning is None else Pipeline(unet, sched,
                                                                       conditioning=conditioning)
    return record_calibration(pipe, s, model_id=MODEL_ID, **kw)


class CountCalls:
    """Counts forward calls of a module (hook removed on exit)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.calls = module, 0

    def __enter__(self) -> CountCalls:
        self.handle = self.module.register_forward_pre_hook(lambda *_: self._bump())
        return self

    def _bump(self) -> None:
        self.calls += 1

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def assert_same_set(a: CalibrationSet, b: CalibrationSet, atol: float = 0.0) -> None:
    assert torch.equal(a.t, b.t) and torch.equal(a.split, b.split)
    assert torch.equal(a.image, b.image)
    torch.testing.assert_close(a.x, b.x, atol=atol, rtol=0)
    torch.testing.assert_close(a.eps_fp, b.eps_fp, atol=atol, rtol=0)
    assert a.cond.keys() == b.cond.keys()
    for k in a.cond:
        assert torch.equal(a.cond[k], b.cond[k])


# ------------------------------------------------------------------- interval protocol


def test_interval_protocol_keeps_every_interval_th_sampler_step(tiny_unet, sched):
    s = spec(steps=4, interval=2, samples_per_step=3)
    calib = record(tiny_unet, sched, s)
    kept = sampling_timesteps(sched, 4)[::2]  # iterations 0 and 2: t = 750, 250
    assert len(calib) == (4 // 2) * 3
    assert calib.timesteps() == sorted(kept)
    assert calib.x.dtype == torch.float32 and calib.x.shape == (6, 1, 8, 8)
    assert calib.t.dtype == torch.int64 and not calib.split.any()
    for ts, part in calib.by_timestep().items():
        assert sorted(part.image.tolist()) == [0, 1, 2], ts


def test_rows_are_the_sampler_trajectory_and_its_noise_prediction(tiny_unet, sched):
    s = spec(steps=4, interval=2, samples_per_step=3)
    calib = record(tiny_unet, sched, s)
    first = calib.subset(calib.t == sampling_timesteps(sched, 4)[0])
    # Iteration 0 is kept, so its x_t is the initial noise of gaq.sampling for those images.
    noise = draw(image_generators(s.seed, first.image.tolist()), (1, 8, 8))
    assert torch.equal(first.x, noise)
    # Every kept x_t is the one the plain sampler denoises at that iteration.
    seen: dict[int, torch.Tensor] = {}
    sample_batch(
        Pipeline(tiny_unet, sched), [0, 1, 2], seed=s.seed, sampler=SamplerConfig(steps=4),
        record=lambda k, t, x, e, inputs: seen.__setitem__(t, x.clone()),
    )
    for ts, part in calib.by_timestep().items():
        torch.testing.assert_close(part.x, seen[ts][part.image], atol=1e-6, rtol=0)
    with torch.no_grad():
        eps = tiny_unet(calib.x, calib.t).sample
    torch.testing.assert_close(calib.eps_fp, eps, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_batch_size_does_not_change_the_set(tiny_unet, sched):
    ref = record(tiny_unet, sched, spec(eta=1.0, samples_per_step=4, batch_size=4))
    for bs in (1, 3):
        s = spec(eta=1.0, samples_per_step=4, batch_size=bs)
        assert_same_set(record(tiny_unet, sched, s), ref, atol=1e-5)
    a = calibration_key(Pipeline(tiny_unet, sched), spec(batch_size=1), model_id=MODEL_ID)
    b = calibration_key(Pipeline(tiny_unet, sched), spec(batch_size=7), model_id=MODEL_ID)
    assert a == b


def test_cpu_thread_count_names_a_different_set(tiny_unet, sched):
    # the recorded floats depend on the thread count: a set recorded at 2 threads must not
    # be reused by a 1-thread run that is compared bit for bit with a 1-thread reference
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = calibration_key(Pipeline(tiny_unet, sched), spec(), model_id=MODEL_ID)
        torch.set_num_threads(2)
        two = calibration_key(Pipeline(tiny_unet, sched), spec(), model_id=MODEL_ID)
    finally:
        torch.set_num_threads(before)
    assert one != two


# ------------------------------------------------------------------- gaussian protocol


@pytest.mark.slow
@pytest.mark.parametrize("mean", [0.1, 0.9])
def test_gaussian_protocol_concentrates_near_the_mean_in_timestep_terms(
    tiny_unet, sched, mean
):
    # 0 is the clean end (t = 0): with mu = 0.1 most rows must sit in the clean tenth. An
    # implementation that read the position as a sampler iteration would put them near T.
    s = spec(protocol="gaussian", steps=20, num_samples=40, gauss_mean=mean,
             gauss_std=0.05, batch_size=40)
    calib = record(tiny_unet, sched, s)
    assert len(calib) == 40 and sorted(calib.image.tolist()) == list(range(40))
    pos = calib.t.double() / 1000
    near = (pos - mean).abs() <= 0.1
    assert near.float().mean() > 0.75
    assert abs(pos.mean().item() - mean) < 0.05
    if mean == 0.1:
        assert (calib.t <= 100).float().mean() > 0.5  # the clean tenth of the trajectory


@pytest.mark.slow
def test_gaussian_positions_are_per_trajectory(tiny_unet, sched):
    s = spec(protocol="gaussian", steps=4, num_samples=5, gauss_std=0.5)
    a = record(tiny_unet, sched, s)
    b = record(tiny_unet, sched, spec(protocol="gaussian", steps=4, num_samples=7,
                                      gauss_std=0.5, batch_size=3))
    # Adding trajectories and changing the batching keeps the first ones' draws.
    sub = b.subset(b.image < 5)
    assert_same_set(a, sub, atol=1e-5)


# ------------------------------------------------------------------- holdout


def test_holdout_has_equal_count_per_timestep_from_own_trajectories(tiny_unet, sched):
    calib = record(tiny_unet, sched, spec(samples_per_step=3, holdout_per_step=2))
    train, held = calib.train(), calib.holdout()
    assert len(train) + len(held) == len(calib) == 2 * 5
    assert Counter(held.t.tolist()) == {750: 2, 250: 2}
    assert Counter(train.t.tolist()) == {750: 3, 250: 3}
    assert set(held.image.tolist()).isdisjoint(train.image.tolist())


def test_gaussian_holdout_covers_every_sampler_step_equally(tiny_unet, sched):
    s = spec(protocol="gaussian", steps=4, num_samples=3, holdout_per_step=2)
    held = record(tiny_unet, sched, s).holdout()
    assert Counter(held.t.tolist()) == {t: 2 for t in sampling_timesteps(sched, 4)}


# ------------------------------------------------------------------- conditioning


def test_conditioning_reaches_the_denoiser_and_the_set(tiny_class_unet, sched):
    unet = tiny_class_unet
    labels = ClassConditioning(3)
    calib = record(unet, sched, spec(samples_per_step=4, batch_size=3), conditioning=labels)
    assert torch.equal(calib.cond["class_labels"], calib.image % 3)
    with torch.no_grad():
        eps = unet(calib.x, calib.t, class_labels=calib.cond["class_labels"]).sample
    torch.testing.assert_close(calib.eps_fp, eps, atol=1e-5, rtol=0)
    # The conditioning is part of the identity of the set.
    k1 = calibration_key(Pipeline(unet, sched, conditioning=labels), spec(), model_id="m")
    k2 = calibration_key(Pipeline(unet, sched, conditioning=ClassConditioning(3, labels=(0,))),
                         spec(), model_id="m")
    assert k1 != k2


# ------------------------------------------------------------------- cache


def test_cache_hit_skips_the_denoiser_and_returns_identical_tensors(tiny_unet, sched, tmp_path):
    s = spec(holdout_per_step=1)
    with CountCalls(tiny_unet) as first:
        a = record(tiny_unet, sched, s, cache=True, cache_dir=tmp_path)
    assert first.calls > 0
    key = a.meta["key"]
    assert (tmp_path / f"{key}.safetensors").is_file()
    meta = json.loads((tmp_path / f"{key}.json").read_text())
    assert meta["model_id"] == MODEL_ID and CalibrationSpec.from_dict(meta["spec"]) == s
    assert meta["shapes"]["x"] == [len(a), 1, 8, 8]
    assert not list(tmp_path.glob("*.tmp"))

    with CountCalls(tiny_unet) as second:
        b = record(tiny_unet, sched, spec(holdout_per_step=1, batch_size=5),
                   cache=True, cache_dir=tmp_path)
    assert second.calls == 0
    assert_same_set(a, b)
    assert b.meta["key"] == key

    with CountCalls(tiny_unet) as other:
        c = record(tiny_unet, sched, spec(holdout_per_step=1, seed=1), cache=True,
                   cache_dir=tmp_path)
    assert other.calls > 0 and c.meta["key"] != key
    assert not torch.equal(c.x, a.x)


def test_cache_key_tracks_weights_and_scheduler(tiny_unet, sched):
    s = spec()
    base = calibration_key(Pipeline(tiny_unet, sched), s, model_id=MODEL_ID)
    assert calibration_key(Pipeline(tiny_unet, sched), s, model_id="other") != base
    other_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    assert calibration_key(Pipeline(tiny_unet, other_sched), s, model_id=MODEL_ID) != base
    with torch.no_grad():
        tiny_unet.conv_out.bias.add_(1e-3)
    assert calibration_key(Pipeline(tiny_unet, sched), s, model_id=MODEL_ID) != base


def test_corrupt_cache_entry_is_recomputed_with_a_warning(tiny_unet, sched, tmp_path):
    a = record(tiny_unet, sched, spec(), cache=True, cache_dir=tmp_path)
    path = tmp_path / f"{a.meta['key']}.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn write
    with CountCalls(tiny_unet) as calls, pytest.warns(CalibrationCacheWarning):
        b = record(tiny_unet, sched, spec(), cache=True, cache_dir=tmp_path)
    assert calls.calls > 0
    assert_same_set(a, b, atol=1e-6)
    with CountCalls(tiny_unet) as again:  # the rewritten entry is whole again
        record(tiny_unet, sched, spec(), cache=True, cache_dir=tmp_path)
    assert again.calls == 0


def test_default_cache_dir_follows_gaq_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "calibration"
    monkeypatch.delenv("GAQ_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "gaq", "calibration")


# ------------------------------------------------------------------- set and forward loop


def synthetic(n: int = 7) -> CalibrationSet:
    return CalibrationSet(
        x=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(),
        t=torch.tensor([10, 20, 10, 30, 20, 10, 30][:n]),
        eps_fp=torch.zeros(n, 1, 2, 2),
        cond={"class_labels": torch.arange(n) % 2},
        split=torch.arange(n) >= 5,
    )


class Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def forward(self, x, t, **cond):
        self.calls.append((x, t, cond))
        return x * self.w


def test_forward_loop_visits_every_row_once_with_timestep_and_cond():
    calib = synthetic()
    model = Recorder()
    forward_loop(calib, batch_size=3)(model)
    assert [len(c[0]) for c in model.calls] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([c[0] for c in model.calls]), calib.x)
    assert torch.equal(torch.cat([c[1] for c in model.calls]), calib.t)
    labels = torch.cat([c[2]["class_labels"] for c in model.calls])
    assert torch.equal(labels, calib.cond["class_labels"])


def test_forward_loop_runs_a_diffusers_unet(tiny_unet, sched):
    calib = record(tiny_unet, sched, spec())
    with CountCalls(tiny_unet) as calls:
        forward_loop(calib, batch_size=4)(tiny_unet)
    assert calls.calls == 2  # 6 rows in batches of 4


def test_set_views_and_shuffled_batches():
    calib = synthetic()
    assert calib.timesteps() == [10, 20, 30]
    groups = calib.by_timestep()
    assert list(groups) == [10, 20, 30] and [len(g) for g in groups.values()] == [3, 2, 2]
    assert len(calib.train()) == 5 and calib.holdout().split.all()
    g = torch.Generator().manual_seed(0)
    batches = list(calib.batches(2, shuffle=True, generator=g))
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(7)) and index.tolist() != list(range(7))
    for b in batches:
        assert torch.equal(b["x"], calib.x[b["index"]])
        assert torch.equal(b["cond"]["class_labels"], calib.cond["class_labels"][b["index"]])
    assert calib.subset(torch.tensor([6, 0])).t.tolist() == [30, 10]
    assert calib.to("cpu").x.device.type == "cpu"
    with pytest.raises(ValueError, match="eps_fp"):
        CalibrationSet(x=torch.zeros(3, 1, 2, 2), t=torch.zeros(3, dtype=torch.long),
                       eps_fp=torch.zeros(2, 1, 2, 2))


# ------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"interval": 5}, "interval"),  # more than steps=4
        ({"samples_per_step": 0}, "samples_per_step"),
        ({"gauss_mean": 1.5}, "gauss_mean"),
        ({"gauss_std": 0.0}, "gauss_std"),
        ({"eta": 2.0}, "eta"),
        ({"batch_size": 0}, "batch_size"),
        ({"holdout_per_step": -1}, "holdout_per_step"),
        ({"protocol": "uniform"}, "protocol"),
    ],
)
def test_spec_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        spec(**kw)


def test_spec_round_trips_and_fingerprints_only_what_determines_the_data():
    s = spec(protocol="gaussian", gauss_mean=0.25, holdout_per_step=1)
    assert CalibrationSpec.from_toml(s.to_toml()) == s
    assert CalibrationSpec.from_json(s.to_json()) == s
    same = [spec(protocol="gaussian", gauss_mean=0.25, holdout_per_step=1, batch_size=9),
            spec(protocol="gaussian", gauss_mean=0.25, holdout_per_step=1, interval=1)]
    assert {x.data_fingerprint() for x in same} == {s.data_fingerprint()}
    assert spec(num_samples=3).data_fingerprint() == spec().data_fingerprint()  # interval
    assert spec(seed=1).data_fingerprint() != spec().data_fingerprint()


def test_a_nan_in_a_cached_set_is_recomputed_with_a_warning(tiny_unet, sched, tmp_path):
    from safetensors.torch import load_file, save_file

    a = record(tiny_unet, sched, spec(), cache=True, cache_dir=tmp_path)
    path = tmp_path / f"{a.meta['key']}.safetensors"
    tensors = load_file(path)
    tensors["eps_fp"][0, 0, 0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.warns(CalibrationCacheWarning, match="eps_fp holds NaN"):
        b = record(tiny_unet, sched, spec(), cache=True, cache_dir=tmp_path)
    assert bool(torch.isfinite(b.eps_fp).all())


def test_a_diverging_fp_model_is_named_while_recording(tiny_unet, sched):
    with torch.no_grad():
        tiny_unet.conv_out.bias.fill_(float("inf"))
    with pytest.raises(GaqError, match="(x_t|FP noise prediction) holds NaN or infinite") as err:
        record(tiny_unet, sched, spec())
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------- act_every_step


@pytest.mark.slow
def test_act_every_step_adds_activation_rows_and_leaves_the_set_unchanged(
        tiny_class_unet, sched, tmp_path):
    labels = ClassConditioning(2, null_class=2)
    base = spec(steps=6, interval=3, samples_per_step=3, holdout_per_step=1, guidance=2.0,
                sampler_name="ddim")
    plain = record(tiny_class_unet, sched, base, conditioning=labels)
    s = CalibrationSpec.from_dict({**base.to_dict(), "act_every_step": True})
    calib = record(tiny_class_unet, sched, s, conditioning=labels, cache=True,
                   cache_dir=tmp_path)
    # training and held-out rows are exactly the plain spec's
    assert_same_set(calib, plain)
    assert plain.act_extra is None
    extra = calib.act_extra
    visited = sampling_timesteps(sched, 6)
    kept = set(visited[::3])
    # the training trajectories at every step the protocol skips, both guidance halves
    assert set(extra.timesteps()) == set(visited) - kept
    assert not extra.split.any() and set(extra.image.tolist()) == {0, 1, 2}
    assert len(extra) == (6 - len(kept)) * 3 * 2
    rows = calib.activation_rows()
    assert set(rows.timesteps()) == set(visited) and not rows.split.any()
    assert len(rows) == len(calib.train()) + len(extra)
    # they are the inputs the sampler feeds the denoiser at those steps
    with torch.no_grad():
        eps = tiny_class_unet(extra.x, extra.t, class_labels=extra.cond["class_labels"]).sample
    torch.testing.assert_close(extra.eps_fp, eps, atol=1e-5, rtol=0)
    # round trip through the cache, under its own key
    assert calib.meta["key"] != plain.meta["key"]
    with CountCalls(tiny_class_unet) as again:
        hit = record(tiny_class_unet, sched, s, conditioning=labels, cache=True,
                     cache_dir=tmp_path)
    assert again.calls == 0
    assert_same_set(hit, calib)
    assert_same_set(hit.act_extra, extra)


def test_act_every_step_is_left_out_of_the_fingerprint_at_its_default():
    a = spec()
    assert "act_every_step" not in a.to_dict()
    assert a.data_fingerprint() != spec(act_every_step=True).data_fingerprint()
    with pytest.raises(ConfigError, match="act_every_step"):
        spec(protocol="gaussian", act_every_step=True)


def test_per_timestep_loop_feeds_one_timestep_at_a_time():
    n = 40
    calib = CalibrationSet(x=torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1),
                           t=torch.tensor([10, 20] * (n // 2)), eps_fp=torch.zeros(n, 1, 1, 1))
    seen: list[tuple[int, list[int]]] = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            assert t.unique().numel() == 1  # a batch never mixes timesteps
            seen.append((int(t[0]), x.flatten().long().tolist()))

    loop = per_timestep_loop(calib, init_rows=16, batch_size=16, seed=3)
    loop(Probe())
    for ts in (10, 20):
        batches = [rows for t, rows in seen if t == ts]
        # an init batch of 16 random rows, then every row once in batches of at most 16
        assert len(batches[0]) == 16 and len(set(batches[0])) == 16
        rest = sorted(r for b in batches[1:] for r in b)
        assert rest == sorted(calib.subset(calib.t == ts).x.flatten().long().tolist())
        assert max(len(b) for b in batches[1:]) == 16
    # timesteps ascending; the same seed gives the same batches
    assert [t for t, _ in seen][0] == 10
    again: list = []
    seen_copy = list(seen)
    seen.clear()
    per_timestep_loop(calib, init_rows=16, batch_size=16, seed=3)(Probe())
    again = list(seen)
    assert again == seen_copy
    # init_rows=0: every row exactly once (observers that pool what they see)
    seen.clear()
    per_timestep_loop(calib, init_rows=0, batch_size=16, seed=3)(Probe())
    assert sorted(r for _, rows in seen for r in rows) == list(range(n))


def test_act_every_step_with_srm_covers_the_steps_it_did_not_select(tiny_unet, sched):
    s = spec(protocol="srm", steps=6, interval=2, samples_per_step=2, srm_probe=2,
             act_every_step=True)
    calib = record(tiny_unet, sched, s)
    visited = sampling_timesteps(sched, 6)
    chosen = {visited[k] for k in calib.meta["srm_steps"]}
    assert set(calib.timesteps()) == chosen
    assert set(calib.act_extra.timesteps()) == set(visited) - chosen
    assert set(calib.activation_rows().timesteps()) == set(visited)
