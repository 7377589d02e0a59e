"""Errors of the model layer, importable without torch (the command line reports them without loading it)."""


class ModelLoadError(RuntimeError):
    """A model could not be found or does not fit the others (vocabulary, format), or the engine cannot serve it."""


# How an allocation failure reads when it is raised as a plain RuntimeError rather than torch.OutOfMemoryError: on the
# CPU ("DefaultCPUAllocator: can't allocate memory"), by cuBLAS/cuDNN creating a handle or workspace, by a CUDA call
# that returned cudaErrorMemoryAllocation ("CUDA error: out of memory"), or by the MPS backend of older torch releases.
OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory: a batch in halves, or a smaller request, may fit."""
    import torch  # here, not at the top: the command line imports this module without torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(message in str(error) for message in OUT_OF_MEMORY_MESSAGES)
