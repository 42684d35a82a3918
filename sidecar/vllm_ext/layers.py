"""Engine-side parameter drop and restore (DESIGN.md section 5; issue 9), as worker methods.

`LayerDropExtension` is mixed into vLLM's Worker (through `SlofleetWorkerExtension`, the class
given to `--worker-extension-cls`). The sidecar calls its `slofleet_*` methods through the
engine's `/collective_rpc`, always with the engine paused (`/pause?mode=keep`): a forward step
that reaches a dropped layer raises inside the worker and kills the engine (vllm-cpu-facts.md),
so nothing here may run while the engine is generating, and the engine must stay paused while any
unit is dropped (until issue 10's pipeline mode routes around dropped layers).

What a drop does, per unit (`layer.<i>`, `embed`, `head`; see slofleet.sidecar.weightstore):
1. copy the unit's weights into the host weight store (skipped when the store already holds this
   model's copy: drops after the first are just frees);
2. free them in the engine: plain parameters get an empty storage; on the CPU build each Linear's
   weight lives only inside the packed GEMM handle of its `cpu_linear` closure (vLLM removed the
   parameter after packing, vllm-kunserve-facts.md), so the closure is deleted, which releases
   the oneDNN handle; then glibc is asked to give freed heap pages back (`malloc_trim`), so the
   worker's RSS really falls.
Restore reads the unit from the store, puts parameters back and re-packs each Linear with vLLM's
own `dispatch_cpu_unquantized_gemm` (the same call the model loader makes).

Reading a Linear weight back out of a packed handle: the handle computes y = x W^T, so feeding the
identity (in row chunks) yields W^T exactly (each output is one weight times 1.0, accumulated in
fp32, then rounded to the bf16 it already was). tests/test_layers_engine.py checks the bytes
against the checkpoint, so the store holds exactly the weights the engine ran with.

GPU builds: parameters are ordinary tensors; the same code copies them to the host store and
replaces their storage (then empties the CUDA cache). Captured CUDA graphs would keep stale
addresses, so per-layer drop is refused unless cudagraph mode is NONE, and whole-instance standby
on GPU uses vLLM's sleep mode from the sidecar instead. That path is written but UNTESTED here (no
GPU in CI).

Every touch of a vLLM-internal attribute goes through `_Internals` below; tests/test_layers_internals.py
checks each one against the installed vLLM, so an upgrade that renames them fails there, loudly.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from slofleet.sidecar.weightstore import StoreError, TensorEntry, WeightStore, signature_of, validate_unit

# The protocol of the dicts below; the sidecar's memory service checks it.
LAYERS_PROTOCOL = 1

KIND_PARAM = "param"  # an ordinary parameter: restore puts its data back
KIND_LINEAR_PACKED = "linear_packed"  # CPU: weight only inside cpu_linear; restore re-packs, removes it
KIND_LINEAR_KEPT = "linear_kept"  # CPU: weight kept beside cpu_linear (embeddings); restore re-packs
_IDENTITY_CHUNK_ROWS = 1024


class DropError(Exception):
    """A refused command: `code` is the gRPC status name the sidecar returns, `field` the
    request field at fault."""

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(message)
        self.code, self.field, self.message = code, field, message

    def to_dict(self) -> dict[str, Any]:
        return {"ok": False, "code": self.code, "field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class _Dropped:
    """What the worker remembers of a dropped unit: its store entries (the parameters are empty
    now, so their shapes must come from here) and the cpu_linear modules to re-pack on restore
    ({module name: remove_weight})."""

    entries: tuple[TensorEntry, ...]
    repack: dict[str, bool]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


class _Internals:
    """All access to vLLM internals for drop/restore, in one place (see the module docstring)."""

    CPU_LINEAR_ATTR = "cpu_linear"

    @staticmethod
    def model(worker: Any) -> torch.nn.Module:
        return worker.model_runner.model

    @staticmethod
    def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.model.layers

    @staticmethod
    def embed_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        return [("model.embed_tokens", model.model.embed_tokens)]

    @staticmethod
    def head_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        return [("model.norm", model.model.norm), ("lm_head", model.lm_head)]

    @staticmethod
    def is_cpu() -> bool:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())

    @staticmethod
    def repack_cpu_linear(module: torch.nn.Module, remove_weight: bool) -> None:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(module, remove_weight)

    @staticmethod
    def linear_weight_shape(module: torch.nn.Module) -> tuple[int, int]:
        """The (out, in) shape of a Linear whose weight parameter vLLM emptied after packing."""
        return int(sum(module.output_partition_sizes)), int(module.input_size_per_partition)

    @staticmethod
    def model_identity(worker: Any) -> dict[str, Any]:
        mc = worker.vllm_config.model_config
        pc = worker.vllm_config.parallel_config
        return {
            "model": str(mc.model),
            "revision": str(mc.revision or ""),
            "dtype": str(mc.dtype),
            "quantization": str(mc.quantization or ""),
            "tp": [int(pc.tensor_parallel_size), int(worker.rank)],
            "pp": int(pc.pipeline_parallel_size),
        }

    @staticmethod
    def sleep_mode_enabled(worker: Any) -> bool:
        return bool(worker.vllm_config.model_config.enable_sleep_mode)

    @staticmethod
    def cudagraph_mode(worker: Any) -> str:
        mode = worker.vllm_config.compilation_config.cudagraph_mode
        return str(getattr(mode, "name", mode))


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _trim_heap() -> float:
    """Return freed heap pages to the OS: freed weight buffers otherwise stay in glibc's arenas
    and the process RSS does not fall. No gc.collect(): the dropped closures and storages hold no
    reference cycles, so they are freed when their last reference goes, and a full collection of
    the engine process costs ~0.5 s. Returns the seconds malloc_trim took."""
    start = time.perf_counter()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_available():  # GPU build (UNTESTED here): hand freed blocks back to the device
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _units_arg(units: str, field: str) -> list[str]:
    names = [u.strip() for u in units.split(",") if u.strip()]
    if not names:
        raise DropError("INVALID_ARGUMENT", field, f"{field}: no unit given; name e.g. 'layer.3'")
    for u in names:
        try:
            validate_unit(u)
        except StoreError as e:
            raise DropError("INVALID_ARGUMENT", field, str(e)) from e
    if len(set(names)) != len(names):
        raise DropError("INVALID_ARGUMENT", field, f"{field}: a unit is named twice in {names}")
    return names


def _order(unit: str) -> tuple[int, int]:
    """Restore order: embed, layers by index, head (a tied lm_head re-packs the embedding's weight)."""
    if unit == "embed":
        return (0, 0)
    if unit == "head":
        return (2, 0)
    return (1, int(unit.split(".")[1]))


class LayerDropExtension:
    """Worker methods for drop/restore; the sidecar's `slofleet.sidecar.memory` calls them."""

    model_runner: Any
    vllm_config: Any
    rank: int

    # --- state kept in the worker (the sidecar is stateless across restarts) ----------------
    def _slofleet_dropped(self) -> dict[str, _Dropped]:
        """unit -> what restoring it needs; lives as long as the engine process."""
        state = self.__dict__.get("_slofleet_dropped_units")
        if state is None:
            state = self.__dict__["_slofleet_dropped_units"] = {}
        return state

    def _slofleet_model_fingerprint(self) -> str:
        ident = _Internals.model_identity(self)
        ident["units"] = len(_Internals.decoder_layers(_Internals.model(self)))
        return hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=12).hexdigest()

    def _slofleet_all_units(self) -> list[str]:
        n = len(_Internals.decoder_layers(_Internals.model(self)))
        return ["embed", *(f"layer.{i}" for i in range(n)), "head"]

    def _slofleet_unit_modules(self, unit: str) -> list[tuple[str, torch.nn.Module]]:
        model = _Internals.model(self)
        if unit == "embed":
            return _Internals.embed_modules(model)
        if unit == "head":
            return _Internals.head_modules(model)
        index = int(unit.split(".")[1])
        layers = _Internals.decoder_layers(model)
        if not 0 <= index < len(layers):
            raise DropError(
                "INVALID_ARGUMENT", "layers",
                f"layers: layer {index} does not exist; the model has layers 0..{len(layers) - 1}",
            )  # fmt: skip
        return [(f"model.layers.{index}", layers[index])]

    def _slofleet_tensors(self, unit: str) -> Iterator[tuple[TensorEntry, torch.nn.Module, str]]:
        """The unit's weights as store entries (shape/dtype known without reading the bytes), with
        the module and attribute that hold each. Parameters shared with another unit (a tied
        lm_head) belong to the unit that owns them (the embedding)."""
        cpu = _Internals.is_cpu()
        shared = set()
        if unit == "head":
            shared = {
                id(p) for _, m in _Internals.embed_modules(_Internals.model(self)) for p in m.parameters()
            }
        seen: set[int] = set()
        for prefix, root in self._slofleet_unit_modules(unit):
            for mname, module in root.named_modules(prefix=prefix):
                for pname, param in module.named_parameters(recurse=False):
                    if id(param) in seen or id(param) in shared:
                        continue
                    seen.add(id(param))
                    name = f"{mname}.{pname}"
                    packed = cpu and pname == "weight" and hasattr(module, _Internals.CPU_LINEAR_ATTR)
                    if packed and param.numel() == 0:
                        shape = _Internals.linear_weight_shape(module)
                        kind = KIND_LINEAR_PACKED
                    else:
                        shape = tuple(param.shape)
                        kind = KIND_LINEAR_KEPT if packed else KIND_PARAM
                    nbytes = int(torch.Size(shape).numel()) * param.element_size()
                    yield (
                        TensorEntry(name, _dtype_name(param.dtype), tuple(shape), kind, 0, nbytes),
                        module,
                        pname,
                    )

    def _slofleet_read_weight(self, entry: TensorEntry, module: torch.nn.Module, pname: str) -> torch.Tensor:
        param = getattr(module, pname)
        if entry.kind != KIND_LINEAR_PACKED:
            return param.data
        linear = getattr(module, _Internals.CPU_LINEAR_ATTR)
        out_features, in_features = entry.shape
        dtype = getattr(torch, entry.dtype)
        rows = []
        with torch.no_grad():
            for start in range(0, in_features, _IDENTITY_CHUNK_ROWS):
                stop = min(in_features, start + _IDENTITY_CHUNK_ROWS)
                eye = torch.zeros(stop - start, in_features, dtype=dtype)
                eye[:, start:stop] = torch.eye(stop - start, dtype=dtype)
                rows.append(linear(eye, param, None))  # rows start..stop of W^T
        weight_t = torch.cat(rows)
        if tuple(weight_t.shape) != (in_features, out_features):
            raise RuntimeError(
                f"{entry.name}: unpacked shape {tuple(weight_t.shape)} != {(in_features, out_features)}"
            )
        return weight_t.t().contiguous()

    def _slofleet_save_unit(self, store: WeightStore, unit: str, model: str) -> tuple[int, bool]:
        """Make sure the store holds this unit; returns (bytes, whether it was written now)."""
        items = list(self._slofleet_tensors(unit))
        signature = signature_of(e for e, _, _ in items)
        existing = store.matching(unit, model, signature)
        if existing is not None:
            return existing.nbytes, False
        writer = store.writer(
            unit, model=model, tensors=[e for e, _, _ in items], writer=f"engine pid {os.getpid()}"
        )
        try:
            for placed, (_, module, pname) in zip(writer.entry.tensors, items, strict=True):
                writer.pad_to(placed.offset)
                writer.write(_as_bytes(self._slofleet_read_weight(placed, module, pname)))
            entry = writer.commit()
        except BaseException:
            writer.abort()
            raise
        return entry.nbytes, True

    def _slofleet_free_unit(self, unit: str) -> dict[str, bool]:
        repack: dict[str, bool] = {}
        for entry, module, pname in list(self._slofleet_tensors(unit)):
            param = getattr(module, pname)
            if entry.kind in (KIND_LINEAR_PACKED, KIND_LINEAR_KEPT):
                repack[entry.name.rsplit(".", 1)[0]] = entry.kind == KIND_LINEAR_PACKED
                delattr(module, _Internals.CPU_LINEAR_ATTR)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        if unit == "head":  # a tied lm_head: its packed copy goes too; its weight is the embedding's
            for mname, module in _Internals.head_modules(_Internals.model(self)):
                if hasattr(module, _Internals.CPU_LINEAR_ATTR) and mname not in repack:
                    repack[mname] = False
                    delattr(module, _Internals.CPU_LINEAR_ATTR)
        return repack

    # --- RPC methods (strings in, JSON dicts out; see worker.py's conventions) ---------------
    def slofleet_memory_status(self) -> dict[str, Any]:
        """What is resident and what is dropped, and the numbers the sidecar exports."""
        dropped = self._slofleet_dropped()
        unit_bytes = {
            u: dropped[u].nbytes if u in dropped else sum(e.nbytes for e, _, _ in self._slofleet_tensors(u))
            for u in self._slofleet_all_units()
        }
        return {
            "ok": True,
            "protocol": LAYERS_PROTOCOL,
            "pid": os.getpid(),
            "rank": int(self.rank),
            "platform": "cpu" if _Internals.is_cpu() else "gpu",
            "cudagraph_mode": _Internals.cudagraph_mode(self),
            "sleep_mode": _Internals.sleep_mode_enabled(self),
            "model_fingerprint": self._slofleet_model_fingerprint(),
            "layers_total": len(_Internals.decoder_layers(_Internals.model(self))),
            "units": self._slofleet_all_units(),
            "dropped": sorted(dropped, key=_order),
            "unit_bytes": unit_bytes,
            "rss_bytes": _rss_bytes(),
        }

    def slofleet_drop(self, units: str, store_dir: str, keep_host_copy: str = "1") -> dict[str, Any]:
        """Drop `units` (comma-separated) into the store at `store_dir`. The engine must be
        paused. All units are saved before any is freed, so a failed save frees nothing."""
        try:
            names = _units_arg(units, "layers")
            dropped = self._slofleet_dropped()
            again = [u for u in names if u in dropped]
            if again:
                raise DropError(
                    "FAILED_PRECONDITION", "layers",
                    f"layers: {', '.join(again)} already dropped; restore them first",
                )  # fmt: skip
            if not _Internals.is_cpu() and _Internals.cudagraph_mode(self) != "NONE":
                raise DropError(
                    "FAILED_PRECONDITION", "layers",
                    "layers: per-layer drop on GPU needs cudagraph mode NONE (--enforce-eager): captured "
                    "graphs keep the old weight addresses; use Standby (vLLM sleep mode) instead",
                )  # fmt: skip
            for u in names:
                self._slofleet_unit_modules(u)  # validates layer indices before any work
            keep = keep_host_copy not in ("0", "false", "False")
            store = WeightStore(store_dir)
            model = self._slofleet_model_fingerprint()
            start = time.perf_counter()
            rss_before = _rss_bytes()
            sizes: dict[str, int] = {}
            written: list[str] = []
            for u in names:
                if keep:
                    sizes[u], now = self._slofleet_save_unit(store, u, model)
                    if now:
                        written.append(u)
                else:
                    sizes[u] = sum(e.nbytes for e, _, _ in self._slofleet_tensors(u))
            saved = time.perf_counter()
            for u in names:
                entries = tuple(e for e, _, _ in self._slofleet_tensors(u))
                dropped[u] = _Dropped(entries, self._slofleet_free_unit(u))
                if not keep:
                    store.delete(u)
            trim = _trim_heap()
            done = time.perf_counter()
            return {
                "ok": True,
                "dropped": names,
                "written": written,
                "bytes": sum(sizes.values()),
                "save_seconds": saved - start,
                "free_seconds": done - saved,
                "trim_seconds": trim,
                "seconds": done - start,
                "rss_before": rss_before,
                "rss_after": _rss_bytes(),
                "dropped_now": sorted(dropped, key=_order),
            }
        except DropError as e:
            return e.to_dict()
        except StoreError as e:
            return DropError("FAILED_PRECONDITION", "store", str(e)).to_dict()

    def slofleet_restore(self, units: str, store_dir: str) -> dict[str, Any]:
        """Restore dropped `units` (comma-separated, or "" for all dropped) from the store. All
        units are checked in the store before any is restored."""
        try:
            dropped = self._slofleet_dropped()
            names = _units_arg(units, "layers") if units.strip() else sorted(dropped, key=_order)
            if not names:
                raise DropError(
                    "FAILED_PRECONDITION", "layers", "layers: no layer is dropped; nothing to restore"
                )
            resident = [u for u in names if u not in dropped]
            if resident:
                for u in resident:
                    self._slofleet_unit_modules(u)
                raise DropError(
                    "FAILED_PRECONDITION", "layers",
                    f"layers: {', '.join(resident)} not dropped (resident already); nothing to restore",
                )  # fmt: skip
            names.sort(key=_order)
            store = WeightStore(store_dir)
            model = self._slofleet_model_fingerprint()
            entries = {}
            missing = []
            for u in names:
                entry = store.matching(u, model, signature_of(dropped[u].entries))
                if entry is None:
                    missing.append(u)
                entries[u] = entry
            if missing:
                raise DropError(
                    "FAILED_PRECONDITION", "source_peer",
                    f"source_peer: {', '.join(missing)} not in the host store {store_dir} for this model; "
                    "restore from a peer that holds them",
                )  # fmt: skip
            start = time.perf_counter()
            rss_before = _rss_bytes()
            total = 0
            for u in names:
                total += self._slofleet_load_unit(store, entries[u], dropped[u].repack)
                del dropped[u]
            done = time.perf_counter()
            return {
                "ok": True,
                "restored": names,
                "bytes": total,
                "seconds": done - start,
                "rss_before": rss_before,
                "rss_after": _rss_bytes(),
                "dropped_now": sorted(dropped, key=_order),
            }
        except DropError as e:
            return e.to_dict()
        except StoreError as e:
            return DropError("FAILED_PRECONDITION", "store", str(e)).to_dict()

    def slofleet_save_units(self, units: str, store_dir: str) -> dict[str, Any]:
        """Copy resident `units` into the store without dropping them, so later drops are just
        frees and peers can restore from this instance."""
        try:
            dropped = self._slofleet_dropped()
            names = _units_arg(units, "layers")
            gone = [u for u in names if u in dropped]
            if gone:
                raise DropError("FAILED_PRECONDITION", "layers", f"layers: {', '.join(gone)} are dropped")
            for u in names:
                self._slofleet_unit_modules(u)
            store = WeightStore(store_dir)
            model = self._slofleet_model_fingerprint()
            start = time.perf_counter()
            written = [u for u in names if self._slofleet_save_unit(store, u, model)[1]]
            return {"ok": True, "saved": names, "written": written, "seconds": time.perf_counter() - start}
        except DropError as e:
            return e.to_dict()
        except StoreError as e:
            return DropError("FAILED_PRECONDITION", "store", str(e)).to_dict()

    def _slofleet_load_unit(self, store: WeightStore, entry: Any, repack: dict[str, bool]) -> int:
        buf = store.read_bytes(entry)
        holders: dict[str, torch.nn.Module] = {}
        for prefix, root in self._slofleet_unit_modules(entry.unit):
            holders.update(root.named_modules(prefix=prefix))
        for t in entry.tensors:
            mname, pname = t.name.rsplit(".", 1)
            module = holders[mname]
            param = getattr(module, pname)
            device = param.device
            view = torch.frombuffer(buf, dtype=torch.uint8, count=t.nbytes, offset=t.offset)
            value = view.view(getattr(torch, t.dtype)).reshape(t.shape)
            if t.kind == KIND_LINEAR_PACKED:
                setattr(module, pname, torch.nn.Parameter(value, requires_grad=False))
            else:
                param.data = value.to(device) if device.type != "cpu" else value.clone()
        for mname, remove_weight in repack.items():
            _Internals.repack_cpu_linear(holders[mname], remove_weight)
        return entry.nbytes
