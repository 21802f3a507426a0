"""Errors fxopt raises. Each message says what went wrong, where, and what to do about it."""


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class InputError(FxoptError, ValueError):
    """The model or the example inputs cannot be used as given."""


class CaptureError(FxoptError):
    """The model could not be captured as a graph, not even through the Dynamo fallback."""


class VerificationError(FxoptError):
    """A rewritten graph does not compute what the original computes."""


class RewriteError(FxoptError):
    """A rewrite rule or pass broke its contract (e.g. a rule that never settles)."""


class UnsupportedError(FxoptError, NotImplementedError):
    """The request names something fxopt does not do (yet)."""


class BuildError(FxoptError):
    """TVM could not import, legalize or compile the graph."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: how a message names an
    error it wraps (torch's and TVM's run to pages)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:limit]
