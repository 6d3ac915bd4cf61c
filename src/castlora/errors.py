"""castlora's exceptions: each names the problem and what to do about it."""


class CastloraError(Exception):
    """A problem with the user's input or environment; the CLI prints it without a traceback."""


class AdapterMismatchError(CastloraError):
    """The adapter does not belong to the given source model."""


class UnsafeFileError(CastloraError):
    """A pickle file was found and --allow-pickle was not given."""


class CorpusError(CastloraError):
    """The corpus cannot feed the requested run."""


class TrainingDiverged(CastloraError):
    """A loss became NaN or Inf."""


class CastloraWarning(UserWarning):
    """Something suspicious in the user's input that does not stop the run (e.g. a huge LoRA delta)."""
