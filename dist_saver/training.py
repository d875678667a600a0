"""What a training job needs to resume, beside the weights: the optimizer's state, the caller's
train_state and every rank's RNG state.

The optimizer's state is taken and given back the way PyTorch defines it across layouts
(torch.distributed.checkpoint.state_dict: keyed by parameter FQN, DTensor states for sharded
parameters), flattened to tensors named optim.state.<fqn>.<key>: they go through the same plan,
in-place writes and commit as the weights, into optimizer-XXXXX-of-YYYYY.safetensors files. The
non-tensor parts (param_groups, non-tensor state values) are JSON in the optimizer index.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Mapping

import torch

from . import format as fmt
from .errors import CheckpointError

PREFIX = "optim.state."  # optimizer tensors: optim.state.<parameter FQN>.<state key>


def optimizer_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(name -> tensor, the JSON part {"param_groups", "state_values"}) of an optimizer over
    model's parameters. An optimizer that has not stepped yet gets its state initialised (zeros),
    as PyTorch's get_optimizer_state_dict does, so a fresh optimizer is a loading target."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimizer= needs the model (an nn.Module), not a {type(model).__name__}: "
                        "its state is keyed by the model's parameter names")
    osd = get_optimizer_state_dict(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{PREFIX}{fqn}.{key}"] = value
            else:
                values.setdefault(fqn, {})[key] = _json_value(value, f"optimizer state {fqn!r} {key!r}")
    groups = [{k: _json_value(v, f"optimizer param_groups[{i}] {k!r}") for k, v in g.items()}
              for i, g in enumerate(osd["param_groups"])]
    return tensors, {"param_groups": groups, "state_values": values}


def set_optimizer(model, optimizer, tensors: Mapping[str, torch.Tensor], saved: dict) -> None:
    """Give the optimizer the loaded tensors and the saved JSON part (PyTorch maps FQNs back to
    its parameters, and reshards nothing: the tensors already have the optimizer's layout)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        fqn, key = name[len(PREFIX):].rsplit(".", 1)
        state.setdefault(fqn, {})[key] = t
    for fqn, kv in (saved.get("state_values") or {}).items():
        state.setdefault(fqn, {}).update(kv)
    groups = []  # tuples (betas) come back as tuples
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        groups.append({k: tuple(v) if isinstance(group.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved_group.items()})
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})


def check_param_groups(saved: dict, expected_fqns: set[str], where: str) -> None:
    """The saved param_groups must name exactly the optimizer's parameters."""
    names = [n for g in saved.get("param_groups", []) for n in g.get("params", [])]
    missing = sorted(expected_fqns - set(names))
    extra = sorted(set(names) - expected_fqns)
    if missing or extra:
        raise CheckpointError(
            f"{where}: the saved optimizer is over other parameters: the checkpoint has no state for "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''} and has state for parameters this optimizer "
            f"lacks {extra[:5]}{'...' if len(extra) > 5 else ''}")


def _json_value(value, what: str):
    """param_groups and non-tensor state as JSON: tuples become lists, anything else must fit."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN/Infinity, Python's json reads them back
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} is a {type(value).__name__}, which cannot be saved as JSON") from None
    return value


def rng_state() -> dict:
    """This rank's torch RNG states (CPU, and every initialised CUDA device), JSON-ready."""
    out = {"cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict) -> None:
    torch.set_rng_state(_unb64(state["cpu"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def train_state_document(train_state, rngs: list[dict], world_size: int) -> dict:
    return {"format": "dist_saver.train_state", "version": fmt.FORMAT_VERSION, "world_size": world_size,
            "train_state": train_state, "rng": rngs}


def encode_train_state(train_state) -> Any:
    """A copy taken at the call (rank 0): an async save must not see what the caller changes
    afterwards (a dict updated at the next step), and an unserialisable value fails the save
    before it starts."""
    try:
        return json.loads(json.dumps(train_state))
    except (TypeError, ValueError) as e:
        raise TypeError(f"train_state must be JSON-serialisable: {e}") from None


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
