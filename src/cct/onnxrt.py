"""ONNX plumbing shared by image and text models: the optional dependencies, sessions, quiet exporters.

Used by prediction (`cct.predict`, `cct.text_predict`) and by `cct export` (`cct.export`,
`cct.text_export`), which runs every graph it writes before writing it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

from .errors import CCTError


DEFAULT_OPSET = 18  # the lowest opset the torch.export-based exporter writes natively


def check_opset(opset: int) -> None:
    """A one-line error for an opset the models cannot be written at: before 17, ONNX has no LayerNormalization,
    which every cct model uses; after the installed onnx's newest, nothing is defined."""
    onnx = require_onnx()
    newest = onnx.defs.onnx_opset_version()
    if not 17 <= opset <= newest:
        raise CCTError(f"--opset must be between 17 (ONNX's first LayerNormalization) and {newest} (the installed "
                       f"onnx's newest), got {opset}; {DEFAULT_OPSET} and later are written directly")


def written_opset(proto, asked: int) -> int:
    """The graph's opset; an error when it is not the one asked for (the exporter's down-conversion to an opset
    below 18 failed for some operator, and it kept its own instead)."""
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != asked:
        raise CCTError(f"the exporter could not write this model at opset {asked} (it kept opset {written}, which "
                       f"some of its operators need): use --opset {written} or later")
    return written


def require_onnxruntime():
    """The onnxruntime module, or a `CCTError` saying how to install the optional extra."""
    try:
        import onnxruntime
    except ImportError:
        raise CCTError("running an ONNX model needs onnxruntime, part of the optional extra: "
                       "pip install 'cct[export]'") from None
    return onnxruntime


def onnx_session(path: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session on an ONNX file (or the serialised model itself)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: stdout and stderr stay readable
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        if not isinstance(path, bytes) and not Path(path).is_file():
            raise CCTError(f"model not found: {path}") from None
        where = "the exported model" if isinstance(path, bytes) else path
        raise CCTError(f"{where} is not a readable ONNX model: {str(e).strip().splitlines()[0]}") from None


def require_onnx():
    """The onnx module, or a `CCTError` saying how to install the optional extra."""
    try:
        import onnx
        import onnxruntime  # noqa: F401  (checks the export)
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as e:
        raise CCTError(f"ONNX export needs the optional extra of onnx, onnxscript and onnxruntime (missing: "
                       f"{e.name or 'onnx'}): pip install 'cct[export]'") from None
    return onnx


@contextlib.contextmanager
def quiet_export():
    """Keep the exporters' progress lines and deprecation notices off stdout and the user's screen."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
