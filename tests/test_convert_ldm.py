"""The CompVis LDM converter against an independent reference.

The reference is a small re-implementation of CompVis' ``openaimodel.UNetModel`` (ResBlock,
AttentionBlock with the legacy head-by-head qkv layout, Downsample, Upsample, sinusoidal
timestep embedding), written from that code with its module names, so its state dict has
the checkpoint's keys. The converted ``UNet2DModel`` must compute the same function. The VQ
autoencoder's keys are made by renaming a diffusers ``VQModel`` into taming's names; the
converted one must decode identically. Nothing is downloaded."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaq.cli import main
from gaq.errors import GaqError
from gaq.models.convert_ldm import (
    COND_PREFIX,
    UNET_PREFIX,
    VQ_PREFIX,
    convert_ldm,
    load_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------
# reference: openaimodel's UNet, small
# ----------------------------------------------------------------------------------------


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, emb: int, c_out: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_gn(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, c_out))
        self.out_layers = nn.Sequential(_gn(c_out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, emb, ctx=None):
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, c: int, head_channels: int) -> None:
        super().__init__()
        self.heads = c // head_channels
        self.norm = _gn(c)
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = nn.Conv1d(c, c, 1)

    def forward(self, x, emb=None, ctx=None):
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        # QKVAttentionLegacy: each head's q, k, v are consecutive blocks of channels
        ch = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * ch, -1).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        h = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, x.shape[-1])
        return (x + self.proj_out(h)).reshape(b, c, hh, ww)


class Down(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb=None, ctx=None):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb=None, ctx=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        b, h = x.shape[0], self.heads

        def split(t):  # b n (h d) -> (b h) n d
            return t.reshape(b, t.shape[1], h, -1).transpose(1, 2).reshape(b * h, t.shape[1], -1)

        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        attn = (q @ k.transpose(1, 2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        out = (attn @ v).reshape(b, h, x.shape[1], -1).transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ctx_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, heads, ctx_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, ctx):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), ctx) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, c: int, heads: int, ctx_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.proj_in = nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(c, heads, ctx_dim)])
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x, emb=None, ctx=None):
        b, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).reshape(b, c, -1).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, ctx)
        return self.proj_out(h.transpose(1, 2).reshape(b, c, hh, ww)) + x


class Seq(nn.ModuleList):
    def forward(self, x, emb, ctx=None):
        for layer in self:
            x = layer(x, emb, ctx) if not isinstance(layer, nn.Conv2d) else layer(x)
        return x


class RefUNet(nn.Module):
    """openaimodel.UNetModel: no scale-shift norm, conv resampling, legacy attention."""

    def __init__(self, p: dict) -> None:
        super().__init__()
        mc, mults, n = p["model_channels"], p["channel_mult"], p["num_res_blocks"]
        head, emb = p.get("num_head_channels", -1), 4 * p["model_channels"]
        self.mc = mc

        def attention(c: int) -> nn.Module:
            if p.get("use_spatial_transformer"):  # cin256-v2: num_heads heads of c // heads
                return SpatialTransformer(c, p["num_heads"], p["context_dim"])
            return AttentionBlock(c, head)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(p["in_channels"], mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        for level, m in enumerate(mults):
            for _ in range(n):
                layers = [ResBlock(ch, emb, m * mc)]
                ch = m * mc
                if ds in p["attention_resolutions"]:
                    layers.append(attention(ch))
                self.input_blocks.append(Seq(layers))
                chans.append(ch)
            if level != len(mults) - 1:
                self.input_blocks.append(Seq([Down(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Seq([ResBlock(ch, emb, ch), attention(ch), ResBlock(ch, emb, ch)])
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mults))[::-1]:
            for i in range(n + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mc * m)]
                ch = mc * m
                if ds in p["attention_resolutions"]:
                    layers.append(attention(ch))
                if level and i == n:
                    layers.append(Up(ch))
                    ds //= 2
                self.output_blocks.append(Seq(layers))
        self.out = nn.Sequential(_gn(ch), nn.SiLU(), nn.Conv2d(mc, p["out_channels"], 3, padding=1))

    def forward(self, x, t, ctx=None):
        half = self.mc // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, ctx)
            hs.append(h)
        h = self.middle_block(h, emb, ctx)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, ctx)
        return self.out(h)


UNET = {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
        "attention_resolutions": [2, 4], "num_res_blocks": 1, "channel_mult": [1, 2, 2],
        "num_head_channels": 16}
DD = {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3,
      "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
CONFIG = {"model": {"params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8,
    "unet_config": {"params": UNET},
    "first_stage_config": {"params": {"embed_dim": 3, "n_embed": 16, "ddconfig": DD}},
    "cond_stage_config": "__is_unconditional__"}}}


def _taming_names(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers VQModel state dict renamed to taming's Encoder/Decoder names."""
    out = {}
    for k, v in sd.items():
        new = k
        for a, b in (("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
                     ("mid_block.resnets.1", "mid.block_2"),
                     ("mid_block.attentions.0", "mid.attn_1"),
                     ("conv_shortcut", "nin_shortcut"), ("downsamplers.0", "downsample"),
                     ("upsamplers.0", "upsample"), (".resnets.", ".block.")):
            new = new.replace(a, b)
        if new.startswith("encoder.down_blocks."):
            new = new.replace("encoder.down_blocks.", "encoder.down.")
        if new.startswith("decoder.up_blocks."):
            i = int(new.split(".")[2])
            new = "decoder.up." + str(levels - 1 - i) + "." + ".".join(new.split(".")[3:])
        if ".mid.attn_1." in new:
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                         ("to_out.0", "proj_out")):
                new = new.replace(f".{a}.", f".{b}.")
            if v.dim() == 2:
                v = v[..., None, None]  # taming's attention uses 1x1 convolutions
        out[new] = v
    return out


@pytest.fixture(scope="module")
def ldm_checkpoint(tmp_path_factory):
    from diffusers import VQModel

    torch.manual_seed(0)
    ref = RefUNet(UNET).eval()
    for prm in ref.parameters():  # no zero-initialised output layers: every weight matters
        prm.data.normal_(0, 0.2)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64],
                 layers_per_block=1, latent_channels=3, num_vq_embeddings=16,
                 vq_embed_dim=3, norm_num_groups=32, sample_size=16).eval()
    state = {UNET_PREFIX + k: v for k, v in ref.state_dict().items()}
    state |= {VQ_PREFIX + k: v for k, v in _taming_names(vq.state_dict(), 2).items()}
    state["model_ema.decay"] = torch.tensor(0.9999)  # what a Lightning EMA checkpoint adds
    root = tmp_path_factory.mktemp("ldm")
    path = root / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    yaml_path = root / "config.yaml"
    yaml_path.write_text(json.dumps(CONFIG))  # JSON is YAML
    return root, path, yaml_path, ref, vq


def test_the_converted_unet_computes_the_compvis_function(ldm_checkpoint, tmp_path):
    from diffusers import UNet2DModel

    _, ckpt, config, ref, _ = ldm_checkpoint
    assert main(["convert-ldm", str(ckpt), "--config", str(config),
                 "--out", str(tmp_path / "ldm")]) == 0
    unet = UNet2DModel.from_pretrained(tmp_path / "ldm" / "unet").eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 996])
    with torch.no_grad():
        want, got = ref(x, t), unet(x, t).sample
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_converted_folder_loads_and_samples_like_the_compvis_sampler(ldm_checkpoint,
                                                                         tmp_path):
    from gaq.models.loading import load_model
    from gaq.sampling import sampling_timesteps

    _, ckpt, config, _, vq = ldm_checkpoint
    out = convert_ldm(ckpt, tmp_path / "ldm", config=config)
    pipe = load_model(str(out))
    assert type(pipe.autoencoder).__name__ == "VQModel"
    # CompVis DDIM, 200 of 1000 steps: timesteps 1, 6, ..., 996; scaled-linear betas
    assert sampling_timesteps(pipe.scheduler, 200)[:2] == [996, 991]
    assert sampling_timesteps(pipe.scheduler, 200)[-1] == 1
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(pipe.scheduler.betas.double(), betas, atol=1e-7, rtol=0)
    # the VQ decoder (codebook lookup included) equals the one the checkpoint was made from
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = vq.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(pipe.decode(z), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_the_cross_attention_unet_computes_the_compvis_function(ldm_checkpoint, tmp_path,
                                                                heads):
    """cin256-v2's UNet: spatial transformers (one head there) attending to the class
    embedding."""
    from diffusers import UNet2DConditionModel

    _, ckpt, _, _, _ = ldm_checkpoint
    p = {k: v for k, v in UNET.items() if k != "num_head_channels"}
    p |= {"num_heads": heads, "use_spatial_transformer": True, "transformer_depth": 1,
          "context_dim": 8}
    torch.manual_seed(1)
    ref = RefUNet(p).eval()
    for prm in ref.parameters():
        prm.data.normal_(0, 0.2)
    state = {k: v for k, v in load_checkpoint(ckpt).items() if not k.startswith(UNET_PREFIX)}
    state |= {UNET_PREFIX + k: v for k, v in ref.state_dict().items()}
    state[COND_PREFIX + "embedding.weight"] = torch.randn(11, 8)
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["params"]["unet_config"]["params"] = p
    cfg["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {"n_classes": 11}}
    (tmp_path / "cross.yaml").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "cross.safetensors"))
    out = convert_ldm(tmp_path / "cross.safetensors", tmp_path / "x",
                      config=tmp_path / "cross.yaml")
    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    assert unet.config.sample_size == 8
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([1, 700]), torch.randn(2, 1, 8)
    with torch.no_grad():
        want, got = ref(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_class_embedder_becomes_the_suites(ldm_checkpoint, tmp_path):
    """cin256-v2's ClassEmbedder (1,001 rows: the null class last) is carried over."""
    root, ckpt, _, _, _ = ldm_checkpoint
    state = load_checkpoint(ckpt)
    state[COND_PREFIX + "embedding.weight"] = torch.randn(11, 8)
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {"n_classes": 11}}
    (root / "cls.yaml").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file(state, str(root / "cls.safetensors"))
    out = convert_ldm(root / "cls.safetensors", tmp_path / "cls", config=root / "cls.yaml")
    index = json.loads((out / "model_index.json").read_text())
    assert index["gaq_conditioning"] == {"kind": "class", "num_classes": 10, "null_class": 10}
    from gaq.models.conditioning import ClassEmbedder

    emb = ClassEmbedder.from_pretrained(out / "class_embedder")
    torch.testing.assert_close(emb(torch.tensor([3, 10]))[:, 0],
                               state[COND_PREFIX + "embedding.weight"][[3, 10]])


def test_ema_takes_the_ema_weights(ldm_checkpoint, tmp_path):
    """LitEma stores each UNet parameter as ``model_ema.<name without dots>``."""
    from diffusers import UNet2DModel
    from safetensors.torch import save_file

    root, ckpt, config, _, _ = ldm_checkpoint
    state = load_checkpoint(ckpt)
    for key in [k for k in state if k.startswith(UNET_PREFIX)]:
        name = "diffusion_model." + key[len(UNET_PREFIX):]
        state["model_ema." + name.replace(".", "")] = state[key] + 1.0
    save_file(state, str(tmp_path / "ema.safetensors"))
    out = convert_ldm(tmp_path / "ema.safetensors", tmp_path / "ema", config=config, ema=True)
    unet = UNet2DModel.from_pretrained(out / "unet")
    torch.testing.assert_close(unet.conv_in.weight.data,
                               state[UNET_PREFIX + "input_blocks.0.0.weight"] + 1.0)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("pickle", "weights_only=True"),
    ("not_ldm", "not a CompVis latent-diffusion checkpoint"),
    ("exists", "exists and is not empty"),
    ("wrong_config", "does not match its config"),
])
def test_bad_input_is_one_line_and_writes_nothing(ldm_checkpoint, tmp_path, capsys, case,
                                                  message):
    root, ckpt, config, _, _ = ldm_checkpoint
    out = tmp_path / "out"
    if case == "missing":
        ckpt = root / "nope.ckpt"
    elif case == "pickle":
        ckpt = tmp_path / "evil.ckpt"
        torch.save({"state_dict": {}, "obj": GaqError("x")}, ckpt)
    elif case == "not_ldm":
        ckpt = tmp_path / "other.ckpt"
        torch.save({"weight": torch.zeros(2)}, ckpt)
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "wrong_config":
        cfg = json.loads(json.dumps(CONFIG))
        cfg["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
        config = tmp_path / "bad.yaml"
        config.write_text(json.dumps(cfg))
    assert main(["convert-ldm", str(ckpt), "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]
