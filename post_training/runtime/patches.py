"""Every change the toolkit makes to upstream behaviour, in one registry.

megatron-core, ModelOpt and torch are changed in a few places: CPU shims for code that assumes
CUDA (:mod:`.cpu_compat`), fixes of upstream bugs and version shims (:mod:`.fixes`), the
declared KV-cache key format (:mod:`.kv_format`) and CPU inference fast paths
(:mod:`.fastpath`). Each change is a :class:`Patch` naming the upstream sites it replaces
(``module:qualname``, with the ``inspect.signature`` it was written against), why, and when it
applies. Nothing is patched when a module of ``post_training`` is imported: :func:`apply_runtime`
(called by ``init_runtime``) applies the entries for the runtime's device, each at most once.

``python -m post_training.runtime`` lists the registry; tests/test_patches.py checks that every
recorded site still exists with the recorded signature, and that imports change nothing.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# When an entry applies. "call site" entries are not applied globally: they name upstream
# behaviour the toolkit works around locally, at the call site given in ``when``.
CPU = "CPU runtime without CUDA (PT_NO_CPU_COMPAT=1 disables)"
CPU_FAST = "CPU runtime, under torch.inference_mode only (PT_NO_FASTPATH=1 disables)"
ALWAYS = "every runtime"
# Not applied by init_runtime: the one library function that needs it applies it by name
# (named in the entry's ``covers``), so other tasks do not pay for it.
ON_DEMAND = "on demand, by the library function named in covers"


@dataclass(eq=False)
class Patch:
    """One change to upstream behaviour.

    ``sites`` are the upstream objects the patch replaces or changes, ``depends`` the upstream
    objects its code mirrors or relies on without replacing them; both map ``module:qualname``
    to ``str(inspect.signature(obj))`` as recorded (None where the object has none, e.g. a C
    function or a registry object). ``apply``/``remove`` are None for a call-site workaround;
    ``remove`` is None where undoing is not possible or meaningful."""

    name: str
    sites: Mapping[str, str | None]
    reason: str
    when: str
    apply: Callable[[], None] | None
    remove: Callable[[], None] | None = None
    covers: str = ""  # upstream call sites that reach the patched ones, for people reading the list
    depends: Mapping[str, str | None] = field(default_factory=dict)
    group: str = ""

    @property
    def site(self) -> str:
        return next(iter(self.sites))


def resolve(target: str) -> Any:
    """The object at ``module:qualname`` as it is now (a patched site resolves to the patch)."""
    module, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


_SWAPPED: dict[str, Any] = {}  # target -> the upstream object an AttrSwap replaced


def upstream(target: str) -> Any:
    """The upstream object at ``target``: the original when a patch replaced it."""
    return _SWAPPED[target] if target in _SWAPPED else resolve(target)


class AttrSwap:
    """Replace the attribute ``target`` (``module:qualname``) by ``make(original)``; ``undo``
    puts the original back (or deletes the attribute where the owner only inherited it)."""

    instances: list[AttrSwap] = []

    def __init__(self, target: str, make: Callable[[Any], Any]) -> None:
        self.target, self.make = target, make
        AttrSwap.instances.append(self)
        module, _, qualname = target.partition(":")
        self._owner_path = f"{module}:{qualname.rpartition('.')[0]}" if "." in qualname else module
        self.attr = qualname.rpartition(".")[2]
        self._inherited = False

    def owner(self) -> Any:
        path = self._owner_path
        return resolve(path) if ":" in path else importlib.import_module(path)

    def __call__(self) -> None:
        owner = self.owner()
        orig = getattr(owner, self.attr)
        self._inherited = isinstance(owner, type) and self.attr not in vars(owner)
        _SWAPPED[self.target] = orig
        setattr(owner, self.attr, self.make(orig))

    def undo(self) -> None:
        orig = _SWAPPED.pop(self.target)
        owner = self.owner()
        if self._inherited:
            delattr(owner, self.attr)
        else:
            setattr(owner, self.attr, orig)


def original(owner: Any, attr: str) -> Any:
    """The upstream object a patch replaced at ``owner.attr`` (tests swap it back in)."""
    for swap in AttrSwap.instances:
        if swap.attr == attr and swap.target in _SWAPPED and swap.owner() is owner:
            return _SWAPPED[swap.target]
    raise KeyError(f"{owner!r}.{attr} is not a patched site")


def swaps(*swap_list: AttrSwap) -> tuple[Callable[[], None], Callable[[], None]]:
    """(apply, remove) for a patch made of attribute swaps."""
    def apply() -> None:
        for s in swap_list:
            s()

    def remove() -> None:
        for s in reversed(swap_list):
            s.undo()

    return apply, remove


# ----------------------------------------------------------------------------- the registry


def registry() -> list[Patch]:
    """Every entry, in the order they are applied. The entry modules are imported here (they
    define entries, they do not apply them), so that importing this module stays cheap."""
    from post_training.runtime import cpu_compat, fastpath, fixes, kv_format, minitron, te_standins

    return [*cpu_compat.PATCHES, *fixes.PATCHES, *kv_format.PATCHES, *fastpath.PATCHES,
            *minitron.PATCHES, *te_standins.PATCHES]


def get(name: str) -> Patch:
    for p in registry():
        if p.name == name:
            return p
    raise KeyError(f"no patch named {name!r}")


_APPLIED: set[str] = set()


def is_applied(name: str) -> bool:
    return name in _APPLIED


def apply(*names: str) -> list[str]:
    """Apply the named entries not applied yet. Returns the names newly applied."""
    done = []
    for name in names:
        p = get(name)
        if p.apply is None:
            raise ValueError(f"{name} is a call-site workaround: there is nothing to apply")
        if name not in _APPLIED:
            p.apply()
            _APPLIED.add(name)
            done.append(name)
    return done


def remove(*names: str) -> None:
    """Undo the named entries that are applied (tests compare patched and upstream paths)."""
    for name in reversed(names):
        p = get(name)
        if name in _APPLIED:
            if p.remove is None:
                raise ValueError(f"{name} cannot be removed")
            p.remove()
            _APPLIED.discard(name)


def group(name: str) -> list[str]:
    return [p.name for p in registry() if p.group == name]


def selected(device_type: str, cuda_available: bool) -> list[str]:
    """The entries a runtime on ``device_type`` gets, by their ``when`` and the env switches."""
    cpu = device_type == "cpu"
    compat = cpu and not cuda_available and os.environ.get("PT_NO_CPU_COMPAT") != "1"
    fast = cpu and os.environ.get("PT_NO_FASTPATH") != "1"
    return [p.name for p in registry()
            if (p.when == CPU and compat) or (p.when == CPU_FAST and fast) or p.when == ALWAYS]


def apply_runtime(device_type: str, cuda_available: bool) -> list[str]:
    """What ``init_runtime`` applies: the entries for this device. Returns their names."""
    names = selected(device_type, cuda_available)
    apply(*names)
    return names


def listing() -> str:
    """The registry as text: name, sites, when, applied or not in this process, reason."""
    lines = []
    for p in registry():
        state = ("call site" if p.apply is None else "applied" if is_applied(p.name)
                 else "not applied")
        lines.append(f"- {p.name} [{state}]")
        lines.append(f"    sites:  {', '.join(p.sites)}")
        lines.append(f"    when:   {p.when}")
        lines.append(f"    reason: {' '.join(p.reason.split())}")
        if p.covers:
            lines.append(f"    covers: {' '.join(p.covers.split())}")
    return "\n".join(lines)
