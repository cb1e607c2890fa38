"""Tensors in and out of safetensors files, and strict loading into models built on the meta device.

Tensors are read one at a time, straight to the target device and dtype, into models that hold no
memory until the tensors are assigned, so loading never holds a second full copy of the weights.
"""
import json
import mmap
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why and what to do, in one line."""


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def to_dtype(dtype) -> torch.dtype:
    """A torch dtype, or its name as the command lines take it (fp32, fp16, bf16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return DTYPES[dtype]


def read_json(file: Path, needed: str = "") -> dict:
    """A JSON file, or a CheckpointError: missing (and what needs it), no file (a folder; a link to /dev/zero or
    a FIFO, never read), unreadable, not JSON, or past Python's json limits."""
    if Path(file).exists() and not Path(file).is_file():
        raise CheckpointError(f"{file}: not a file")
    try:
        return json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing{f' ({needed})' if needed else ''}") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read it ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


# safetensors' dtype names
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                      "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path, device=None, dtype=None, keys=None) -> dict[str, torch.Tensor]:
    """Reads (some of) a safetensors file, one tensor at a time, to `device` and `dtype`
    (floating-point tensors only). A corrupt or truncated file gives a CheckpointError.

    On the CPU each tensor is a copy-on-write view of a mapping of its own bytes of the file: nothing
    is copied until it is used, and its pages go back when it is dropped. safetensors' own reader maps
    the whole file once, which keeps every page read resident while any tensor of the file lives, so
    weights replaced after loading (model/packing.py) would cost their memory twice."""
    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header: offsets in order, within the file
            keys = list(f.keys()) if keys is None else keys
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
            out = {}
            for k in keys:
                t = _mapped(file, header[k], 8 + size).to(device or "cpu")
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            return out
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _mapped(file, entry: dict, data_start: int) -> torch.Tensor:
    """The tensor a header entry describes, over a private mapping of its bytes."""
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {entry['dtype']} is not supported")
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    start, end = (data_start + offset for offset in entry["data_offsets"])
    if end == start:
        return torch.empty(entry["shape"], dtype=dtype)
    first = start - start % mmap.ALLOCATIONGRANULARITY  # mappings start on a granularity boundary
    mapping = mmap.mmap(file.fileno(), end - first, offset=first, access=mmap.ACCESS_COPY)
    count = (end - start) // dtype.itemsize
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=start - first).view(entry["shape"])


def safetensors_header(path: Path) -> tuple[dict[str, tuple], dict[str, str]]:
    """From the header alone: key -> shape, and the file's free-form string metadata (its __metadata__,
    {} when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips torch.nn.init's fills: on the meta device they compute nothing, and normal_ there
    (nn.Embedding's) imports torch._dynamo, which costs more than the rest of loading."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def meta_model(model_cls, config):
    """`model_cls(config)` on the meta device: its structure and shapes, no memory, no initializer run."""
    with torch.device("meta"), _SkipInit():
        return model_cls(config)


def load_strict(model_cls, config, state: dict[str, torch.Tensor], where: str, hint: str = "", names=None):
    """Builds `model_cls(config)` on the meta device and fills it from `state`, which must hold exactly the model's
    tensors, each of the model's shape and floating point. The result needs no initialization and holds only the tensors
    in `state`. `names` maps our keys to the file's, for the messages."""
    model = meta_model(model_cls, config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    name = lambda k: (names or {}).get(k, k)
    missing = [name(k) for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{name(k)} {tuple(state[k].shape)} (model: {expected[k]})" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    integer = [f"{name(k)} ({str(state[k].dtype).removeprefix('torch.')})" for k in expected
               if k in state and not state[k].is_floating_point()]
    if missing or unexpected or wrong or integer:
        parts = [f"{len(missing)} missing (first: {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of the wrong shape (first: {wrong[0]})" if wrong else "",
                 f"{len(integer)} not floating point (first: {integer[0]})" if integer else ""]
        raise CheckpointError(f"{where}: tensors do not fit {model_cls.__name__}: "
                              + ", ".join(p for p in parts if p) + (f"; {hint}" if hint else ""))
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()
