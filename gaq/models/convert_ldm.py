"""Convert a CompVis latent-diffusion checkpoint (LDM-4 LSUN-Bedroom, cin256-v2) into a
diffusers pipeline folder the suite loads.

The CompVis checkpoints hold one state dict: the denoiser under ``model.diffusion_model.``
(``openaimodel.UNetModel``), the VQ autoencoder under ``first_stage_model.`` (taming's
Encoder/Decoder and a codebook) and, for cin256-v2, the class embedder under
``cond_stage_model.``. diffusers' library code converts Stable Diffusion's parts (a UNet
with spatial transformers, KL autoencoders); what it lacks for these checkpoints, and what
this module adds, is:

- the UNet of an *unconditional* LDM, whose attention is openaimodel's ``AttentionBlock``:
  one ``qkv`` 1×1 convolution whose output channels are laid out head by head as
  ``[q_h, k_h, v_h]`` (the "legacy" order), split here into diffusers' ``to_q/to_k/to_v``;
- the VQ autoencoder: its encoder and decoder are converted by diffusers' own KL mapping
  (the same taming modules), plus the codebook, into a ``VQModel`` with
  ``scaling_factor = 1`` (LDM-4 feeds the UNet unscaled VQ latents);
- the class embedder (1,001 rows: 1,000 classes and the null class of classifier-free
  guidance) as the suite's :class:`~gaq.models.conditioning.ClassEmbedder`;
- the noise schedule and DDIM discretisation of the CompVis sampler: ``linear`` betas in
  LDM are linear in √β (diffusers' ``scaled_linear``), timesteps ``1, 1 + c, …`` (offset
  1) and the last step's previous ᾱ is ᾱ₀ (``set_alpha_to_one = False``).

Every parameter of the diffusers modules must be filled with a tensor of its shape (strict
loading), and every tensor of an unconditional UNet must be used; a failure is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gaq.errors import GaqError

__all__ = ["PRESETS", "convert_ldm", "load_checkpoint", "uncond_unet_config",
           "convert_uncond_unet"]

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VQ_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."

_VQ_F4 = {"embed_dim": 3, "n_embed": 8192,
          "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3,
                       "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                       "attn_resolutions": [], "dropout": 0.0}}

#: The ``model.params`` of the CompVis configs (``configs/latent-diffusion/*.yaml`` in
#: CompVis/latent-diffusion) the paper protocols use; ``--config`` reads any other.
PRESETS: dict[str, dict[str, Any]] = {
    "lsun-bedroom": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64,
        "channels": 3,
        "unet_config": {"params": {
            "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 4], "num_head_channels": 32}},
        "first_stage_config": {"params": _VQ_F4},
        "cond_stage_config": "__is_unconditional__",
    },
    "cin256-v2": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64,
        "channels": 3, "conditioning_key": "crossattn",
        "unet_config": {"params": {
            "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 5], "num_heads": 1, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 512}},
        "first_stage_config": {"params": _VQ_F4},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 1001, "embed_dim": 512}},
    },
}


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a CompVis checkpoint: ``.safetensors``, or a ``.ckpt``/``.pt``
    read with ``torch.load(weights_only=True)`` (never unpickling arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise GaqError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise GaqError(f"checkpoint {path} is not a readable safetensors file ({e})") \
                from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GaqError(f"checkpoint {path} cannot be read with torch.load(weights_only=True) "
                       f"({first}); save its 'state_dict' as .safetensors in an environment "
                       "you trust and convert that") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise GaqError(f"checkpoint {path} holds no state dict of tensors")
    return state


def _part(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _ema_unet(state: dict[str, Tensor], unet: dict[str, Tensor]) -> dict[str, Tensor]:
    """The EMA copy of the UNet weights (LitEma stores ``model_ema.<name without dots>``)."""
    ema = {}
    for key in unet:
        flat = EMA_PREFIX + ("diffusion_model." + key).replace(".", "")
        if flat not in state:
            raise GaqError(f"--ema: the checkpoint has no EMA weights ({flat} is missing)")
        ema[key] = state[flat]
    return ema


# --------------------------------------------------------------------------------------
# The unconditional UNet (openaimodel with AttentionBlock) -> UNet2DModel
# --------------------------------------------------------------------------------------


def uncond_unet_config(p: dict[str, Any]) -> dict[str, Any]:
    """``UNet2DModel`` config of an openaimodel ``UNetModel`` without spatial transformers:
    attention at the downsampling factors ``attention_resolutions``, ``num_head_channels``
    channels per head (or ``num_heads`` heads)."""
    unsupported = [k for k in ("use_scale_shift_norm", "resblock_updown", "num_classes",
                               "use_new_attention_order", "use_spatial_transformer")
                   if p.get(k)]
    if unsupported or p.get("conv_resample") is False or p.get("dims", 2) != 2:
        raise GaqError(f"UNet options {unsupported or ['conv_resample/dims']} are not "
                       "supported by the converter")
    mults, ch = list(p["channel_mult"]), int(p["model_channels"])
    attn = [2 ** level in set(p["attention_resolutions"]) for level in range(len(mults))]
    head_ch = int(p.get("num_head_channels", -1))
    if head_ch == -1:  # a fixed number of heads: diffusers needs one head size for all
        heads = int(p["num_heads"])
        sizes = {ch * m // heads for m, a in zip(mults, attn, strict=True) if a}
        if len(sizes) > 1:
            raise GaqError("num_heads with attention at several widths is not supported")
        head_ch = sizes.pop() if sizes else ch
    return {
        "sample_size": int(p["image_size"]), "in_channels": int(p["in_channels"]),
        "out_channels": int(p["out_channels"]),
        "block_out_channels": [ch * m for m in mults],
        "layers_per_block": int(p["num_res_blocks"]),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "attention_head_dim": head_ch, "norm_num_groups": 32, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default", "add_attention": True,
        "downsample_padding": 1, "act_fn": "silu",
    }


_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _resnet(src: dict[str, Tensor], old: str, new: str, out: dict[str, Tensor]) -> None:
    for a, b in _RESNET.items():
        for kind in ("weight", "bias"):
            key = f"{old}.{a}.{kind}"
            if key in src:
                out[f"{new}.{b}.{kind}"] = src[key]


def _attention(src: dict[str, Tensor], old: str, new: str, head_ch: int,
               out: dict[str, Tensor]) -> None:
    """openaimodel ``AttentionBlock`` -> diffusers ``Attention``: the fused ``qkv`` weight
    [3C, C, 1] holds, head after head, that head's q, k and v rows (QKVAttentionLegacy)."""
    w, b = src[f"{old}.qkv.weight"][..., 0], src[f"{old}.qkv.bias"]
    c = w.shape[1]
    heads = c // head_ch
    w, b = w.reshape(heads, 3, head_ch, c), b.reshape(heads, 3, head_ch)
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{new}.{name}.weight"] = w[:, j].reshape(c, c).clone()
        out[f"{new}.{name}.bias"] = b[:, j].reshape(c).clone()
    out[f"{new}.to_out.0.weight"] = src[f"{old}.proj_out.weight"][..., 0].clone()
    out[f"{new}.to_out.0.bias"] = src[f"{old}.proj_out.bias"]
    out[f"{new}.group_norm.weight"] = src[f"{old}.norm.weight"]
    out[f"{new}.group_norm.bias"] = src[f"{old}.norm.bias"]


class _Used(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Tensor:
        self.read.add(key)
        return super().__getitem__(key)


def convert_uncond_unet(src: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """The ``UNet2DModel`` state dict of an openaimodel state dict (no prefix)."""
    src = _Used(src)
    out = _convert_uncond(src, config)
    unused = sorted(set(src) - src.read)
    if unused:
        raise GaqError(f"the UNet: {len(unused)} checkpoint tensors have no place in its config "
                       f"(e.g. {unused[0]}); check --preset or --config")
    return out


def _convert_uncond(src: _Used, config: dict[str, Any]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for a, b in (("time_embed.0", "time_embedding.linear_1"),
                 ("time_embed.2", "time_embedding.linear_2"),
                 ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"),
                 ("out.2", "conv_out")):
        out[f"{b}.weight"], out[f"{b}.bias"] = src[f"{a}.weight"], src[f"{a}.bias"]
    n, levels, head = config["layers_per_block"], len(config["block_out_channels"]), \
        config["attention_head_dim"]
    i = 1
    for level in range(levels):
        for j in range(n):
            _resnet(src, f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", out)
            if f"input_blocks.{i}.1.qkv.weight" in src:
                _attention(src, f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}",
                           head, out)
            i += 1
        if level != levels - 1:
            for kind in ("weight", "bias"):
                out[f"down_blocks.{level}.downsamplers.0.conv.{kind}"] = \
                    src[f"input_blocks.{i}.0.op.{kind}"]
            i += 1
    _resnet(src, "middle_block.0", "mid_block.resnets.0", out)
    _attention(src, "middle_block.1", "mid_block.attentions.0", head, out)
    _resnet(src, "middle_block.2", "mid_block.resnets.1", out)
    i = 0
    for up in range(levels):
        for j in range(n + 1):
            _resnet(src, f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}", out)
            nxt = 1
            if f"output_blocks.{i}.1.qkv.weight" in src:
                _attention(src, f"output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}",
                           head, out)
                nxt = 2
            if f"output_blocks.{i}.{nxt}.conv.weight" in src:
                for kind in ("weight", "bias"):
                    out[f"up_blocks.{up}.upsamplers.0.conv.{kind}"] = \
                        src[f"output_blocks.{i}.{nxt}.conv.{kind}"]
            i += 1
    return out


# --------------------------------------------------------------------------------------
# The other parts, through diffusers' own mappings
# --------------------------------------------------------------------------------------


def _vq(state: dict[str, Tensor], params: dict[str, Any]):
    from diffusers import VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    p = params["first_stage_config"]["params"]
    dd = p["ddconfig"]
    channels = [dd["ch"] * m for m in dd["ch_mult"]]
    config = {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"],
              "down_block_types": ["DownEncoderBlock2D"] * len(channels),
              "up_block_types": ["UpDecoderBlock2D"] * len(channels),
              "block_out_channels": channels, "layers_per_block": dd["num_res_blocks"],
              "latent_channels": dd["z_channels"], "sample_size": dd["resolution"],
              "num_vq_embeddings": p["n_embed"], "vq_embed_dim": p["embed_dim"],
              "norm_num_groups": 32, "scaling_factor": float(params.get("scale_factor", 1.0))}
    if dd.get("attn_resolutions"):
        raise GaqError("VQ autoencoders with attention in their down/up blocks are not "
                       "supported by the converter")
    src = {VQ_PREFIX + k: v for k, v in _part(state, VQ_PREFIX).items()}
    sd = convert_ldm_vae_checkpoint(src, config)
    sd["quantize.embedding.weight"] = state[VQ_PREFIX + "quantize.embedding.weight"]
    model = VQModel(**config)
    _load_strict(model, sd, "the VQ autoencoder")
    return model


def _cross_attention_unet(state: dict[str, Tensor], params: dict[str, Any], ema: bool):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    original = {"model": {"params": params}}
    config = create_unet_diffusers_config_from_ldm(original, state)
    config["sample_size"] = int(params["unet_config"]["params"]["image_size"])  # the latents'
    sd = convert_ldm_unet_checkpoint(state, config, extract_ema=ema)
    model = UNet2DConditionModel(**config)
    _load_strict(model, sd, "the UNet")
    return model


def _load_strict(model: torch.nn.Module, sd: dict[str, Tensor], what: str) -> None:
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes that do not fit
        line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "")
        raise GaqError(f"{what}: the checkpoint does not match its config ({line}); check "
                       "--preset or --config") from None
    if result.missing_keys or result.unexpected_keys:
        raise GaqError(f"{what}: the checkpoint does not match its config (missing "
                       f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
                       "check --preset or --config")


def _scheduler(params: dict[str, Any]):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=int(params.get("timesteps", 1000)),
                         beta_start=float(params.get("linear_start", 0.0015)),
                         beta_end=float(params.get("linear_end", 0.0195)),
                         beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading", prediction_type="epsilon")


def convert_ldm(checkpoint: str | Path, out_dir: str | Path, preset: str | None = None,
                config: str | Path | None = None, ema: bool = False) -> Path:
    """Convert ``checkpoint`` (a CompVis LDM with a VQ autoencoder) into a pipeline folder
    at ``out_dir``: ``unet``, ``vqvae``, ``scheduler`` and, for a class-conditional model,
    ``class_embedder``. ``preset`` names one of :data:`PRESETS`; ``config`` is the
    original YAML instead. ``ema`` takes the EMA weights of the UNet. An existing
    ``out_dir`` is never overwritten."""
    from gaq.models.conditioning import ClassEmbedder
    from gaq.outputs import check_output_folder, output_folder

    out = check_output_folder(out_dir, "--out", what="pipeline folder")
    params = _params(preset, config)
    state = load_checkpoint(checkpoint)
    unet_src = _part(state, UNET_PREFIX)
    if not unet_src:
        raise GaqError(f"checkpoint {checkpoint} has no '{UNET_PREFIX}*' tensors: not a "
                       "CompVis latent-diffusion checkpoint")
    try:
        unet, vqvae = _convert_parts(state, unet_src, params, ema)
    except KeyError as e:
        raise GaqError(f"checkpoint {checkpoint} has no tensor {e.args[0]!r} that its config "
                       "needs: check --preset or --config") from None
    cond = params.get("cond_stage_config")
    embedder = None
    if isinstance(cond, dict):
        if not str(cond.get("target", "")).endswith("ClassEmbedder"):
            raise GaqError(f"conditioning {cond.get('target')} is not supported (class "
                           "embedders only)")
        weight = state.get(COND_PREFIX + "embedding.weight")
        if weight is None:
            raise GaqError(f"checkpoint {checkpoint} has no {COND_PREFIX}embedding.weight "
                           "for its class embedder")
        embedder = ClassEmbedder(num_classes=weight.shape[0] - 1, dim=weight.shape[1],
                                 tokens=1)
        embedder.embedding.weight.data.copy_(weight)
    # written into a temporary sibling, then renamed: a failure leaves no half folder
    with output_folder(out, "--out", what="pipeline folder") as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vqvae.save_pretrained(tmp / "vqvae", safe_serialization=True)
        _scheduler(params).save_pretrained(tmp / "scheduler")
        index: dict[str, Any] = {"_class_name": "LDMPipeline", "_diffusers_version": _version(),
                                 "unet": ["diffusers", type(unet).__name__],
                                 "vqvae": ["diffusers", "VQModel"],
                                 "scheduler": ["diffusers", "DDIMScheduler"]}
        if embedder is not None:
            embedder.save_pretrained(tmp / "class_embedder")
            index["_class_name"] = "GaqLatentPipeline"
            index["class_embedder"] = ["gaq", "ClassEmbedder"]
            index["gaq_conditioning"] = {"kind": "class", "num_classes": embedder.num_classes,
                                         "null_class": embedder.null_class}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _convert_parts(state: dict[str, Tensor], unet_src: dict[str, Tensor],
                   params: dict[str, Any], ema: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    up = params["unet_config"]["params"]
    if up.get("use_spatial_transformer"):
        unet = _cross_attention_unet(state, params, ema)
    else:
        from diffusers import UNet2DModel

        cfg = uncond_unet_config(up)
        unet = UNet2DModel(**cfg)
        _load_strict(unet, convert_uncond_unet(_ema_unet(state, unet_src) if ema
                                               else unet_src, cfg), "the UNet")
    return unet, _vq(state, params)


def _params(preset: str | None, config: str | Path | None) -> dict[str, Any]:
    if (preset is None) == (config is None):
        raise GaqError("give exactly one of --preset (" + ", ".join(PRESETS) + ") or --config")
    if preset is not None:
        if preset not in PRESETS:
            raise GaqError(f"--preset {preset!r} is unknown; choose one of "
                           + ", ".join(PRESETS))
        return PRESETS[preset]
    import yaml

    path = Path(config)
    try:
        doc = yaml.safe_load(path.read_text())
        return doc["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise GaqError(f"--config {path}: not a CompVis model config with model.params "
                       f"({type(e).__name__})") from None


def _version() -> str:
    import diffusers

    return diffusers.__version__
