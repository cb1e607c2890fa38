"""The PNG `parameters` text, in the layout AUTOMATIC1111 and other SD tools read: the prompt, the
negative prompt, then one line of `Key: value` settings. LoRAs are written as A1111 writes them: a
`<lora:name:scale>` tag per LoRA after the prompt, and their short hashes in "Lora hashes"."""
import json

SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M", "euler": "Euler",
                 "euler-a": "Euler a"}  # as those tools write them


def parameters_text(prompt: str, negative_prompt: str | None, *, steps: int, sampler: str, guidance_scale: float,
                    seed: int, width: int, height: int, model: str, loras=(), extra: dict | None = None) -> str:
    """`extra` holds further settings in order; a value with a comma is quoted, so the line still splits.
    `loras`: the LoRAs merged into the model (checkpoint/lora.py's LoraInfo)."""
    settings = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler), "CFG scale": f"{guidance_scale:g}",
                "Seed": seed, "Size": f"{width}x{height}", "Model": model, **(extra or {})}
    if loras:
        prompt = " ".join([prompt, *(lora.tag for lora in loras)])
        settings["Lora hashes"] = ", ".join(f"{lora.name}: {lora.hash}" for lora in loras)
    line = ", ".join(f"{k}: {json.dumps(v) if ',' in str(v) else v}" for k, v in settings.items())
    negative = [f"Negative prompt: {negative_prompt}"] if negative_prompt else []
    return "\n".join([prompt, *negative, line])
