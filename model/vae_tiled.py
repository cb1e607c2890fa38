"""The VAE's decode in overlapping tiles, for images too large to decode at once (as diffusers'
`enable_tiling`): memory is that of one tile's decode plus the output, whatever the image size."""
import math

import torch


def decode_tiled(vae, latents: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """`vae.decode` in overlapping tiles of `tile` x `tile` latent pixels, for images too large to
    decode at once. Each tile is decoded alone and the tiles are blended linearly across their
    overlaps (at least `overlap` latent pixels), so memory is that of one tile's decode (a 512²
    image at the default 64) plus the output, whatever the image size.

    This is an approximation, as diffusers' `enable_tiling` is: the decoder is not local. Its
    GroupNorms normalise with statistics over the whole feature map, and the attention in its
    middle block mixes all positions; in a tile both see only the tile. Its 3x3 convs also see
    zero padding at tile edges, which the blend weights down: on real images expect slight tone
    shifts between tiles where their contents differ (docs/performance.md measures the difference
    and the cost of the overlaps, decoded twice). When one tile covers the latents, the result is
    `decode`'s exactly.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    B, _, h, w = latents.shape
    f = 2 ** (len(vae.config.channels) - 1)  # image pixels per latent pixel
    latents = latents.to(vae.post_quant_conv.weight.dtype)
    z = vae.post_quant_conv(vae.unscale(latents))  # 1x1: exact per tile
    rows, cols = _tile_spans(h, tile, overlap), _tile_spans(w, tile, overlap)
    images = latents.new_zeros(B, vae.config.out_channels, f * h, f * w)
    total = latents.new_zeros(f * h, f * w)  # sum of the blend weights at each pixel
    for i, (y0, y1) in enumerate(rows):
        for j, (x0, x1) in enumerate(cols):
            weight = _blend_weights(rows, i, f, latents)[:, None] * _blend_weights(cols, j, f, latents)[None, :]
            images[:, :, f * y0:f * y1, f * x0:f * x1] += weight * vae.decoder(z[:, :, y0:y1, x0:x1])
            total[f * y0:f * y1, f * x0:f * x1] += weight
    return images / total  # [B, 3, 8h, 8w]


def _tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of as few tiles of length `tile` as cover 0..size with overlaps of at least
    `overlap`, spread evenly. One tile when size <= tile."""
    if size <= tile:
        return [(0, size)]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    starts = [round(k * (size - tile) / (n - 1)) for k in range(n)]
    return [(s, s + tile) for s in starts]


def _blend_weights(spans: list[tuple[int, int]], k: int, f: int, like: torch.Tensor) -> torch.Tensor:
    """Weights along one axis for tile k, in image pixels: 1 inside, rising linearly from ~0 across
    the overlap with the previous tile and falling across the overlap with the next one."""
    start, end = spans[k]
    weights = like.new_ones(f * (end - start))
    if k > 0:
        n = f * (spans[k - 1][1] - start)
        weights[:n] *= (torch.arange(n, device=like.device, dtype=like.dtype) + 0.5) / n
    if k < len(spans) - 1:
        n = f * (end - spans[k + 1][0])
        weights[len(weights) - n:] *= (torch.arange(n, 0, -1, device=like.device, dtype=like.dtype) - 0.5) / n
    return weights
