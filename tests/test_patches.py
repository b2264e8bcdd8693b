"""The patch registry (post_training/runtime/patches.py): every change to upstream behaviour is an
entry whose upstream sites still exist with the signature it was written against; removable
entries undo and redo cleanly; importing the package changes nothing upstream."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

from dist_utils import ROOT, clean_env
from post_training.runtime import cpu_compat, fastpath, patches

ENTRIES = patches.registry()


def _signature(obj) -> str | None:
    try:
        return str(inspect.signature(obj))
    except (ValueError, TypeError):  # C functions and registry objects have none
        return None


def test_entries_are_complete_and_unique():
    names = [p.name for p in ENTRIES]
    assert len(names) == len(set(names))
    for p in ENTRIES:
        assert p.sites and p.reason and p.when, p.name
        assert all(":" in t for t in (*p.sites, *p.depends)), p.name
        assert (p.apply is None) == p.when.startswith("call site"), p.name
    groups = {p.group for p in ENTRIES}
    assert {"cpu_compat", "fixes", "kv_format", "fastpath"} <= groups


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda p: p.name)
def test_upstream_sites_exist_with_recorded_signatures(entry):
    """Fails when upstream moves or changes a site a patch replaces or mirrors: look at the
    patch again, then record the new signature."""
    if entry.when == patches.ON_DEMAND:  # its sites may live in a plugin that entry imports
        patches.apply(entry.name)
    for target, recorded in {**entry.sites, **entry.depends}.items():
        obj = patches.upstream(target)  # the original where a patch replaced it
        if recorded is not None:
            assert _signature(obj) == recorded, f"{entry.name}: {target} changed"


def _state(entry) -> dict:
    """What each entry changes, as seen from outside."""
    from megatron.core.transformer.attention import Attention  # noqa: F401
    from modelopt.torch.export import unified_export_megatron as uem
    from modelopt.torch.nas.registry import DMRegistry
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    from post_training.attention import SDPAttention
    from post_training.runtime import block_quant_cpu

    state = {t: patches.resolve(t) for t in entry.sites}
    extra = {"cuda_device_mode": lambda: cpu_compat.is_applied(),
             "sdpa_kv_quant_module": lambda: SDPAttention in QuantModuleRegistry,
             "modelopt_exporter_imports": lambda: (uem.has_mcore, hasattr(uem, "HybridModel")),
             "block_quant_cpu": lambda: block_quant_cpu.is_installed(),
             "minitron_local_spec": lambda: torch.nn.RMSNorm in DMRegistry}
    if entry.name in extra:
        state["observed"] = extra[entry.name]()
    return state


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or a[k] == b[k] for k in a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime applies every entry here")
@pytest.mark.parametrize("entry", [p for p in ENTRIES if p.remove is not None], ids=lambda p: p.name)
def test_apply_remove_round_trip(entry, runtime):
    if entry.when == patches.ON_DEMAND:  # applied by the library function that needs it
        patches.apply(entry.name)
    assert patches.is_applied(entry.name), "init_runtime applied it"
    applied = _state(entry)
    patches.remove(entry.name)
    try:
        removed = _state(entry)
        assert not patches.is_applied(entry.name)
        assert not _same(applied, removed), "remove changed nothing"
        for target in entry.sites:  # an attribute swap puts upstream's object back
            assert _same({0: patches.upstream(target)}, {0: removed[target]}), target
    finally:
        patches.apply(entry.name)
    again = _state(entry)
    assert patches.is_applied(entry.name)
    if "observed" in applied:
        assert again["observed"] == applied["observed"]
    assert not _same(again, removed)
    patches.apply(entry.name)  # at most once: a second apply is a no-op
    assert _same(_state(entry), again)


def test_removed_device_mode_really_stops_rewriting(runtime):
    if not runtime.cpu_compat:
        pytest.skip("CPU shims are not active")
    patches.remove("cuda_device_mode")
    try:
        with pytest.raises((AssertionError, RuntimeError)):  # CPU-only torch: no CUDA device
            torch.zeros(1, device="cuda")
    finally:
        patches.apply("cuda_device_mode")
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_runtime_applies_by_device_and_switches(monkeypatch):
    names = lambda *a: set(patches.selected(*a))  # noqa: E731
    cpu, fast, always = (set(n for n in (p.name for p in ENTRIES) if patches.get(n).when == w)
                         for w in (patches.CPU, patches.CPU_FAST, patches.ALWAYS))
    assert names("cpu", False) == cpu | fast | always
    assert names("cuda", True) == always
    assert names("cpu", True) == fast | always  # a CPU run on a GPU machine: no CUDA shims
    monkeypatch.setenv("PT_NO_CPU_COMPAT", "1")
    monkeypatch.setenv("PT_NO_FASTPATH", "1")
    assert names("cpu", False) == always
    assert "kv_cache_rotated_keys" in always and set(patches.group("fastpath")) == fast


def test_listing_names_every_entry(runtime):
    text = patches.listing()
    for p in ENTRIES:
        assert f"- {p.name} [" in text and p.site in text
    assert "[call site]" in text and "[applied]" in text


def test_fastpath_group_toggles(runtime):
    assert fastpath.is_applied()
    fastpath.remove()
    try:
        assert not fastpath.is_applied()
    finally:
        fastpath.apply()
    assert fastpath.is_applied()


def test_importing_the_package_changes_nothing_upstream(tmp_path):
    """In a fresh process: the upstream modules the package imports are imported first, then
    every module of post_training (the checkpoint tools and CLI modules too; not ``__main__``
    modules, which run a CLI); megatron-core, ModelOpt, transformers and torch look the same
    before and after (module and class namespaces, ModelOpt's registries, torch's function-mode
    stack, the block-quantization op's kernels, every registry site)."""
    script, listed = ROOT / "tests" / "workers" / "import_snapshot.py", tmp_path / "listed.json"
    env = clean_env()
    for mode in ("list", "check"):
        res = subprocess.run([sys.executable, str(script), mode, str(listed)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["modules"] > 50
    assert result["differences"] == []
