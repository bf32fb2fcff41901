"""Count host syncs on the CPU: the calls that, on a GPU, make the host wait for the device.

A CPU run never waits, so the calls are recognised by what they are: a Python-level tensor
method that hands data to the host (`item`, `tolist`, `cpu`, `numpy`, `bool(t)`, `int(t)`,
...) seen by a TorchFunctionMode, and the ATen ops whose output size or value the host needs
(`_local_scalar_dense`, `nonzero`, `masked_select`, boolean indexing, ...) seen by a
TorchDispatchMode. A call the function mode counts is not counted again by the ops it runs
(`t.item()` is one sync, not two), and reading a host copy it counted is free
(`t.cpu().numpy()` is one sync). Both modes are per thread: only the calling thread's
syncs are seen. Bookkeeping here is plain Python, never torch.
"""
from __future__ import annotations

import threading
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods that give the host a value or a host copy (the first four by Python protocol).
SYNC_METHODS = frozenset({"__bool__", "__int__", "__float__", "__index__", "__array__", "item", "tolist", "cpu",
                          "numpy", "nonzero", "masked_select", "argwhere", "unique", "unique_consecutive"})
# Ops whose result's size or value the host must read.
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
                      "unique_consecutive", "is_nonzero", "repeat_interleave"})
INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()


@dataclass
class HostSyncs:
    seen: list[str] = field(default_factory=list)  # "op at path:line in function"

    @property
    def count(self) -> int:
        return len(self.seen)

    def __str__(self) -> str:
        return f"{self.count} host sync(s)" + "".join(f"\n  {s}" for s in self.seen)


def _where() -> str:
    """The innermost project frame outside this module and torch: where the sync was asked for."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != HERE and ROOT in path.parents and ".venv" not in path.parts:
            return f"{path.relative_to(ROOT)}:{frame.lineno} in {frame.name}"
    return "?"


def _is_boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _moves_to_host(args, kwargs) -> bool:
    """`t.to("cpu")` / `t.to(torch.device("cpu"))` on a tensor that is not already there."""
    targets = [*args[1:], kwargs.get("device")]
    to_cpu = any((isinstance(a, str) and a.startswith("cpu")) or (isinstance(a, torch.device) and a.type == "cpu")
                 for a in targets)
    return to_cpu and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"


class _Recorder:
    def __init__(self, syncs: HostSyncs):
        self.syncs, self.local = syncs, threading.local()
        self.host_copies: dict[int, weakref.ref] = {}  # results of counted copies to the host, by id

    def inside(self) -> bool:
        return getattr(self.local, "depth", 0) > 0

    def is_host_copy(self, value) -> bool:
        ref = self.host_copies.get(id(value))
        return ref is not None and ref() is value

    def add_host_copy(self, value) -> None:
        if isinstance(value, torch.Tensor):
            key = id(value)
            self.host_copies[key] = weakref.ref(value, lambda _, key=key: self.host_copies.pop(key, None))

    def record(self, name: str) -> None:
        self.syncs.seen.append(f"{name} at {_where()}")


class _FunctionMode(TorchFunctionMode):
    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS or (name == "to" and _moves_to_host(args, kwargs)):
            if not self.recorder.inside() and not (args and self.recorder.is_host_copy(args[0])):
                self.recorder.record(name)
            self.recorder.local.depth = getattr(self.recorder.local, "depth", 0) + 1
            try:
                result = func(*args, **kwargs)
            finally:
                self.recorder.local.depth -= 1
            if name in ("cpu", "to"):
                self.recorder.add_host_copy(result)
            return result
        return func(*args, **kwargs)


class _DispatchMode(TorchDispatchMode):
    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if not self.recorder.inside():
            # repeat_interleave without output_size must read its repeats; with it, it need not.
            if name == "repeat_interleave" and kwargs.get("output_size") is not None:
                pass
            elif name in SYNC_OPS or (name in INDEX_OPS and _is_boolean_index(args)):
                self.recorder.record(f"aten.{name}")
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs():
    """`with count_host_syncs() as syncs: ...`, then `syncs.count` and `str(syncs)` (each sync
    with the project line that asked for it)."""
    syncs = HostSyncs()
    recorder = _Recorder(syncs)
    with _FunctionMode(recorder), _DispatchMode(recorder):
        yield syncs
