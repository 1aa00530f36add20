"""One exception hierarchy for everything a user can get wrong.

`assert` is kept for internal invariants; anything caused by user input raises a
subclass of :class:`SlimgraphError`, whose message names the thing at fault. The CLI
prints the message on one line and exits with status 2.
"""


class SlimgraphError(Exception):
    """Base class of every user-facing error."""


class ModelLoadError(SlimgraphError):
    """A model path, alias, or file could not be loaded."""


class TraceError(SlimgraphError):
    """A model could not be traced with the given example inputs."""


class OnnxImportError(SlimgraphError):
    """An ONNX file is malformed, truncated, or uses something we cannot import."""


class VerificationError(SlimgraphError):
    """The IR verifier found an inconsistency."""


class PipelineError(SlimgraphError):
    """A pass pipeline is malformed: unknown pass, unknown option, bad value."""
