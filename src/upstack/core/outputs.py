"""What a stage's output must be before the stage counts as done, whatever the kind: a stage
declares what its dir holds (contract OUTPUT); this module checks it on the files written.

A model whose weights hold NaN or infinity (a merge weight of .nan, a learning rate that blew up
after the last logged step, an overflow in a dtype cast) computes nothing useful, and every stage
after it would build on it: such a stage fails instead of saying "done".
"""

from __future__ import annotations

from pathlib import Path


def problem(output: str, out_dir: Path) -> str | None:
    """Why the output in `out_dir` does not count, or None."""
    if output == "model":
        return nonfinite_problem(out_dir)
    return None


def nonfinite_problem(model_dir: Path) -> str | None:
    """The first floating-point tensor of the checkpoint's safetensors shards holding NaN or
    infinity, and how many such tensors there are; None when every value is finite. Reads one
    tensor at a time, so memory stays at the size of the largest tensor."""
    import torch
    from safetensors import safe_open

    bad: list[str] = []
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(f"{name} ({shard.name})")
    if not bad:
        return None
    more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
    return (
        f"the model it wrote has NaN or infinite values in {bad[0]}{more}: not usable, so not "
        "done (lower the learning rate, check merge weights and dtypes)"
    )
