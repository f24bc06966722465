from .io import (
    CheckpointError, atomic_save, atomic_write_text, load_checkpoint, prune_checkpoints, remove_partial_writes,
    sha256_file,
)

__all__ = [
    "CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "prune_checkpoints",
    "remove_partial_writes", "sha256_file",
]
