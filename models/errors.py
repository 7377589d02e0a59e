"""Errors of the model layer, importable without torch (the command line reports them without loading it)."""


class ModelLoadError(RuntimeError):
    """A model could not be found or does not fit the others (vocabulary, format), or the engine cannot serve it."""
