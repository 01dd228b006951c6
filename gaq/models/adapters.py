"""Model adapters: what to reconstruct, in which order, and what the model keeps at
higher precision.

The skip policy lives here, with the architecture, not in the methods: a method can
add rules (``Method.extra_skip``) but never remove the model's. Block order is traced
from one real forward pass, so it is the order in which the network computes, whatever
the nesting of its modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gaq.errors import GaqError
from gaq.registry import Registry

QUANTIZABLE = (nn.Conv2d, nn.Linear)
# Layer types that a quantizer would have to handle but this suite does not: finding one
# outside the skip policy means the quantization would be partial, so it is refused.
UNSUPPORTED_LAYERS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)


@dataclass(frozen=True)
class Block:
    """One unit of block reconstruction: a module whose output is matched to the FP one."""

    name: str
    kind: str  # "temporal" | "resnet" | "attention" | "transformer" | "layer"


@dataclass(frozen=True)
class SkipRule:
    """A layer kept out of low-bit quantization: ``precision`` is "fp" or "w8a8"."""

    precision: str
    reason: str


# A skip filter, after torchao: (module, fully qualified name) -> rule or None.
SkipFilter = Callable[[nn.Module, str], "SkipRule | None"]

#: The architectural roles an adapter names (``ModelAdapter.role``), so that methods state
#: their layer rules once for every family instead of matching module names:
ROLES = {
    "input": "first layer (conv_in, DiT patch embedding)",
    "output": "last layer (conv_out, DiT output projection)",
    "time_embed_in": "first linear of the timestep MLP",
    "time_embed": "other linears of the timestep MLP",
    "time_proj": "per-block projection of the time embedding (ResNet time_emb_proj, "
                 "DiT adaLN modulation)",
    "class_embed": "class-embedding layers of the denoiser",
    "cross_kv": "cross-attention key/value projections of the text or class context",
    "shortcut": "1x1 skip-connection convs of residual blocks",
    "downsample": "downsampling convs",
}


class ModelAdapter:
    """Base adapter: subclasses declare block types, temporal modules and the skip policy."""

    arch: str = ""
    block_types: dict[str, str] = {}  # class name -> block kind

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- the call ----------------------------------------------------------------------
    @staticmethod
    def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> object:
        """One call of ``model`` (this architecture, FP or quantized) on inputs ``x``,
        per-sample timesteps ``t`` (B,) and conditioning ``cond`` (the pipeline's keyword
        inputs), returning what the model returns. Every caller that runs a denoiser
        (sampling, calibration, evaluation, reconstruction, PTQD) goes through
        :func:`denoise`, so an architecture whose arguments are not ``(x, t, **cond)``
        changes this method only. The UNets and DiT take the timestep second."""
        return model(x, t, **cond)

    # -- architecture facts ------------------------------------------------------------
    def role(self, name: str) -> str | None:
        """The role (a key of :data:`ROLES`) of the layer ``name``; None for the rest."""
        return None

    # -- skip policy -----------------------------------------------------------------
    def skip(self, module: nn.Module, name: str) -> SkipRule | None:
        """The model's own policy: layers this architecture needs kept out of low-bit
        quantization (none in the bundled families). The precision of the first and last
        layer is the run's choice (:attr:`gaq.config.QuantConfig.first_last`), not the
        model's: the methods' authors differ on it."""
        return None

    def first_last_rule(self, name: str, first_last: str) -> SkipRule | None:
        """The rule ``first_last`` (a :data:`gaq.config.FIRST_LAST` value) gives the layer
        ``name`` if it is this model's first or last layer."""
        role = self.role(name)
        if role not in ("input", "output") or first_last == "quantized":
            return None
        what = ROLES[role].split(" (")[0]
        if first_last == "fp":
            return SkipRule("fp", f"first_last = fp: {what} kept FP")
        return SkipRule("w8a8", f"first_last = w8a8: {what} at 8 bits")

    # -- structure -------------------------------------------------------------------
    def temporal_layers(self) -> list[str]:
        """Layers that only see the timestep (TFMQ-DM's temporal information block): the
        timestep MLP and the per-block projections of its output."""
        return [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)
                and self.role(n) in ("time_embed_in", "time_embed", "time_proj")]

    def temporal_forward(self, model: nn.Module, t: torch.Tensor,
                         cond: dict) -> dict[str, torch.Tensor]:
        """The temporal features the rest of ``model`` consumes, recomputed from the timestep
        ``t`` (B,) and conditioning ``cond`` alone, keyed by the temporal layer producing
        each. ``model`` is this architecture (FP or quantized): its own submodules run, so
        a quantized copy gives its quantized features (TFMQ-DM's temporal reconstruction)."""
        raise GaqError(f"{self.arch or type(self).__name__}: no temporal forward")

    def shortcut_splits(self) -> dict[str, int]:
        """1x1 shortcut convs fed by ``cat([h, skip])`` -> channel count of ``h``."""
        return {}

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (example inputs are made there)."""
        return next(self.model.parameters()).device

    def example_inputs(self, batch: int = 2) -> tuple[tuple, dict]:
        """A random batch shaped as the model takes it, on the model's device."""
        cfg, dev = self.model.config, self.device
        x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=dev)
        kwargs = {}
        if getattr(self.model, "class_embedding", None) is not None:
            kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=dev)
        return (x, torch.full((batch,), 10, dtype=torch.long, device=dev)), kwargs

    def blocks(self, split_temporal: bool = False) -> list[Block]:
        """Reconstruction units in forward order: blocks of ``block_types`` and every
        quantizable layer outside them, one by one. With ``split_temporal`` (TFMQ-DM),
        the temporal layers form one first unit of their own and leave their blocks."""
        kinds: dict[str, str] = {}
        for name, mod in self.model.named_modules():
            kind = self.block_types.get(type(mod).__name__)
            if kind and not any(name.startswith(p + ".") for p in kinds):
                kinds[name] = kind
        temporal = set(self.temporal_layers()) if split_temporal else set()
        for name, mod in self.model.named_modules():
            inside = any(name.startswith(p + ".") for p in kinds)
            if isinstance(mod, QUANTIZABLE) and not inside and name not in temporal:
                kinds[name] = "layer"
        # temporal layers depend on the timestep alone, so they can always go first
        head = [Block("temporal", "temporal")] if temporal else []
        return head + [Block(n, kinds[n]) for n in self._trace_order(set(kinds))]

    def _trace_order(self, names: set[str]) -> list[str]:
        seen: list[str] = []
        handles = []
        for name, mod in self.model.named_modules():
            if name in names:
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, n=name: seen.append(n) if n not in seen else None))
        try:
            args, kwargs = self.example_inputs()
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return seen

    # -- checks ----------------------------------------------------------------------
    def check_supported(self, extra: SkipFilter | None = None) -> None:
        for name, mod in self.model.named_modules():
            if isinstance(mod, UNSUPPORTED_LAYERS):
                rule = self.skip(mod, name) or (extra(mod, name) if extra else None)
                if rule is None or rule.precision != "fp":
                    raise GaqError(
                        f"{self.arch}: layer {name!r} is a {type(mod).__name__}, which gaq cannot "
                        "quantize; refusing a partial quantization (add a skip rule for it)"
                    )


def _batch_timesteps(t: torch.Tensor) -> torch.Tensor:
    """Timesteps as the (B,) tensor the models broadcast a scalar to."""
    t = torch.as_tensor(t)
    return t.reshape(1) if t.ndim == 0 else t


class UNet2DAdapter(ModelAdapter):
    """diffusers ``UNet2DModel`` (pixel-space DDPM/DDIM UNets, e.g. the bundled model, CIFAR-10)."""

    arch = "UNet2DModel"
    block_types = {"ResnetBlock2D": "resnet", "Attention": "attention"}

    def role(self, name: str) -> str | None:
        # diffusers' UNet2DModel / UNet2DConditionModel module names (diffusers 0.42)
        dotted = f".{name}."
        if name == "conv_in":
            return "input"
        if name == "conv_out":
            return "output"
        if name == "time_embedding.linear_1":
            return "time_embed_in"
        if name.startswith("time_embedding."):
            return "time_embed"
        if name.endswith(".time_emb_proj"):
            return "time_proj"
        if name.startswith("class_embedding"):
            return "class_embed"
        if name.endswith((".attn2.to_k", ".attn2.to_v")):
            return "cross_kv"
        if name.endswith(".conv_shortcut"):
            return "shortcut"
        if ".downsamplers." in dotted:
            return "downsample"
        return None

    def temporal_forward(self, model: nn.Module, t: torch.Tensor,
                         cond: dict) -> dict[str, torch.Tensor]:
        emb = self._time_embedding(model, _batch_timesteps(t), cond)
        out = {}
        for name, mod in model.named_modules():
            proj = getattr(mod, "time_emb_proj", None)
            if proj is None or not hasattr(mod, "nonlinearity"):
                continue
            # as ResnetBlock2D.forward: act(temb) unless the block skips it
            temb = emb if getattr(mod, "skip_time_act", False) else mod.nonlinearity(emb)
            out[f"{name}.time_emb_proj"] = proj(temb)
        return out

    def _time_embedding(self, model: nn.Module, t: torch.Tensor, cond: dict) -> torch.Tensor:
        # UNet2DModel.forward, step 1 ("time") in diffusers 0.42
        dtype = next(model.parameters()).dtype
        emb = model.time_embedding(model.time_proj(t).to(dtype=dtype))
        if model.class_embedding is not None:
            labels = cond["class_labels"]
            if model.config.class_embed_type == "timestep":
                labels = model.time_proj(labels)
            emb = emb + model.class_embedding(labels).to(dtype=dtype)
        return emb

    def shortcut_splits(self) -> dict[str, int]:
        from gaq.quant.modules import unet_shortcut_splits

        return unet_shortcut_splits(self.model)


class UNet2DConditionAdapter(UNet2DAdapter):
    """diffusers ``UNet2DConditionModel`` (latent diffusion, Stable Diffusion)."""

    arch = "UNet2DConditionModel"
    block_types = {"ResnetBlock2D": "resnet", "BasicTransformerBlock": "transformer"}

    def example_inputs(self, batch: int = 2) -> tuple[tuple, dict]:
        (x, t), kwargs = super().example_inputs(batch)
        cfg = self.model.config
        dim = cfg.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        hidden = torch.randn(batch, 4, dim, device=self.device)
        return (x, t), kwargs | {"encoder_hidden_states": hidden}

    def _time_embedding(self, model: nn.Module, t: torch.Tensor, cond: dict) -> torch.Tensor:
        # UNet2DConditionModel.forward: get_time_embed, time_embedding, get_class_embed,
        # time_embed_act (diffusers 0.42); addition embeddings (SDXL, Kandinsky) need the
        # text/image inputs, so they are not temporal and are refused here.
        if model.config.addition_embed_type is not None:
            raise GaqError(f"{self.arch}: addition_embed_type="
                           f"{model.config.addition_embed_type!r} has no temporal forward")
        dtype = next(model.parameters()).dtype
        emb = model.time_embedding(model.time_proj(t).to(dtype=dtype), cond.get("timestep_cond"))
        if model.class_embedding is not None:
            labels = cond["class_labels"]
            if model.config.class_embed_type == "timestep":
                labels = model.time_proj(labels).to(dtype=dtype)
            class_emb = model.class_embedding(labels).to(dtype=dtype)
            concat = model.config.class_embeddings_concat
            emb = torch.cat([emb, class_emb], dim=-1) if concat else emb + class_emb
        if model.time_embed_act is not None:
            emb = model.time_embed_act(emb)
        return emb


class DiTAdapter(ModelAdapter):
    """diffusers ``DiTTransformer2DModel`` / class-conditional ``Transformer2DModel``."""

    arch = "DiT"
    block_types = {"BasicTransformerBlock": "transformer"}

    def role(self, name: str) -> str | None:
        # DiTTransformer2DModel: BasicTransformerBlock with ada_norm_zero (diffusers 0.42);
        # the class embedding is an nn.Embedding (never quantized)
        if name == "pos_embed.proj":
            return "input"
        if name == "proj_out_2":
            return "output"
        if name.endswith(".norm1.emb.timestep_embedder.linear_1"):
            return "time_embed_in"
        if ".norm1.emb." in name:
            return "time_embed"
        if name.endswith(".norm1.linear") or name == "proj_out_1":
            return "time_proj"  # adaLN modulation of the timestep/class embedding
        return None

    def temporal_forward(self, model: nn.Module, t: torch.Tensor,
                         cond: dict) -> dict[str, torch.Tensor]:
        # BasicTransformerBlock (ada_norm_zero) -> AdaLayerNormZero.forward, and the output
        # modulation of DiTTransformer2DModel.forward, which re-embeds with block 0's emb
        t = _batch_timesteps(t)
        labels = cond.get("class_labels")
        dtype = next(model.parameters()).dtype
        out, first = {}, None
        for i, block in enumerate(model.transformer_blocks):
            norm = block.norm1
            emb = norm.emb(t, labels, hidden_dtype=dtype)
            first = emb if first is None else first
            out[f"transformer_blocks.{i}.norm1.linear"] = norm.linear(norm.silu(emb))
        out["proj_out_1"] = model.proj_out_1(torch.nn.functional.silu(first))
        return out

    def example_inputs(self, batch: int = 2) -> tuple[tuple, dict]:
        (x, t), _ = super().example_inputs(batch)
        labels = torch.zeros(batch, dtype=torch.long, device=self.device)
        return (x,), {"timestep": t, "class_labels": labels}


#: Adapters shipped with gaq, keyed by the denoiser's class name (what a pipeline folder's
#: ``model_index.json`` names), as lazy targets. Another package adds one through the
#: ``gaq.adapters`` entry-point group: ``MyTransformer2DModel = "pkg.adapter:MyAdapter"``.
BUILTIN_ADAPTERS: dict[str, str] = {
    "UNet2DModel": "gaq.models.adapters:UNet2DAdapter",
    "UNet2DConditionModel": "gaq.models.adapters:UNet2DConditionAdapter",
    "DiTTransformer2DModel": "gaq.models.adapters:DiTAdapter",
    "Transformer2DModel": "gaq.models.adapters:DiTAdapter",
    "PixArtTransformer2DModel": "gaq.models.adapter_pixart:PixArtAdapter",
}


class AdapterRegistry(Registry):
    """Denoiser class name -> its :class:`ModelAdapter` (``gaq.adapters`` entry points)."""

    kind = "architecture"
    base = "gaq.models.adapters:ModelAdapter"

    def __init__(self, builtins: dict[str, str] | None = None,
                 entry_point_group: str | None = "gaq.adapters") -> None:
        super().__init__(builtins, entry_point_group)


ADAPTERS = AdapterRegistry(BUILTIN_ADAPTERS)


def denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> object:
    """Run the denoiser ``model`` as its architecture's adapter calls it
    (:meth:`ModelAdapter.forward`). A module of no known architecture (a test's plain
    ``nn.Module``) is called as ``model(x, t, **cond)``."""
    name = type(model).__name__
    cls = ADAPTERS.get(name) if name in ADAPTERS else ModelAdapter
    return cls.forward(model, x, t, cond)


def check_architecture(class_name: str) -> type[ModelAdapter]:
    """The adapter class for a denoiser class name (a pipeline folder's ``model_index.json``
    names it, so this runs before any weight is read); an unknown one is one line."""
    if class_name not in ADAPTERS:
        raise GaqError(f"unsupported architecture {class_name}: gaq has adapters for "
                       f"{', '.join(ADAPTERS.names())}")
    return ADAPTERS.get(class_name)


def is_dit(model: nn.Module) -> bool:
    """Whether ``model`` is a class-conditional DiT (the adapter family that takes
    ``class_labels``), by its architecture, not by a config key other models share."""
    name = type(model).__name__
    return name in ADAPTERS and ADAPTERS.get(name) is DiTAdapter and bool(
        getattr(model.config, "num_embeds_ada_norm", None))


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s architecture; an unknown one is refused, never half-done."""
    name = type(model).__name__
    cls = check_architecture(name)
    if name == "Transformer2DModel" and not getattr(model.config, "num_embeds_ada_norm", None):
        raise GaqError("unsupported architecture Transformer2DModel without adaLN class "
                       "conditioning: only the DiT variant is supported")
    adapter = cls(model)
    adapter.check_supported()
    return adapter
