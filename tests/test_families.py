"""Every model family through one pipeline: tiny randomly initialised pipelines of each
class, saved as local diffusers folders (nothing downloaded), loaded by ``gaq``, sampled
(decoded to pixels), calibrated (both guidance halves) and benchmarked with RTN and a
reconstruction method through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from gaq.calibration import CalibrationSpec, record_calibration
from gaq.cli import main
from gaq.errors import GaqError
from gaq.models.adapters import denoise
from gaq.models.loading import load_model
from gaq.sampling import SamplerConfig, sample

pytestmark = pytest.mark.usefixtures("one_thread")

VAE = {"in_channels": 1, "out_channels": 1, "latent_channels": 4, "layers_per_block": 1,
       "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
       "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
       "block_out_channels": (8, 16), "norm_num_groups": 4, "sample_size": 16}
LATENT_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
               "block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 8,
               "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
               "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}
COND_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 4,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 12}
CLASS_UNET = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 8,
              "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
              "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "num_class_embeds": 11}
DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
       "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}
LDM_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1}
CLASS_NULL = {"gaq_conditioning": {"kind": "class", "num_classes": 10, "null_class": 10}}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _tokenizer(folder: Path):
    """A CLIP tokenizer over single letters (no merges), built from files written here."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[f"{ch}</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=8), len(vocab)


def _save(path: Path, parts: dict, extra: dict | None = None) -> Path:
    import diffusers

    from gaq.models.conditioning import ClassEmbedder

    index = {"_class_name": "TinyPipeline", "_diffusers_version": diffusers.__version__}
    for key, obj in parts.items():
        module = type(obj).__module__
        lib = ("gaq" if isinstance(obj, ClassEmbedder)
               else "transformers" if module.startswith("transformers") else "diffusers")
        obj.save_pretrained(path / key)
        index[key] = [lib, type(obj).__name__]
    (path / "model_index.json").write_text(json.dumps(index | (extra or {})))
    return path


def build(kind: str, root: Path) -> Path:
    """A tiny pipeline folder of family ``kind``."""
    import diffusers

    from gaq.models.conditioning import ClassEmbedder

    torch.manual_seed(0)
    sched = diffusers.DDIMScheduler(**LDM_SCHEDULER)
    path = root / kind
    if kind == "vq-ldm":  # LDMPipeline: VQModel + unconditional UNet on latents
        vq = diffusers.VQModel(**{**VAE, "num_vq_embeddings": 16, "vq_embed_dim": 4})
        return _save(path, {"vqvae": vq, "unet": diffusers.UNet2DModel(**LATENT_UNET),
                            "scheduler": sched})
    if kind == "kl-class-ldm":  # the SD structure, classes for prompts
        return _save(path, {"vae": diffusers.AutoencoderKL(**VAE),
                            "unet": diffusers.UNet2DConditionModel(**COND_UNET),
                            "class_embedder": ClassEmbedder(10, 12, tokens=3),
                            "scheduler": sched}, CLASS_NULL)
    if kind == "class-unet":  # pixel space, class embedding with a declared null class
        return _save(path, {"unet": diffusers.UNet2DModel(**CLASS_UNET),
                            "scheduler": diffusers.DDPMScheduler(
                                num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")},
                     CLASS_NULL)
    if kind == "dit":
        return _save(path, {"vae": diffusers.AutoencoderKL(**VAE),
                            "transformer": diffusers.DiTTransformer2DModel(**DIT),
                            "scheduler": sched})
    if kind == "sd":  # a tiny Stable Diffusion: CLIP text encoder built from a config
        from transformers import CLIPTextConfig, CLIPTextModel

        tok, vocab = _tokenizer(root / "tok-src")
        enc = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=12,
                                           intermediate_size=24, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=8,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
        return _save(path, {"vae": diffusers.AutoencoderKL(**VAE),
                            "unet": diffusers.UNet2DConditionModel(**COND_UNET),
                            "text_encoder": enc, "tokenizer": tok, "scheduler": sched})
    if kind == "pixart":  # PixArt-like: a text-conditional DiT, T5 text encoder
        from transformers import T5Config, T5EncoderModel

        tok, vocab = _tokenizer(root / "tok-src-pixart")
        enc = T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32,
                                      num_layers=1, num_heads=2, pad_token_id=1,
                                      eos_token_id=1))
        return _save(path, {"vae": diffusers.AutoencoderKL(**VAE),
                            "transformer": diffusers.PixArtTransformer2DModel(**PIXART),
                            "text_encoder": enc, "tokenizer": tok, "scheduler": sched})
    raise ValueError(kind)


PIXART = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
          "out_channels": 8, "num_layers": 2, "cross_attention_dim": 16, "caption_channels": 16,
          "sample_size": 8, "patch_size": 2, "norm_num_groups": 4}
FAMILIES = ["vq-ldm", "kl-class-ldm", "class-unet", "dit", "sd", "pixart"]
CONDITIONAL = ["kl-class-ldm", "class-unet", "dit", "sd", "pixart"]
TEXT = ("sd", "pixart")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    out = {k: build(k, root) for k in FAMILIES}
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\nthe dog\n\nsome bird\n")
    out["prompts"] = prompts
    return out


def _load(folders, kind):
    prompts = ["a cat", "the dog"] if kind in TEXT else None
    return load_model(str(folders[kind]), prompts=prompts)


@pytest.mark.parametrize("kind", FAMILIES)
def test_loads_as_a_pipeline_and_samples_decoded_pixels(folders, kind):
    pipe = _load(folders, kind)
    assert pipe.latent == (kind != "class-unet")
    expected = {"vq-ldm": "none", "kl-class-ldm": "class", "class-unet": "class",
                "dit": "class", "sd": "text", "pixart": "text"}[kind]
    assert pipe.conditioning.kind == expected
    images = sample(pipe, 3, seed=0, sampler=SamplerConfig(steps=3), batch_size=2)
    # decoded through the autoencoder: 16x16 single-channel pixels, not 8x8x4 latents
    assert images.shape == (3, 1, 16, 16)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize("kind", CONDITIONAL)
def test_guidance_changes_samples_and_calibration_holds_both_halves(folders, kind, tmp_path):
    pipe = _load(folders, kind)
    plain = sample(pipe, 2, seed=0, sampler=SamplerConfig(steps=3))
    guided = sample(pipe, 2, seed=0, sampler=SamplerConfig(steps=3, guidance=3.0))
    assert not torch.equal(plain, guided)
    spec = CalibrationSpec(steps=4, interval=2, samples_per_step=3, guidance=3.0)
    calib = record_calibration(pipe, spec, cache_dir=tmp_path)
    unguided = record_calibration(pipe, CalibrationSpec(steps=4, interval=2, samples_per_step=3),
                                  cache_dir=tmp_path)
    assert len(calib) == 2 * len(unguided)  # unconditional + conditional row per step
    key = next(iter(calib.cond))
    null = pipe.conditioning.null_inputs(1, "cpu")[key]
    is_null = [torch.equal(row, null[0].to(row.dtype)) for row in calib.cond[key]]
    assert sum(is_null) == len(calib) // 2
    # the rows are the denoiser calls as made: the FP output at each recorded input
    with torch.no_grad():  # called as the adapter calls it (PixArt: the timestep by name)
        out = denoise(pipe.denoiser, calib.x[:4], calib.t[:4],
                      {k: v[:4] for k, v in calib.cond.items()}).sample
    torch.testing.assert_close(calib.eps_fp[:4], out[:, :4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["plms", "dpm-solver++"])
def test_other_samplers_keep_per_image_seeding(folders, name):
    pipe = _load(folders, "kl-class-ldm")
    cfg = SamplerConfig(steps=4, name=name, guidance=2.0)
    ref = sample(pipe, 5, seed=1, sampler=cfg, batch_size=5)
    assert torch.allclose(sample(pipe, 5, seed=1, sampler=cfg, batch_size=2), ref, atol=1e-5)
    assert not torch.allclose(sample(pipe, 5, seed=1, sampler=SamplerConfig(steps=4)), ref)


def test_flow_matching_is_refused_with_one_line(folders, tmp_path):
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    path = tmp_path / "flow"
    shutil.copytree(folders["dit"], path)
    shutil.rmtree(path / "scheduler")
    FlowMatchEulerDiscreteScheduler().save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(GaqError, match="flow matching"):
        load_model(str(path))


def test_guidance_on_an_unconditional_model_fails_before_work(folders, capsys):
    rc = main(["sample", "--model", str(folders["vq-ldm"]), "--guidance", "3", "--num", "1"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--guidance" in err[0]


def test_text_model_without_prompts_says_how_to_give_them(folders):
    pipe = load_model(str(folders["sd"]))
    with pytest.raises(GaqError, match="prompts"):
        sample(pipe, 1, seed=0, sampler=SamplerConfig(steps=2))


BENCH = """
models = ["{model}"]
bits = ["W8A8"]
methods = [
  {{ name = "fp" }},
  {{ name = "rtn" }},
  {{ name = "brecq", config = {{ recon = {{ weight_iters = 2, act_iters = 2 }} }} }},
]

[benchmark]
name = "fam-{kind}"

[sampler]
name = "{sampler}"
steps = 4
{extra}

[calibration]
interval = 2
samples_per_step = 4

[eval]
num_images = 4
batch_size = 4
seeds = [0]
metrics = ["psnr", "eps_mse"]
heldout_trajectories = 2
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
def test_bench_runs_every_family(folders, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    extra = "" if kind == "vq-ldm" else "guidance = 3.0"
    if kind in TEXT:
        extra += f'\nprompts = "{folders["prompts"]}"'
    sampler = "plms" if kind in ("sd", "kl-class-ldm") else "ddim"
    bench = tmp_path / "b.toml"
    bench.write_text(BENCH.format(model=folders[kind], kind=kind, sampler=sampler, extra=extra))
    assert main(["bench", str(bench), "--results", str(tmp_path / "results")]) == 0
    df = pd.read_parquet(tmp_path / "results" / f"fam-{kind}" / "metrics.parquet")
    assert set(df["method"]) == {"fp", "rtn", "brecq"}
    for method in ("rtn", "brecq"):
        got = df[df["method"] == method].set_index("metric")["value"]
        assert 0 < got["psnr"] < 100 and got["eps_mse"] > 0
    # the sample grid holds decoded pixels: 2x2 images of 16 px, upscaled x2, 1 px padding
    from PIL import Image

    grid = next((tmp_path / "results" / f"fam-{kind}" / "grids").glob("*brecq*.png"))
    assert Image.open(grid).size == (2 * 33 + 1, 2 * 33 + 1)


def test_ptqd_statistics_and_noise_curves_use_the_guided_prediction(folders, tmp_path):
    """PTQD (as in the authors' code) fits on the guided eps the sampler corrects; the noise
    curves compare guided predictions too. Checked against a direct computation."""
    from baselines.ptqd.method import noise_stats
    from gaq.eval.eps import noise_curves

    pipe = _load(folders, "dit")
    g = 3.0
    calib = record_calibration(pipe, CalibrationSpec(steps=4, interval=2, samples_per_step=3,
                                                     guidance=g), cache_dir=tmp_path)
    torch.manual_seed(0)
    noisy = load_model(str(folders["dit"])).denoiser
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    stats = noise_stats(noisy, calib, batch_size=3)  # odd: halves must stay paired
    curves = noise_curves(noisy, calib, batch_size=3)
    for s in stats:
        rows = calib.subset(calib.t == s.t)
        with torch.no_grad():
            q = noisy(rows.x, timestep=rows.t, class_labels=rows.cond["class_labels"]).sample
        q, fp = q[:, :4], rows.eps_fp[:, :4]
        guided_q = q[0::2] + g * (q[1::2] - q[0::2])
        guided_fp = fp[0::2] + g * (fp[1::2] - fp[0::2])
        err = (guided_q - guided_fp).double()
        mu = err.mean(dim=(0, 2, 3))
        assert torch.allclose(torch.tensor(s.mu, dtype=torch.float64), mu, atol=1e-5)
        expected = float(err.pow(2).flatten(1).mean(1).mean())
        assert curves["eps_mse"][s.t] == pytest.approx(expected, rel=1e-4)


TINY_OVERRIDES = {"recon": {"weight_iters": 2, "act_iters": 2, "cache": "memory"},
                  "meta": {"iters": 1, "batch_size": 4, "diagnostic_rows": 8},
                  "iters": 1}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kl-class-ldm", "dit", "pixart"])
def test_every_registered_method_quantizes_a_guided_latent_family(folders, kind, tmp_path):
    """Every registered method (tiny budgets) on a guided latent pipeline: calibration with
    both halves, quantization, and sampling with the method's hook, decoded to pixels."""
    from gaq.bench.spec import _merge
    from gaq.config import QuantConfig
    from gaq.models.adapters import adapter_for
    from gaq.registry import get_method, list_methods

    pipe = _load(folders, kind)
    sampler = SamplerConfig(steps=4, guidance=3.0)
    spec = CalibrationSpec(steps=4, interval=2, samples_per_step=4, guidance=3.0,
                           holdout_per_step=1)
    calib = record_calibration(pipe, spec, cache_dir=tmp_path)
    adapter = adapter_for(pipe.denoiser)
    for name in list_methods():
        cls = get_method(name)
        base = cls.from_preset("cpu").config
        doc = base.to_dict()
        over = {k: v for k, v in TINY_OVERRIDES.items() if k in doc}
        method = cls(type(base).from_dict(_merge(doc, over)))
        result = method.quantize(pipe.denoiser, adapter, calib, QuantConfig.from_bits("W4A8"))
        images = sample(pipe, 2, seed=0, sampler=sampler, hook=result.sampler_hook,
                        denoiser=result.model)
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all(), name


def test_prediction_type_is_the_models_own(folders):
    """The samplers are built from the model's scheduler config, so a v-prediction model
    is sampled as one; PTQD, whose noise model needs an epsilon prediction, refuses it."""
    import dataclasses

    from diffusers import DDIMScheduler

    from baselines.ptqd.hook import PTQDSamplerHook, StepStats, sampler_key

    pipe = _load(folders, "dit")
    cfg = SamplerConfig(steps=3)
    eps = sample(pipe, 2, seed=0, sampler=cfg)
    v_sched = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    v_pipe = dataclasses.replace(pipe, scheduler=v_sched)
    v = sample(v_pipe, 2, seed=0, sampler=cfg)
    assert torch.isfinite(v).all() and not torch.equal(eps, v)
    hook = PTQDSamplerHook([StepStats(t, 0.0, (0.0,) * 4, 0.1, 1) for t in (0, 500)],
                           sampler_key(3, 0.0))
    with pytest.raises(GaqError, match="epsilon"):
        sample(v_pipe, 1, seed=0, sampler=cfg, hook=hook)
