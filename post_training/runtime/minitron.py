"""ModelOpt's Minitron pruning (``mcore_minitron``) on megatron-core 0.16.1, without Transformer
Engine, on the toolkit's local layer spec.

Two patch registry entries (:mod:`.patches`), applied on demand by
:func:`post_training.pruning.prune_model` (pruning is the only user; every other task would pay
the plugin's import for nothing):

* ``minitron_plugin_import``: ModelOpt 0.47's megatron NAS plugin imports ``transformer_engine``
  and ``megatron.core.models.hybrid`` (megatron-core >= 0.17) at module level, and subclasses
  megatron's TE wrappers, which are ``MagicMock``/``None`` placeholders without TE. Its
  ``import_plugin`` block swallows the ImportError, so the ``mcore_minitron`` mode is simply
  missing ("Unknown mode"). The plugin is imported once with stand-ins in place (plain classes
  that nothing is an instance of; ``HybridModel`` is 0.16's ``MambaModel``); the stand-ins are
  removed again right after, so nothing else in the process sees a fake TE.
* ``minitron_local_spec``: the plugin handles only the TE spec: ``_DynamicSelfAttention``
  asserts a ``TEDotProductAttention`` and prunes heads through TE's fused QKV linear, the
  hidden-size importance hooks read the layernorm output of TE's fused LayerNorm+Linear, and
  ``torch.nn.RMSNorm`` (our separate norms) has no dynamic module. Local-spec versions of those
  three, computing the same statistics (mean over tokens of |activation|, squared, summed over
  the batch; the TE path is unchanged).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import Any, Iterator

import torch

from post_training.runtime.dist import have_te
from post_training.runtime.patches import ON_DEMAND, AttrSwap, Patch, swaps

_NAS = "modelopt.torch.nas.plugins.megatron"
_MINITRON = "modelopt.torch.prune.plugins.mcore_minitron"
_STATS = "modelopt.torch.nas.plugins.megatron_model_stats"
_MTE = "megatron.core.extensions.transformer_engine"
# megatron's TE wrappers the plugin imports by name (MagicMock or None without TE)
_TE_NAMES = ("TEColumnParallelGroupedLinear", "TEColumnParallelLinear", "TEDotProductAttention",
             "TELayerNormColumnParallelLinear", "TELinear", "TERowParallelGroupedLinear",
             "TERowParallelLinear")


@contextlib.contextmanager
def _standins() -> Iterator[None]:
    """Fake ``transformer_engine`` / ``megatron.core.models.hybrid`` modules and plain classes
    for megatron's TE wrappers, for the duration of the plugin import only."""
    from megatron.core.models.mamba.mamba_model import MambaModel

    mte = importlib.import_module(_MTE)
    fake: dict[str, types.ModuleType] = {}
    if not have_te():
        te = types.ModuleType("transformer_engine")
        te.pytorch = types.ModuleType("transformer_engine.pytorch")
        te.pytorch.LayerNorm = type("LayerNorm", (torch.nn.Module,), {})
        te.pytorch.RMSNorm = type("RMSNorm", (torch.nn.Module,), {})
        fake.update({"transformer_engine": te, "transformer_engine.pytorch": te.pytorch})
    try:
        importlib.import_module("megatron.core.models.hybrid")
    except ImportError:
        pkg = types.ModuleType("megatron.core.models.hybrid")
        model = types.ModuleType("megatron.core.models.hybrid.hybrid_model")
        model.HybridModel = MambaModel
        specs = types.ModuleType("megatron.core.models.hybrid.hybrid_layer_specs")
        specs.hybrid_stack_spec = None  # only read by get_te_hybrid_stack_spec (Mamba + TE)
        fake.update({pkg.__name__: pkg, model.__name__: model, specs.__name__: specs})
    swapped = {}
    for name in _TE_NAMES:
        value = getattr(mte, name, None)
        if not isinstance(value, type):
            swapped[name] = value
            setattr(mte, name, type(name, (torch.nn.Module,), {"__module__": _MTE}))
    added = [k for k in fake if k not in sys.modules]
    sys.modules.update({k: fake[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            sys.modules.pop(k, None)
        for name, value in swapped.items():
            setattr(mte, name, value)


def _import_plugin() -> None:
    if _MINITRON in sys.modules and hasattr(sys.modules[_MINITRON], "MCoreMinitronSearcher"):
        return
    with _standins():
        for name in (_NAS, _STATS, _MINITRON):
            importlib.import_module(name)


# ----------------------------------------------------------------------------- local layer spec


def _is_local(attn: Any) -> bool:
    """Local spec: megatron's own QKV linear (TE's fused one is no ColumnParallelLinear)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    return isinstance(attn.linear_qkv, ColumnParallelLinear)


_CLASSES: dict[str, type] = {}


def _local_qkv_cls() -> type:
    """Dynamic fused-QKV ``ColumnParallelLinear``: rows of the kept query heads of each group
    plus that group's K and V (the TE class's index arithmetic: megatron's QKV layout is the
    same on both specs)."""
    if "qkv" not in _CLASSES:
        from modelopt.torch.opt.dynamic import DynamicModule

        nm = importlib.import_module(_NAS)
        te_qkv = nm._DynamicTEQKVLayerNormColumnParallelLinear

        def out_size(mod, val):
            return ((mod.get_hparam("num_attention_heads").active + 2 * mod.config.num_query_groups)
                    * mod.config.kv_channels)

        class DynamicLocalQKV(DynamicModule):
            _get_output_size_indices = te_qkv._get_output_size_indices

            def _setup(self, *, num_attention_heads, hidden_size):
                self._register_hparam("input_size", hidden_size)
                self._register_hparam("num_attention_heads", num_attention_heads)
                self._register_dynamic_attribute("output_size", out_size)
                self._register_dynamic_attribute("output_size_per_partition", out_size)
                self._register_dynamic_attribute("weight", te_qkv._get_weight)
                if getattr(self, "bias", None) is not None:
                    self._register_dynamic_attribute("bias", te_qkv._get_bias)

        class DynamicLocalProj(DynamicModule):
            _get_input_size_indices = nm._DynamicTEProjRowParallelLinear._get_input_size_indices

            def _setup(self, *, num_attention_heads, hidden_size):
                self._register_hparam("output_size", hidden_size)
                self._register_hparam("num_attention_heads", num_attention_heads)
                in_size = lambda mod, val: num_attention_heads.active * mod.config.kv_channels  # noqa: E731
                self._register_dynamic_attribute("input_size", in_size)
                self._register_dynamic_attribute("input_size_per_partition", in_size)
                self._register_dynamic_attribute("weight", nm._DynamicTEProjRowParallelLinear._get_weight)
                # a RowParallelLinear bias is over hidden_size (output) only
                if getattr(self, "bias", None) is not None:
                    self._register_dynamic_attribute("bias", nm._DynamicTEProjRowParallelLinear._get_bias)

        _CLASSES.update(qkv=DynamicLocalQKV, proj=DynamicLocalProj)
    return _CLASSES["qkv"]


def _combined(dyn: type, module: torch.nn.Module) -> type:
    """``dyn`` mixed into the module's own class (what DynamicModule.convert needs)."""
    key = (dyn, type(module))
    if key not in _CLASSES:
        _CLASSES[key] = type(f"_Dynamic{type(module).__name__}", (dyn, type(module)), {})
    return _CLASSES[key]


def _self_attention_setup(upstream: Any):
    def _setup(self, *, hidden_size):
        if not _is_local(self):
            return upstream(self, hidden_size=hidden_size)
        from modelopt.torch.nas.traced_hp import TracedHp
        from modelopt.torch.opt.dynamic import DynamicModule

        nm = importlib.import_module(_NAS)
        if not self._prunes_attention_heads():
            # hidden_size only (e.g. an output-gated attention): head-side widths stay
            nm.DMRegistry.convert(self.linear_qkv, input_size=hidden_size,
                                  output_size=TracedHp([self.linear_qkv.output_size]))
            nm.DMRegistry.convert(self.linear_proj, input_size=TracedHp([self.linear_proj.input_size]),
                                  output_size=hidden_size)
            return
        heads = nm.NumAttentionHeadsHp(self.num_attention_heads_per_partition,
                                       self.num_query_groups_per_partition)
        self._register_hparam("num_attention_heads", heads)
        self._register_dynamic_attribute("num_attention_heads_per_partition",
                                         lambda mod, val: mod.num_attention_heads)
        # SDPAttention reshapes its output to heads * kv_channels
        core = type("_DynamicSDPAttention", (DynamicModule, type(self.core_attention)),
                    {"_setup": lambda m: None})
        core.convert(self.core_attention)
        self.core_attention._register_dynamic_attribute(
            "hidden_size_per_partition", lambda mod, val: heads.active * mod.config.kv_channels)
        _combined(_local_qkv_cls(), self.linear_qkv).convert(
            self.linear_qkv, num_attention_heads=heads, hidden_size=hidden_size)
        _combined(_CLASSES["proj"], self.linear_proj).convert(
            self.linear_proj, num_attention_heads=heads, hidden_size=hidden_size)

    return _setup


def _self_attention_export(upstream: Any):
    def export(self):
        if not _is_local(self):
            return upstream(self)
        from modelopt.torch.opt.dynamic import DynamicModule

        for m in (self.core_attention, self.linear_qkv, self.linear_proj):
            if isinstance(m, DynamicModule):
                m.export()
        return DynamicModule.export(self)

    return export


def _hidden_size_importance(upstream: Any):
    """Hidden-size importance from the outputs of the separate norms (input_layernorm,
    pre_mlp_layernorm) of a local-spec model; TE models keep upstream's fused-linear hooks."""
    def register(module, registry) -> None:
        layers = list(module.decoder.layers)
        if not layers or not _is_local(layers[0].self_attention):
            return upstream(module, registry)
        from megatron.core.transformer.identity_op import IdentityOp

        module._register_temp_attribute("_activations", {})

        def collect(norm, inputs, output):
            act = output.detach().float().abs().mean(dim=0).pow(2).sum(dim=0)  # [hidden]
            prev = module._activations.get(id(norm))
            module._activations[id(norm)] = act if prev is None else prev + act

        for layer in layers:
            for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
                if not isinstance(norm, IdentityOp):
                    registry.register_hook(norm, collect, hook_type="forward")

        def estimate():
            assert module._activations, "no activations collected for importance estimation"
            acts = torch.stack([a.pow(0.5) for a in module._activations.values()]).sum(dim=0)
            torch.distributed.all_reduce(acts)  # the other pipeline stages' layers
            return acts

        registry.register_importance(module, "hidden_size", estimate)

    return register


def _rmsnorm_cls() -> type:
    if "rmsnorm" not in _CLASSES:
        nm = importlib.import_module(_NAS)

        class DynamicRMSNorm(nm._DynamicTENorm):
            """torch.nn.RMSNorm over a dynamic hidden size (weight and normalized_shape cut)."""

            def _setup(self, *, num_features):
                super()._setup(num_features=num_features)
                self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

        _CLASSES["rmsnorm"] = DynamicRMSNorm
    return _CLASSES["rmsnorm"]


def _register_rmsnorm() -> None:
    from modelopt.torch.nas.registry import DMRegistry

    if torch.nn.RMSNorm not in DMRegistry:
        DMRegistry.register({torch.nn.RMSNorm: "nn.RMSNorm"})(_rmsnorm_cls())


def _unregister_rmsnorm() -> None:
    from modelopt.torch.nas.registry import DMRegistry

    if torch.nn.RMSNorm in DMRegistry:
        DMRegistry.unregister(torch.nn.RMSNorm)


def _drop_layers_gloo(upstream: Any):
    """``drop_mcore_language_model_layers`` with its scalar all_gather_into_tensor input viewed
    as one element: gloo requires the output to be world-size copies of the input's shape."""
    import torch.distributed as dist

    def drop(model, *, layers_to_drop):
        gather = dist.all_gather_into_tensor

        def gather_1d(output, input, group=None, async_op=False):
            return gather(output, input.reshape(-1) if input.dim() == 0 else input, group, async_op)

        dist.all_gather_into_tensor = gather_1d
        try:
            return upstream(model, layers_to_drop=layers_to_drop)
        finally:
            dist.all_gather_into_tensor = gather

    return drop


_SA = f"{_NAS}:_DynamicSelfAttention"
_SA_SETUP, _SA_EXPORT = f"{_SA}._setup", f"{_SA}.export"
_HS_IMP = f"{_MINITRON}:_register_hidden_size_importance"
_DROP = f"{_MINITRON}:drop_mcore_language_model_layers"
_apply_swaps, _remove_swaps = swaps(AttrSwap(_SA_SETUP, _self_attention_setup),
                                    AttrSwap(_SA_EXPORT, _self_attention_export),
                                    AttrSwap(_HS_IMP, _hidden_size_importance))
_apply_gloo, _remove_gloo = swaps(AttrSwap(_DROP, _drop_layers_gloo))


def _apply_local() -> None:
    _import_plugin()
    _apply_swaps()
    _register_rmsnorm()


def _remove_local() -> None:
    _unregister_rmsnorm()
    _remove_swaps()


PATCHES = [
    Patch(
        "minitron_plugin_import",
        {f"{_MTE}:{n}": None for n in _TE_NAMES},
        "version and TE shim: ModelOpt 0.47's megatron NAS plugin (and with it the mcore_minitron "
        "prune mode) imports transformer_engine and megatron.core.models.hybrid (megatron-core "
        ">= 0.17; 0.16 calls it mamba.mamba_model.MambaModel) at module level and subclasses "
        "megatron's TE wrappers, which are MagicMock/None without TE; import_plugin swallows the "
        "error, so mtp.prune(mode='mcore_minitron') fails with an unknown mode. Imports the plugin "
        "once with stand-ins (plain classes nothing is an instance of, HybridModel = MambaModel), "
        "then takes the stand-ins away again",
        ON_DEMAND, _import_plugin, None,
        covers="modelopt.torch.prune.prune(mode='mcore_minitron') from post_training.pruning",
        depends={"megatron.core.models.mamba.mamba_model:MambaModel": None,
                 "modelopt.torch.prune.pruning:prune":
                     "(model: torch.nn.modules.module.Module, mode: modelopt.torch.opt.mode."
                     "ModeDescriptor | str | list[modelopt.torch.opt.mode.ModeDescriptor | str] | "
                     "list[tuple[str, dict[str, typing.Any]]], constraints: dict[str, str | float | "
                     "dict | None], dummy_input: typing.Any | tuple, config: dict[str, typing.Any] | "
                     "None = None) -> tuple[torch.nn.modules.module.Module, dict[str, typing.Any]]"},
        group="minitron"),
    Patch(
        "minitron_local_spec",
        {_SA_SETUP: "(self, *, hidden_size: modelopt.torch.nas.traced_hp.TracedHp)",
         _SA_EXPORT: "(self) -> torch.nn.modules.module.Module",
         _HS_IMP: "(module: modelopt.torch.nas.plugins.megatron._DynamicMCoreLanguageModel, "
                  "registry: modelopt.torch.prune.plugins.mcore_minitron.ImportanceEstimatorRegistry)"
                  " -> None",
         "modelopt.torch.nas.registry:DMRegistry": None},
        "ModelOpt's Minitron handles only the TE layer spec: _DynamicSelfAttention asserts "
        "core_attention is a TEDotProductAttention and prunes heads through TE's fused "
        "LayerNorm+QKV linear; the hidden-size importance hooks unpack TE's fused-layernorm "
        "output ((out, ln_out), bias), which breaks on megatron's ColumnParallelLinear; "
        "torch.nn.RMSNorm has no dynamic module. Adds local-spec versions (ColumnParallelLinear "
        "QKV / RowParallelLinear proj with the same head selection, SDPAttention's output width, "
        "hidden-size importance from the separate norms' outputs, a dynamic RMSNorm); models on "
        "the TE spec take upstream's path unchanged",
        ON_DEMAND, _apply_local, _remove_local,
        covers="modelopt.torch.prune.prune(mode='mcore_minitron') on models built by model_builder",
        depends={f"{_NAS}:_DynamicTEQKVLayerNormColumnParallelLinear._get_output_size_indices":
                 "(self) -> torch.LongTensor",
                 f"{_NAS}:_DynamicTEProjRowParallelLinear._get_input_size_indices":
                 "(self) -> torch.LongTensor"},
        group="minitron"),
    Patch(
        "minitron_gloo_layer_count",
        {_DROP: "(model: torch.nn.modules.module.Module, *, layers_to_drop: list[int]) -> None"},
        "drop_mcore_language_model_layers gathers each pipeline stage's remaining layer count with "
        "all_gather_into_tensor from a 0-d tensor into a [PP] tensor; NCCL accepts that, gloo "
        "refuses it ('ProcessGroupGloo::allgather: invalid tensor size at index 0 (expected (), "
        "got (1))'), so depth pruning failed on CPU at any PP. The call runs with that input "
        "viewed as one element",
        ON_DEMAND, lambda: (_import_plugin(), _apply_gloo())[-1], _remove_gloo,
        covers="depth pruning (num_layers) in modelopt.torch.prune.prune(mode='mcore_minitron')",
        depends={"torch.distributed:all_gather_into_tensor":
                 "(output_tensor, input_tensor, group=None, async_op=False)"},
        group="minitron"),
]
