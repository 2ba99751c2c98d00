"""Write RGB frames to an mp4 (PyAV) and lay several camera views out in one frame.

    from robot_rl.video import Mp4Writer, tile, write_mp4

    write_mp4("out.mp4", frames, fps=20)            # frames: iterable of HxWx3 uint8
    with Mp4Writer("out.mp4", fps=20) as w:          # or frame by frame, while they are produced
        w.write(tile([agentview, wrist]))           # views side by side (a grid with columns=)

H.264 (libx264, else another H.264 encoder) in yuv420p, so any browser or player shows it; mpeg4 if no H.264
encoder is available. yuv420p needs even sizes: an odd height/width gets one more row/column (a copy of the
last one, so no dark line and no codec ringing at the edge).
All frames of one video must have the size of the first one.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

CODECS = ("libx264", "h264", "libopenh264", "mpeg4")  # in order of preference


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    a = np.asarray(frame)
    if a.ndim == 2:  # grayscale
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"a video frame must be HxWx3 (RGB), got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):  # floats in [0, 1]
            a = np.clip(a * 255.0 + 0.5, 0, 255)
        a = a.astype(np.uint8)
    return a


def pad_even(frame: np.ndarray) -> np.ndarray:
    """Even height and width (yuv420p needs them): repeat the last row/column where one is odd."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize (no dependencies; exact for integer up-scaling)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    rows = (np.arange(height) * h // height).clip(0, h - 1)
    cols = (np.arange(width) * w // width).clip(0, w - 1)
    return image[rows][:, cols]


def tile(images: Sequence[np.ndarray], columns: int | None = None, gap: int = 0) -> np.ndarray:
    """Several views in one image: side by side (one row) by default, or a grid `columns` wide, row by row.

    Images of other heights than the first are resized (nearest neighbour, aspect kept) to its height; cells of a
    grid row shorter than the widest row are padded black. `gap` pixels of black separate the views."""
    imgs = [_as_rgb(im) for im in images]
    if not imgs:
        raise ValueError("tile needs at least one image")
    h = imgs[0].shape[0]
    imgs = [
        im if im.shape[0] == h else resize_nearest(im, h, max(1, round(im.shape[1] * h / im.shape[0]))) for im in imgs
    ]
    columns = len(imgs) if columns is None else max(1, int(columns))
    rows = []
    for r in range(0, len(imgs), columns):
        cells = imgs[r : r + columns]
        parts = []
        for i, im in enumerate(cells):
            if i and gap:
                parts.append(np.zeros((h, gap, 3), np.uint8))
            parts.append(im)
        rows.append(np.concatenate(parts, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    out = []
    for i, r in enumerate(rows):
        if i and gap:
            out.append(np.zeros((gap, width, 3), np.uint8))
        out.append(r)
    return np.concatenate(out, axis=0)


def _codec_ok(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - unknown / not built in: try the next one
        return False


class Mp4Writer:
    """Frame-by-frame mp4 writer; the size is fixed by the first frame. Use as a context manager or `close()`."""

    def __init__(self, path: str | Path, fps: float, codec: str | None = None, crf: int = 20):
        if not fps or fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.path = Path(path)
        self.fps = float(fps)
        self.crf = int(crf)
        candidates = [codec] if codec else [c for c in CODECS if _codec_ok(c)]
        if not candidates:
            raise RuntimeError(f"PyAV has none of the encoders {', '.join(CODECS)}")
        self._candidates = candidates
        self.codec: str | None = None
        self.frames = 0
        self.size: tuple[int, int] | None = None  # (height, width) of the frames given (before padding)
        self._container = None
        self._stream = None

    def _open(self, height: int, width: int) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        rate = Fraction(self.fps).limit_denominator(1001)
        errors = []
        for name in self._candidates:
            container = av.open(str(self.path), mode="w")
            try:
                stream = container.add_stream(name, rate=rate)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                if name == "libx264":
                    stream.options = {"crf": str(self.crf), "preset": "veryfast"}
                elif name == "mpeg4":
                    stream.bit_rate = max(1_000_000, int(width * height * self.fps * 0.4))
                stream.codec_context.open()  # fails here (not at the first frame) if the encoder cannot run
            except Exception as e:  # noqa: BLE001 - fall back to the next encoder
                errors.append(f"{name}: {e}")
                container.close()
                continue
            self._container, self._stream, self.codec = container, stream, name
            if errors:
                log.info("mp4 encoder %s (could not use: %s)", name, "; ".join(errors))
            return
        raise RuntimeError(f"could not open an mp4 encoder for {self.path}: {'; '.join(errors)}")

    def write(self, frame: np.ndarray) -> None:
        import av

        rgb = _as_rgb(frame)
        if self.size is None:
            self.size = rgb.shape[:2]
            padded = pad_even(rgb)
            self._open(padded.shape[0], padded.shape[1])
        elif rgb.shape[:2] != self.size:
            raise ValueError(
                f"frame {self.frames} of {self.path} is {rgb.shape[1]}x{rgb.shape[0]}, the first was "
                f"{self.size[1]}x{self.size[0]}: all frames of a video must have one size"
            )
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(pad_even(rgb)), format="rgb24")
        vf.pts = self.frames
        vf.time_base = Fraction(1) / self._stream.codec_context.framerate
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            for packet in self._stream.encode(None):  # flush the encoder
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = self._stream = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_mp4(
    path: str | Path, frames: Iterable[np.ndarray], fps: float, codec: str | None = None, crf: int = 20
) -> int:
    """Encode `frames` (HxWx3 uint8 RGB, one size) to `path` at `fps`; returns the number of frames written.
    Frames are consumed one at a time (a generator never has to be held in memory). No frames: no file."""
    with Mp4Writer(path, fps, codec=codec, crf=crf) as w:
        for f in frames:
            w.write(f)
    return w.frames


def read_mp4(path: str | Path) -> list[np.ndarray]:
    """Decode every frame of a video (RGB uint8); for tests and small clips."""
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
