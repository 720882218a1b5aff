"""The t-SNE animation: the aligned frames of the t-SNE monitor (``tsne/frame_<step>.png``) as
one GIF, ``tsne/evolution.gif``."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

from ..formats.records import TSNE_DIR, TSNE_GIF, atomic_write_bytes, tsne_frames


def build_tsne_gif(exp_dir: str | os.PathLike, duration_ms: int = 600,
                   out: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """Animate the aligned t-SNE frames of a run into ``exp_dir/tsne/evolution.gif`` (or ``out``).

    Frames keep their order (by step); one of another size is resized to the first one's; the
    last frame is held three times as long. Returns the GIF's path, or None without frames."""
    from PIL import Image as PILImage

    frames = tsne_frames(exp_dir)
    if not frames:
        return None
    images = []
    for _, p in frames:
        try:
            with PILImage.open(p) as im:
                images.append(im.convert("RGB"))
        except OSError:  # a frame being written right now
            continue
    if not images:
        return None
    size = images[0].size
    images = [im if im.size == size else im.resize(size) for im in images]
    # one palette for all frames keeps colours steady across the animation
    pal = images[-1].quantize(colors=255, method=PILImage.Quantize.MEDIANCUT)
    frames_p = [im.quantize(palette=pal, dither=PILImage.Dither.NONE) for im in images]
    durations = [duration_ms] * len(frames_p)
    durations[-1] = duration_ms * 3
    out_path = Path(out) if out is not None else Path(exp_dir) / TSNE_DIR / TSNE_GIF
    buf = io.BytesIO()
    frames_p[0].save(buf, format="GIF", save_all=True, append_images=frames_p[1:], duration=durations,
                     loop=0, optimize=False, disposal=1)
    atomic_write_bytes(out_path, buf.getvalue())
    return out_path
