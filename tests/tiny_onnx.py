"""Small ONNX models written straight in protobuf's wire format, for tests of the code that loads
NudeNet's classifier with onnxruntime (neither the `onnx` package nor torch.onnx, which needs it,
is installed). Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto, ...).

    linear_softmax(w, b)   x [N, 256, 256, 3] -> softmax(reshape(x, [N, -1]) @ w + b)   [N, K]

and what such a model should give on an image, computed with PIL and numpy (reference_probs).
"""
import numpy as np
import torch
from PIL import Image

FLOAT, STRING, INT64 = 1, 8, 7  # TensorProto.DataType
ATTRIBUTE_INT = 2  # AttributeProto.AttributeType


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value) -> bytes:
    """One field: an int as a varint, bytes / str / a message's bytes length-delimited."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def tensor(name: str, array: np.ndarray) -> bytes:
    data_type = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}[array.dtype]
    return (b"".join(field(1, d) for d in array.shape) + field(2, data_type) + field(8, name)
            + field(9, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()))


def value_info(name: str, shape, elem_type: int = FLOAT) -> bytes:
    """A tensor's name, shape and element type (float by default); a str dimension is symbolic."""
    dims = b"".join(field(1, field(2, d) if isinstance(d, str) else field(1, d)) for d in shape)
    return field(1, name) + field(2, field(1, field(1, elem_type) + field(2, dims)))


def node(op: str, inputs, outputs, **ints) -> bytes:
    attributes = b"".join(field(5, field(1, k) + field(3, v) + field(20, ATTRIBUTE_INT)) for k, v in ints.items())
    return (b"".join(field(1, i) for i in inputs) + b"".join(field(2, o) for o in outputs) + field(4, op)
            + attributes)


def model(nodes, initializers, inputs, outputs, opset: int = 13) -> bytes:
    graph = (b"".join(field(1, n) for n in nodes) + field(2, "tiny") + b"".join(field(5, t) for t in initializers)
             + b"".join(field(11, v) for v in inputs) + b"".join(field(12, v) for v in outputs))
    return field(1, 7) + field(2, "tests/tiny_onnx.py") + field(7, graph) + field(8, field(2, opset))


def linear_softmax(w: np.ndarray, b: np.ndarray, input_shape=("N", 256, 256, 3), softmax: bool = True,
                   output_type: int = FLOAT) -> bytes:
    """softmax(reshape(x, [N, -1]) @ w + b): w [H*W*C, K], b [K] float32; softmax=False gives logits; an
    `output_type` other than FLOAT casts the output to it (STRING: the numbers as text)."""
    k, out = w.shape[1], "probs" if output_type == FLOAT else "floats"
    nodes = [node("Reshape", ["x", "flat_shape"], ["flat"]), node("MatMul", ["flat", "w"], ["logits_nb"]),
             node("Add", ["logits_nb", "b"], ["logits" if softmax else out])]
    if softmax:
        nodes.append(node("Softmax", ["logits"], [out], axis=1))
    if output_type != FLOAT:
        nodes.append(node("Cast", [out], ["probs"], to=output_type))
    inits = [tensor("flat_shape", np.array([-1, w.shape[0]], dtype=np.int64)), tensor("w", w), tensor("b", b)]
    return model(nodes, inits, [value_info("x", input_shape)], [value_info("probs", ["N", k], output_type)])


PIXELS = 256 * 256 * 3


def linear_softmax_weights(seed: int, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Random w [PIXELS, K] (small, so that the softmax does not saturate) and zero b [K] for linear_softmax."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((PIXELS, k)) * 0.004).astype(np.float32), np.zeros(k, dtype=np.float32)


def pil_input(image: torch.Tensor) -> np.ndarray:
    """nudenet 2.x's loading, with PIL: resize((256, 256), NEAREST), img_to_array, / 255."""
    x = np.asarray(Image.fromarray(image.numpy()).resize((256, 256), Image.NEAREST), dtype=np.float32)
    x /= 255
    return x


def reference_probs(image: torch.Tensor, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[2] softmax(x @ w + b) in float64, from PIL's input."""
    logits = pil_input(image).reshape(-1).astype(np.float64) @ w.astype(np.float64) + b
    e = np.exp(logits - logits.max())
    return e / e.sum()
