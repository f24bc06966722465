from .io import CheckpointError, atomic_save, atomic_write_text, load_checkpoint, remove_partial_writes, sha256_file

__all__ = [
    "CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "remove_partial_writes", "sha256_file",
]
