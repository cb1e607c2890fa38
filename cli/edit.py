"""generate.py's --init-image and --mask: the images read and checked before any model loads. A leaf
(generate.py:LEAVES), with the PNG reader (png_reader.py) and the edit itself (sampler/edit.py)."""
from cli.args import UsageError
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
    strength = args.strength if args.strength is not None else (
        edit.IMG2IMG_STRENGTH if mask is None else edit.INPAINT_STRENGTH)
    try:
        taken = args.steps - edit.first_step(args.steps, strength)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    H, W = image.shape[:2]
    if mask is not None and tuple(mask.shape) != (H, W):
        raise UsageError(f"--mask {args.mask} is {mask.shape[1]}x{mask.shape[0]}; it must be the image's size, {W}x{H}")
    for flag, size, side in [("--height", args.height, H), ("--width", args.width, W)]:
        if size is not None and size != side:
            raise UsageError(f"{flag} {size}: the edit is made at --init-image's size, {W}x{H}; leave it out")
    if H % 8 or W % 8:
        raise UsageError(f"--init-image {args.init_image} is {W}x{H}; its sides must be multiples of 8: crop or "
                         f"resize it, e.g. to {W - W % 8}x{H - H % 8}")
    if args.vlm_steps is not None:  # only vldnp reads them: its leaf is here
        from methods.vldnp_cli import parse_steps
        try:
            parse_steps(args.vlm_steps, taken)
        except ValueError as e:
            raise UsageError(f"--vlm-steps count the steps the edit takes, {taken} of {args.steps}: {e}") from None
    return {"init_image": image, "mask": mask, "strength": strength}
