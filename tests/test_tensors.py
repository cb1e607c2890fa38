"""checkpoint/tensors.read_safetensors against safetensors' own reader, and the memory it gives back."""
import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint.tensors import CheckpointError, read_safetensors

STATE = {"f32": torch.randn(3, 4, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
         "i64": torch.arange(5), "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 3),
         "bool": torch.tensor([True, False, True]), "u8": torch.arange(7, dtype=torch.uint8),
         "f8": torch.randn(4).to(torch.float8_e4m3fn), "f64": torch.randn(3).double()}


@pytest.fixture
def file(tmp_path):
    save_file(STATE, tmp_path / "x.safetensors", metadata={"format": "pt"})
    return tmp_path / "x.safetensors"


def test_same_tensors_as_safetensors(file):
    ours = read_safetensors(file)
    with safe_open(str(file), framework="pt") as f:
        assert set(ours) == set(f.keys())
        for k in f.keys():
            ref = f.get_tensor(k)
            assert ours[k].dtype == ref.dtype and ours[k].shape == ref.shape, k
            assert torch.equal(ours[k].view(torch.uint8) if k == "f8" else ours[k],
                               ref.view(torch.uint8) if k == "f8" else ref), k


def test_some_keys_and_a_dtype(file):
    ours = read_safetensors(file, dtype=torch.float16, keys=["f32", "i64"])
    assert set(ours) == {"f32", "i64"} and ours["f32"].dtype == torch.float16 and ours["i64"].dtype == torch.int64
    assert torch.equal(ours["f32"], STATE["f32"].half())


def test_writing_a_tensor_leaves_the_file_alone(file):
    read_safetensors(file, keys=["f32"])["f32"].add_(1)
    assert torch.equal(read_safetensors(file, keys=["f32"])["f32"], STATE["f32"])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_files_are_one_line(file, damage):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 100)
    with pytest.raises(CheckpointError) as e:
        read_safetensors(file)
    assert "truncated or corrupt" in str(e.value) and "\n" not in str(e.value)


def rss_file_mib() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssFile"].split()[0]) / 1024


def test_a_dropped_tensor_gives_its_pages_back(tmp_path):
    """A weight replaced after loading (packing does so) must not stay resident because the file's
    other tensors are still alive, as with one mapping of the whole file."""
    save_file({"big": torch.randn(64, 1024, 256), "small": torch.randn(8)}, tmp_path / "x.safetensors")
    state = read_safetensors(tmp_path / "x.safetensors")
    before = rss_file_mib()
    state["big"].sum()  # reads its 64 MiB
    touched = rss_file_mib()
    del state["big"]
    gc.collect()
    assert touched - before > 48 and rss_file_mib() - before < 8, (before, touched, rss_file_mib())
    assert state["small"].shape == (8,)


def test_loading_builds_the_models_without_their_initializers(sd1):
    """Models built on the meta device to be filled from a file run no nn.init fill: nn.Embedding's
    normal_ there would import torch._dynamo, the largest cost of a first load. In a fresh process."""
    code = (f"import sys; from weights import load_pipeline; load_pipeline({str(sd1)!r}); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["False"]
