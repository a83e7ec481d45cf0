"""An exported ONNX student run by ONNX Runtime, with the same interface as the PyTorch one:
``preprocess`` (PIL image -> ``[3, S, S]`` tensor, from the file's ``comkd.preprocess`` metadata),
``classnames`` and ``predict(images)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..fileio import parse_json
from ..models.backbones import ModelError, PreprocessSpec, spec_from_metadata
from ..models.io import MAX_CLASSNAMES_CHARS, MAX_RECORD_CHARS, check_classnames
from ..models.predict import predict_images
from ..models.student import check_finite_images


class OnnxStudent:
    """A comkd ONNX export in an ONNX Runtime session. ``providers``: ONNX Runtime execution
    providers (default: CPU); ``threads``: intra-op threads (default: ONNX Runtime's)."""

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("--runtime onnx needs onnxruntime: pip install 'comkd[onnx]'") from None
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"ONNX file not found: {path}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(path), opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"cannot load ONNX model {path}: {type(e).__name__}: {e}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.path = path
        self.metadata: dict[str, str] = dict(meta)
        if "comkd.preprocess" in meta:  # bounded (size, nesting) before it is read as a spec
            parse_json(
                meta["comkd.preprocess"],
                f"{path}: metadata comkd.preprocess",
                max_chars=MAX_RECORD_CHARS,
                error=ModelError,
            )
        self.preprocess: PreprocessSpec = spec_from_metadata(meta, str(path))
        self.classnames: list[str] = _classnames(meta, path)
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.classnames):
            raise ModelError(
                f"{path}: metadata comkd.classnames names {len(self.classnames)} classes but the "
                f"model has {n_out} outputs"
            )
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        s = self.preprocess.image_size
        dims = list(inp.shape)[1:]  # [3, S, S] when the graph fixes them (the batch is dynamic)
        want = [3, s, s]
        if len(dims) != 3 or any(isinstance(d, int) and d != w for d, w in zip(dims, want, strict=True)):
            raise ModelError(
                f"{path}: metadata comkd.preprocess.image_size is {s} but the graph takes input "
                f"{list(inp.shape)}; re-export the student (comkd export)"
            )

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` preprocessed images -> ``[B, N]`` logits."""
        s = self.preprocess.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ModelError(f"{self.path} takes images [B, 3, {s}, {s}], got {list(images.shape)}")
        check_finite_images(images)
        x = images.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])

    def predict(self, images: Any, top_k: int = 5, batch_size: int = 64) -> list:
        """As ``Student.predict``: top-k ``Prediction``s for PIL images, files or a batch."""
        return predict_images(self, images, top_k=top_k, batch_size=batch_size)


def _classnames(meta: dict[str, str], path: Path) -> list[str]:
    """The ``comkd.classnames`` metadata: a JSON list of distinct, non-empty strings, or a
    one-line ``ModelError`` naming the file and the key."""
    if "comkd.classnames" not in meta:
        raise ModelError(f"{path} has no comkd.classnames metadata (not a comkd export?)")
    where = f"{path}: metadata comkd.classnames"
    names = parse_json(meta["comkd.classnames"], where, max_chars=MAX_CLASSNAMES_CHARS, error=ModelError)
    return check_classnames(names, where)
