from .io import CheckpointError, atomic_save, load_checkpoint, sha256_file

__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "sha256_file"]
