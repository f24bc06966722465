from .io import CheckpointError, atomic_save, atomic_write_text, load_checkpoint, sha256_file

__all__ = ["CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "sha256_file"]
