"""transformers' GLM-4V video processors for the tests, where torchvision does not import.

transformers' video processors need `torchvision.transforms.v2.functional` (tvF). The registry's
torchvision wheels are CUDA builds that do not import beside the CPU torch here, so `with_tvf_stand_in()`
puts a 3-function stand-in in its place for the duration of a test: `resize` makes the call torchvision's
`resize_image` makes on the CPU for uint8 bicubic input (`F.interpolate(..., antialias=True)` straight on
uint8), `normalize` is `sub_(mean).div_(std)`, `grayscale_to_rgb` passes RGB through. Everything else
(sampling, metadata, smart_resize, grouping, fused rescale/normalise, patchify, token expansion) is
transformers' own code. Where torchvision imports, `real_torchvision()` is True and the tests that need
the real path run too.
"""

from __future__ import annotations

import contextlib
import enum
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F


def real_torchvision() -> bool:
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception:
        return False
    return True


class _Mode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _resize(image, size, interpolation=_Mode.BILINEAR, antialias=True):
    assert interpolation == _Mode.BICUBIC and image.dtype == torch.uint8, (interpolation, image.dtype)
    shape = image.shape
    if tuple(size) == tuple(shape[-2:]):
        return image
    x = F.interpolate(image.reshape(-1, *shape[-3:]), size=list(size), mode="bicubic", align_corners=False,
                      antialias=antialias)
    return x.reshape(*shape[:-2], *size)


def _normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image if inplace else image.clone()).sub_(mean).div_(std)


@contextlib.contextmanager
def with_tvf_stand_in():
    """transformers' video processors usable without torchvision (see the module docstring)."""
    if real_torchvision():
        yield
        return
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as vpu
    from transformers.image_utils import PILImageResampling

    shim = types.SimpleNamespace(InterpolationMode=_Mode, resize=_resize, normalize=_normalize,
                                 grayscale_to_rgb=lambda v: v)
    saved = {m: getattr(m, "tvF", None) for m in (backends, vpu)}
    saved_map = backends.pil_torch_interpolation_mapping
    try:
        backends.tvF = vpu.tvF = shim
        backends.pil_torch_interpolation_mapping = {PILImageResampling.BICUBIC: _Mode.BICUBIC}
        yield
    finally:
        for m, v in saved.items():
            if v is None:
                delattr(m, "tvF")
            else:
                m.tvF = v
        backends.pil_torch_interpolation_mapping = saved_map


def glm4v_video_processor_class():
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    return Glm4vVideoProcessor


def glm46v_video_processor_class():
    """transformers' Glm46VVideoProcessor; its module imports torchvision at the top, so without it the
    module's own source is run with that one import line replaced."""
    if real_torchvision():
        from transformers.models.glm46v.video_processing_glm46v import Glm46VVideoProcessor

        return Glm46VVideoProcessor
    import transformers.models.glm46v as pkg

    path = Path(pkg.__file__).with_name("video_processing_glm46v.py")
    line = "from torchvision.transforms.v2 import functional as tvF"
    src = path.read_text()
    assert line in src, "transformers' glm46v video processor changed; update tests/hf_video.py"
    name = "transformers.models.glm46v._video_processing_glm46v_no_torchvision"
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__file__, module.__package__ = str(path), pkg.__name__
        sys.modules[name] = module  # transformers' docstring decorator looks the class's module up
        exec(compile(src.replace(line, "tvF = None"), str(path), "exec"), module.__dict__)
    return sys.modules[name].Glm46VVideoProcessor


def video_structure(flavour: str, grid, metadata, merge_size: int = 2) -> str:
    """transformers' processor text for one `<|video|>` (replace_video_token), GLM-4.5V or GLM-4.6V."""
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.models.glm46v.processing_glm46v import Glm46VProcessor

    cls = Glm46VProcessor if flavour == "glm46v" else Glm4vProcessor
    me = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=merge_size), image_token="<|image|>")
    me.replace_frame_token_id = lambda ts, num_image_tokens=1: cls.replace_frame_token_id(me, ts, num_image_tokens)
    inputs = {"video_grid_thw": torch.tensor([list(grid)]), "video_metadata": [metadata]}
    return cls.replace_video_token(me, inputs, 0)
