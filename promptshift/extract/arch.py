"""Where each architecture keeps its decoder layers and what each sub-layer adds to the
residual stream.

``attn_out`` and ``mlp_out`` must be exactly the tensors added to the residual stream,
so that ``resid_post = resid_pre + attn_out + mlp_out`` holds. For most families these
are the attention and MLP module outputs; Gemma 2/3 and OLMo 2 normalise both before
adding, so there the hooks sit on the post-norms instead. Extraction checks the identity
on a probe before it stores anything (:meth:`promptshift.extract.engine.Engine.preflight`).

:meth:`Arch.hook` is the one way anything hooks the stack: named points
(``resid_pre``, ``attn_out``, ``mlp_out``, ``resid_post`` of a layer, the component
names) that extraction reads and causal interventions read or replace.
"""

from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from promptshift.errors import ExtractError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    attn_add: str  # module (relative to a layer) whose output is added after attention
    mlp_add: str  # module (relative to a layer) whose output is added after the MLP
    final_norm: str  # dotted path from the CausalLM to the final norm
    attn_module: str  # the attention module (for layer_idx lookups)


_LLAMA_LIKE = ArchSpec("model.layers", "self_attn", "mlp", "model.norm", "self_attn")
# sub-layer outputs normalised before they are added (Gemma 2/3: "sandwich" norms; OLMo 2:
# no input norms, post-norms only); Gemma 1's post_attention_layernorm is the MLP's input norm
_POST_NORM = ArchSpec("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "model.norm",
                      "self_attn")

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _POST_NORM,
    "gemma": _LLAMA_LIKE,
    "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
    "gpt2": ArchSpec("transformer.h", "attn", "mlp", "transformer.ln_f", "attn"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm", "attention"),
}


def _get(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m


@dataclass
class Arch:
    spec: ArchSpec
    layers: nn.ModuleList
    final_norm: nn.Module
    model_type: str

    def attn_add(self, i: int) -> nn.Module:
        return _get(self.layers[i], self.spec.attn_add)

    def mlp_add(self, i: int) -> nn.Module:
        return _get(self.layers[i], self.spec.mlp_add)

    def hook(self, point: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
        """Call ``fn(h)`` in every forward pass with the tensor at a named point of
        ``layer``: ``resid_pre`` (the layer's input), ``attn_out`` / ``mlp_out`` (what
        attention / the MLP add to the residual stream), ``resid_post`` (the layer's
        output); ``h`` is (B, S, H), or (1, N, H) for a packed batch. If ``fn`` returns a
        tensor, it replaces ``h`` downstream (an intervention); None leaves it. Remove
        with the handle's ``remove()``."""
        if point == "resid_pre":
            def pre(mod, args, kwargs):
                new = fn(args[0] if args else kwargs["hidden_states"])
                if new is None:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            return self.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
        owners = {"attn_out": self.attn_add, "mlp_out": self.mlp_add, "resid_post": lambda i: self.layers[i]}
        if point not in owners:
            raise ValueError(f"unknown hook point {point!r}; choose from resid_pre, {', '.join(owners)}")

        def post(mod, args, out):
            new = fn(out[0] if isinstance(out, tuple) else out)
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return owners[point](layer).register_forward_hook(post)


def resolve_arch(model) -> Arch:
    mt = model.config.model_type
    spec = ARCHS.get(mt)
    if spec is None:
        raise ExtractError(
            f"architecture {mt!r} is not supported: promptshift needs to know which modules add to the residual "
            f"stream. Supported: {', '.join(sorted(ARCHS))}. Add an ArchSpec for it in promptshift/extract/arch.py"
        )
    try:
        layers = _get(model, spec.layers)
        final_norm = _get(model, spec.final_norm)
        for i in range(len(layers)):
            _get(layers[i], spec.attn_add), _get(layers[i], spec.mlp_add)
    except AttributeError as e:
        raise ExtractError(f"model of type {mt!r} does not have the expected module layout ({e})") from e
    if mt == "gpt_neox" and not getattr(model.config, "use_parallel_residual", True):
        pass  # sequential residual: attn output then mlp output, both still added to the stream
    return Arch(spec, layers, final_norm, mt)


def layer_windows(config) -> tuple[int | None, ...]:
    """Per decoder layer, its sliding window (a query at position q sees the keys at
    positions q - w + 1 .. q) or None for global attention, as transformers' own cache
    reads them from the config (``layer_types``, else ``sliding_window`` on every layer):
    Mistral slides in every layer, Gemma 2/3 and Qwen 2/3 (``use_sliding_window``) mix
    sliding and global layers."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types, kwargs = get_layer_types_and_kwargs(cfg)
    out = []
    for i, (t, kw) in enumerate(zip(types, kwargs)):
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention":
            out.append(int(kw["sliding_window"]))
        else:
            raise ExtractError(
                f"layer {i} of {cfg.model_type!r} uses {t!r} attention, which promptshift does not support "
                "(supported: full_attention, sliding_attention)"
            )
    return tuple(out)


def bind_model(obj, model) -> None:
    """Give ``obj`` (an engine or runner) the handles it works with: ``model``, ``arch``,
    ``base`` (the decoder stack), ``lm_head``, ``cfg`` (the text config), ``softcap``
    (final logit soft-capping or None), ``L`` (layers), ``windows`` (each layer's sliding
    window or None, :func:`layer_windows`) and ``device``. The caller installs the
    attention function first."""
    obj.model = model
    obj.arch = resolve_arch(model)
    obj.base = model.base_model
    obj.lm_head = model.get_output_embeddings()
    obj.cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    obj.softcap = getattr(obj.cfg, "final_logit_softcapping", None)
    obj.L = len(obj.arch.layers)
    obj.windows = layer_windows(model.config)
    obj.device = next(model.parameters()).device
