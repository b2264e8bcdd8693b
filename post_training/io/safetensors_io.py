"""The toolkit's one safetensors writer, in Hugging Face's layout.

Naming, as transformers' ``save_pretrained`` writes and ``from_pretrained`` reads: everything in
``model.safetensors`` when it fits in one shard; else ``model-00001-of-0000N.safetensors`` ... and
``model.safetensors.index.json`` = ``{"metadata": {"total_size": <tensor bytes>}, "weight_map":
{tensor: file}}`` (sorted by tensor name). A shard is closed when the next tensor would take it
past ``max_bytes``; a larger tensor gets a shard of its own.

Two ways to feed it, one file format and one finish:

- :meth:`ShardWriter.add`: tensors one by one (shapes not known ahead); the open shard is held in
  memory, written when closed, then read back and compared bitwise with what was added.
- :meth:`ShardWriter.stream`: every (name, shape, dtype) known ahead, tensors pulled from an
  iterator one at a time; each shard's header is written first, so memory stays near one tensor.

Shards get temporary names while being written (the ``-of-0000N`` is known only at the end).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch

from post_training.utils import UsageError

INDEX = "model.safetensors.index.json"
# torch dtype -> safetensors dtype code (the codes safetensors' Rust reader knows).
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
}
# A spec of a tensor to stream: (name, shape, dtype).
Spec = tuple[str, tuple[int, ...], torch.dtype]


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs included), which ``torch.equal`` does not give."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def read_header(path: Path) -> dict[str, dict]:
    """The header of a safetensors file (``__metadata__`` included); no tensor is read."""
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


class ShardWriter:
    """Writes tensors under ``root`` as described in the module doc; :meth:`finish` names the
    files and writes the index."""

    def __init__(self, root: Path, max_bytes: int = 1 << 62):
        self.root, self.max_bytes = Path(root), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_shared: dict[str, str] = {}
        self.pending_bytes = self.total_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []

    # ------------------------------------------------------------------ one by one

    def add(self, name: str, tensor: torch.Tensor, copy_of: str | None = None) -> None:
        """Queue a tensor; ``copy_of`` records (metadata ``shared``) that it was stored as a copy
        of a tensor it shared storage with."""
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.next_shard()
        self.pending[name] = tensor.contiguous()
        if copy_of is not None:
            self.pending_shared[name] = copy_of
        self.pending_bytes += size
        self.total_bytes += size

    def next_shard(self) -> None:
        """Close the open shard (if any): write it, then verify it with safetensors' reader."""
        if not self.pending:
            return
        from safetensors import safe_open

        meta = {"shared": json.dumps(self.pending_shared)} if self.pending_shared else {}
        path = self._write([(n, tuple(t.shape), t.dtype) for n, t in self.pending.items()],
                           iter(self.pending.items()), meta)
        with safe_open(path, framework="pt") as f:
            if set(f.keys()) != set(self.pending):
                raise RuntimeError(f"verification failed: {path.name} holds other keys than were written")
            for name, want in self.pending.items():
                if not same_bits(f.get_tensor(name), want):
                    raise RuntimeError(f"verification failed: {name} reads back different from its source")
        self.pending, self.pending_shared, self.pending_bytes = {}, {}, 0

    # ------------------------------------------------------------------ streamed

    def stream(self, specs: list[Spec], tensors: Iterator[tuple[str, torch.Tensor]],
               cast: torch.dtype | None = None) -> None:
        """Write ``tensors`` (given in ``specs`` order, checked against it) into shards planned
        from ``specs``; floating-point tensors are cast to ``cast`` when given."""
        self.next_shard()
        out = [(n, tuple(s), cast if cast is not None and dt.is_floating_point else dt) for n, s, dt in specs]
        group: list[Spec] = []
        size = 0
        for spec in out:
            nbytes = _nbytes(spec)
            if group and size + nbytes > self.max_bytes:
                self._write(group, tensors)
                group, size = [], 0
            group.append(spec)
            size += nbytes
            self.total_bytes += nbytes
        if group:
            self._write(group, tensors)

    # ------------------------------------------------------------------ finish

    def finish(self) -> list[str]:
        """Close the last shard, give the files their final names, write the index if sharded."""
        self.next_shard()
        if not self.parts:
            raise UsageError("no tensors to write")
        names = shard_names(len(self.parts))
        weight_map = {}
        for name, (path, keys) in zip(names, self.parts):
            os.replace(path, self.root / name)
            weight_map.update({k: name for k in keys})
        if len(names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names

    def _write(self, specs: list[Spec], tensors: Iterable[tuple[str, torch.Tensor]],
               metadata: dict[str, str] | None = None) -> Path:
        """One shard file: the header, then each tensor's bytes as it comes."""
        if sys.byteorder != "little":
            raise UsageError("safetensors is little-endian; this machine is not")
        path = self.root / f".part-{len(self.parts):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}  # transformers wants "format"
        offset = 0
        for name, shape, dtype in specs:
            if dtype not in ST_DTYPES:
                raise UsageError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + _nbytes((name, shape, dtype))]}
            offset += _nbytes((name, shape, dtype))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
        it = iter(tensors)
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape, dtype in specs:
                got, t = next(it)
                if got != name or tuple(t.shape) != tuple(shape):
                    raise UsageError(f"internal: expected {name} {shape}, the reader gave {got} {tuple(t.shape)}")
                f.write(t.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.parts.append((path, [s[0] for s in specs]))
        return path


def _nbytes(spec: Spec) -> int:
    return spec[2].itemsize * int(torch.Size(spec[1]).numel())
