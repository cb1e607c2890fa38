"""What an original single file says about its prediction type, which its weights cannot show: SD2's
512 px ε model and its 768 px v model have the same tensors, of the same shapes.

Where a file says it, in the order trusted:

    metadata modelspec.prediction_type   "epsilon" or "v": Stability's ModelSpec, which kohya's sd-scripts
                                         and other trainers write into the files they save
    a v_pred tensor                      an empty marker that ComfyUI reads as v, with a ztsnr tensor
                                         beside it for a zero-terminal-SNR schedule
    metadata modelspec.architecture      "stable-diffusion-v2-768-v", "stable-diffusion-v2-512", "...-v1"
    a global_step tensor of 875000       the last step of SD 2.0-base, the one value diffusers' legacy
                                         single-file loader reads as ε

A file that says none of these is ε if it is SD1 (every SD1 release is) and assumed ε if it is SD2,
which a warning on stderr says, with how to choose v. diffusers' from_single_file takes every SD2
file as v instead (its legacy path: all but global_step 875000); neither guess fits every file.
"""
from dataclasses import dataclass

from checkpoint.tensors import CheckpointError

# Tensors some single files carry that are no weights: what they say is read here.
MARKERS = ("v_pred", "ztsnr", "global_step")

NAMES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
         "v-prediction": "v_prediction", "sample": "sample"}
ARCHITECTURES = {"stable-diffusion-v1": "epsilon", "stable-diffusion-v2-512": "epsilon",
                 "stable-diffusion-v2-768-v": "v_prediction"}
SD2_BASE_GLOBAL_STEP = 875000


@dataclass
class Prediction:
    type: str  # "epsilon", "v_prediction" or "sample", as SchedulerConfig names them
    said_by: str | None  # what in the file says so; None when assumed
    zero_snr: bool = False  # the schedule is rescaled to zero terminal SNR


def read_prediction(metadata: dict[str, str], markers: dict, family: str, where: str) -> Prediction:
    """The prediction type a single file states, from its safetensors `metadata` and the values of the
    `markers` it holds (name -> tensor). A stated type that we cannot run is a CheckpointError."""
    zero_snr = "ztsnr" in markers
    stated = metadata.get("modelspec.prediction_type")
    if stated is not None:
        if stated.strip().lower() not in NAMES:
            raise CheckpointError(f"{where}: its metadata says modelspec.prediction_type={stated!r}, which is not "
                                  "epsilon, v or sample; choose one with --prediction-type (prediction_type= in load_pipeline)")
        return Prediction(NAMES[stated.strip().lower()], "modelspec.prediction_type", zero_snr)
    if "v_pred" in markers:
        return Prediction("v_prediction", "v_pred", zero_snr)
    architecture = metadata.get("modelspec.architecture", "").strip().lower()
    if architecture in ARCHITECTURES:
        return Prediction(ARCHITECTURES[architecture], "modelspec.architecture", zero_snr)
    step = markers.get("global_step")
    if family == "sd2" and step is not None and step.numel() == 1 and int(step.item()) == SD2_BASE_GLOBAL_STEP:
        return Prediction("epsilon", f"global_step {SD2_BASE_GLOBAL_STEP} (SD 2.0-base)", zero_snr)
    # SD1 and SDXL base are ε models (SDXL's v fine-tunes carry v_pred); SD2 has both kinds.
    return Prediction("epsilon", {"sd1": "the SD1 family", "sdxl": "the SDXL family"}.get(family), zero_snr)


def written_metadata(prediction_type: str) -> dict[str, str]:
    """The ModelSpec entry that tells readers a file's prediction type."""
    return {"modelspec.prediction_type": {"v_prediction": "v"}.get(prediction_type, prediction_type)}


def assumed_warning(name: str) -> str:
    """The one line that says an SD2 file was taken as ε and how to choose v."""
    return (f"warning: {name}: this SD2 single file does not say its prediction type; assuming epsilon (the 512 px "
            "models). A 768 px v model (v2-1_768-ema-pruned, 768-v-ema) needs --prediction-type v "
            "(prediction_type=\"v\" in load_pipeline)")
