"""Worker: does importing the modules of ``post_training`` change megatron-core, ModelOpt,
transformers or torch? Run as a plain process (no torchrun).

``list FILE``: import every module of the package and write, as JSON, the upstream modules that
brought in (in import order) and the sites of the patch registry. ``check FILE``: in a fresh
process, import those upstream modules first (no module of ours), take a snapshot, import every
module of the package, take another, and print the differences as JSON (empty: no change). The snapshot holds, for every loaded upstream module,
its namespace and the namespace of every class it defines (by identity), the contents of
ModelOpt's dynamic-module registries (QuantModuleRegistry, LoRA's, ...), torch's function-mode
stack, the dispatcher's kernels of ModelOpt's block-quantization op, and every site of the
patch registry.
"""
from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
import warnings

UPSTREAM = ("torch", "megatron", "modelopt", "transformers")


def package_modules() -> list[str]:
    """Every module of post_training except ``__main__`` ones (importing those runs a CLI)."""
    import post_training

    names = ["post_training"]
    for info in pkgutil.walk_packages(post_training.__path__, "post_training."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def import_package() -> None:
    for name in package_modules():
        importlib.import_module(name)


def _upstream_loaded() -> list[str]:
    return [n for n in list(sys.modules) if n.split(".")[0] in UPSTREAM]


def _registries():
    from modelopt.torch.opt.dynamic import _DMRegistryCls

    seen: set[int] = set()
    for name in _upstream_loaded():
        for attr, value in list(vars(sys.modules[name]).items()):
            if isinstance(value, _DMRegistryCls) and id(value) not in seen:  # re-exported often
                seen.add(id(value))
                yield f"{name}:{attr}", value


def _resolve(target: str) -> object:
    """patches.resolve, written again on purpose: importing post_training.runtime.patches before
    the first snapshot would import our modules before they are checked."""
    module, _, qualname = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def snapshot(sites: list[str]) -> dict[str, object]:
    """key -> object (compared by identity) or a plain value (compared by equality)."""
    import torch

    snap: dict[str, object] = {}
    for name in _upstream_loaded():
        mod = sys.modules[name]
        if mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            snap[f"{name}:{attr}"] = value
            if isinstance(value, type) and getattr(value, "__module__", None) == name:
                for cattr, cvalue in list(vars(value).items()):
                    snap[f"{name}:{attr}.{cattr}"] = cvalue
    for key, reg in _registries():
        snap[f"registry {key}"] = ("value", tuple(sorted(map(repr, reg._registry.items()))))
    snap["torch function mode stack"] = (
        "value", tuple(map(repr, torch.overrides._get_current_function_mode_stack())))
    if torch._C._dispatch_has_kernel("tensorrt::dynamic_block_quantize_op"):
        snap["dispatcher tensorrt::dynamic_block_quantize_op"] = (
            "value", torch._C._dispatch_dump("tensorrt::dynamic_block_quantize_op"))
    for target in sites:
        try:
            snap[f"site {target}"] = _resolve(target)
        except ImportError as e:  # a plugin that imports only once its on-demand entry ran
            snap[f"site {target}"] = ("value", f"not importable: {type(e).__name__}")
    return snap


def _is_ours(value: object) -> bool:
    return str(getattr(value, "__module__", "") or "").startswith("post_training")


def differences(before: dict, after: dict) -> list[str]:
    """Replaced or removed entries, and new entries holding one of our objects (a lazy module
    filling in its own attributes on first access is not a change)."""
    out = []
    for key, old in before.items():
        if key not in after:
            out.append(f"removed {key}")
            continue
        new = after[key]
        if isinstance(old, tuple) and len(old) == 2 and old[0] == "value":
            if old != new:
                out.append(f"changed {key}")
        elif new is not old and not (inspect.ismethod(old) and old == new):  # bound: new each time
            out.append(f"replaced {key}: {old!r} -> {new!r}")
    for key in after.keys() - before.keys():
        if _is_ours(after[key]):
            out.append(f"added {key}: {after[key]!r}")
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    mode, path = sys.argv[1:3]
    if mode == "list":
        import_package()
        from post_training.runtime import patches

        sites = [t for p in patches.registry() for t in (*p.sites, *p.depends)]
        with open(path, "w") as f:
            json.dump({"modules": _upstream_loaded(), "sites": sites}, f)
        return
    with open(path) as f:
        listed = json.load(f)
    for name in listed["modules"]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - some private modules do not import on their own
            pass
    assert not any(n.split(".")[0] == "post_training" for n in sys.modules), "ours imported early"
    before = snapshot(listed["sites"])
    import_package()
    after = snapshot(listed["sites"])
    print(json.dumps({"modules": len(package_modules()), "differences": differences(before, after)}))


if __name__ == "__main__":
    main()
