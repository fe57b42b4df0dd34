"""qkv: attention and the Transformer, from the equations to trained models.

``qkv.load(run_dir)`` returns a trained run ready to use (qkv.run.load); it is imported on first
use, so ``import qkv`` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
    if name == "load":
        from qkv.run import load

        return load
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")
