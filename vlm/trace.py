"""VL-DNP's --trace (methods/vldnp.py): a JSON file of what each image's queries asked, got and did and,
beside it, the filmstrip of the x0 images sent (vlm/filmstrip.py, a leaf of its own). A leaf
(methods/vldnp.py:LEAVES): a copy without it writes no trace, and the PNG says what the hook did."""
import dataclasses
from pathlib import Path

from files import write_json
from leaves import Leaves

LEAVES = Leaves("trace part", {"filmstrip": "vlm.filmstrip:write_with_filmstrip"})


def trace_dict(hook) -> dict:
    """The trace of a DynamicNegatives hook: its settings, and each image's prompt and queries."""
    return {
        "method": "vldnp", "task": hook.task.name, "mode": hook.task.mode, "proposer": repr(hook.proposer),
        "query_steps": hook.query_steps, "negative_scale": hook.negative_scale,
        "asynchronous": hook.asynchronous, "decode_factor": hook.decode_factor,
        "preview_decoder": None if hook.decode_factor is None else getattr(hook.preview, "name", "vae"),
        "images": [{"image": b, "prompt": prompt, "queries": [dataclasses.asdict(q) for q in hook.trace[b]]}
                   for b, prompt in enumerate(hook.prompts)],
    }


def write_trace(hook, path, data: dict | None = None) -> Path:
    """Writes the trace as JSON at `path` (`data`, by default trace_dict(hook)) and, with vlm/filmstrip.py,
    the filmstrip of the images sent beside it. Closes the hook first, so the trace is complete."""
    hook.close()
    data = {**(data or trace_dict(hook)), "filmstrip": None}
    if not LEAVES.present("filmstrip"):
        return write_json(path, data)
    return LEAVES["filmstrip"](Path(path), data, hook.frames,
                               [[(q.step, q.error is not None) for q in row] for row in hook.trace])
