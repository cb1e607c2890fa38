"""The methods this project compares, one file each (methods/base.py says what a method is):

    sd        plain Stable Diffusion: classifier-free guidance (Ho & Salimans 2022)
    negative  a classic negative prompt in place of the unconditional branch
    static    the VL-DNP paper's static baseline: a fixed negative as a third branch from the first step
    vldnp     VL-DNP (Chang et al. 2025): the negative is what a proposer sees in the predicted image
    sld       Safe Latent Diffusion (Schramowski et al. 2023) at its four presets
    safree    SAFREE (Yoon et al. 2025): the prompt's embedding filtered off the concepts' subspace
    dng       Dynamic Negative Guidance (Koulischer et al. 2025): a fixed negative whose strength follows
              the posterior that the image holds it

generate.py --method NAME makes one image as a method does; evaluate.py --methods compares them.
Every method is a leaf (leaves.py): a fork deletes a method's file and its line below.
"""
from leaves import Leaves
from methods.base import Method, Plan

__all__ = ["METHODS", "Method", "Plan"]

METHODS: Leaves = Leaves("method", {
    "sd": "methods.sd:PlainSD",
    "negative": "methods.negative:ClassicNegative",
    "static": "methods.static:StaticNegative",
    "vldnp": "methods.vldnp:VLDNP",
    "sld": "methods.sld:SLD",
    "safree": "methods.safree:Safree",
    "dng": "methods.dng:DNG",
})
