"""generate.py's --init-image and --mask: the images read and checked before any model loads. A leaf
(generate.py:LEAVES), with the PNG reader (png_reader.py) and the edit itself (sampler/edit.py)."""
from methods.options import UsageError
from png_reader import read_image
from sampler.loop import EDITS


def read_edit(args) -> dict:
    """generate()'s edit arguments from --init-image, --mask and --strength; VL-DNP's --vlm-steps
    count the steps the edit takes."""
    if args.init_image is None:
        raise UsageError(f"{'--mask' if args.mask else '--strength'} edits an image: give the image with --init-image")
    try:
        edit = EDITS["img2img"]
        image = read_image(args.init_image)
        mask = None if args.mask is None else edit.mask_from_image(read_image(args.mask))
    except ValueError as e:  # the leaf this copy lacks (MissingLeaf), or png_reader.ImageFileError naming the file
        raise UsageError(str(e)) from None
    try:  # generate()'s checks of the sizes, before the model loads
        *_, strength = edit.check_edit(None, image, mask, args.strength, args.height, args.width)
    except ValueError as e:  # the image's or the mask's
        names = f"--init-image {args.init_image}" + ("" if mask is None else f", --mask {args.mask}")
        raise UsageError(f"{names}: {e}") from None
    try:
        taken = args.steps - edit.first_step(args.steps, strength)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    if getattr(args, "vlm_steps", None) is not None:  # only vldnp reads them: its leaf is here
        from methods.vldnp_cli import check_edit_steps
        check_edit_steps(args.vlm_steps, taken, args.steps)
    return {"init_image": image, "mask": mask, "strength": strength}
