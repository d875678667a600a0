"""Hugging Face transformers conventions: the files save_pretrained writes beside the weights
(model config, tokenizer, processor), gathered as {name: bytes} for the commit to stage."""

from __future__ import annotations

import copy
import os
import tempfile

from . import format as fmt


def model_files(model, dtype=None) -> dict[str, bytes]:
    """{file name: content} of a transformers PreTrainedModel's config files, taken now.

    The config as save_pretrained writes it, not as built: `dtype` from the first floating-point
    parameter (a model loaded in bf16 and trained after .float() is saved as float32; else
    from_pretrained would round every weight back to bf16) and `architectures` from the model's
    class (without the "FSDP" prefix fully_shard adds). Set on a copy: save_pretrained changes
    the model's own config, we leave it alone (an async save must not race the training).
    Duck-typed (config.to_json_string), so transformers stays an optional dependency; a plain
    nn.Module or state dict gives {}.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not hasattr(model, "state_dict"):
        return {}
    config = copy.deepcopy(config)
    if dtype is None:  # else the dtype the save casts to (dist_save(dtype=))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None) \
            if callable(getattr(model, "parameters", None)) else None
    if dtype is not None:  # transformers 5 (and 4.56+) writes "dtype"; older ones "torch_dtype"
        setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", str(dtype).split(".")[1])
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config_name, generation_name = fmt.OWN_EXTRA_FILES
    out = {config_name: config.to_json_string().encode()}
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation is not None and hasattr(generation, "to_json_string") and can_generate():
        out[generation_name] = generation.to_json_string().encode()
    return out


def saved_files(obj, role: str) -> dict[str, bytes]:
    """{file name: content} that obj.save_pretrained writes (a tokenizer, a processor), taken now:
    an async save must not see later changes, and the commit then only copies bytes."""
    if not callable(getattr(obj, "save_pretrained", None)):
        raise TypeError(f"{role} is a {type(obj).__name__}, which has no save_pretrained()")
    out = {}
    with tempfile.TemporaryDirectory(prefix="dist_saver-") as tmp:
        obj.save_pretrained(tmp)
        for root, dirs, files in os.walk(tmp):
            for entry in sorted(dirs + files):
                full = os.path.join(root, entry)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                if os.path.islink(full) or not (os.path.isdir(full) or os.path.isfile(full)):
                    raise ValueError(f"{role}.save_pretrained wrote {rel!r}, which is not a plain file "
                                     "or directory; dist_save only stages those")
                if os.path.isfile(full):
                    with open(full, "rb") as f:
                        out[rel] = f.read()
    return out


def extra_files(model, tokenizer=None, processor=None, dtype=None) -> dict[str, bytes]:
    """Everything rank 0 stages beside the weights: the model's config, then the tokenizer's and
    the processor's files (a processor's tokenizer_config.json, which names the processor class,
    wins over a tokenizer's own)."""
    out = model_files(model, dtype)
    for obj, role in ((tokenizer, "tokenizer"), (processor, "processor")):
        if obj is not None:
            out.update(saved_files(obj, role))
    for name in out:
        if (not fmt.is_plain_relpath(name) or fmt.is_shard_file_name(name) or fmt.is_legacy_file(name)
                or name in (fmt.INDEX_NAME, fmt.SINGLE_NAME, fmt.LEGACY_INDEX_NAME)):
            raise ValueError(f"refusing to stage {name!r} beside the weights: dist_save writes "
                             "the weights and their index itself")
    return out
