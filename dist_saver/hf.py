"""Hugging Face transformers conventions: the files save_pretrained writes beside the weights."""

from __future__ import annotations

def model_files(model) -> dict[str, str]:
    """{file name: text} of a transformers PreTrainedModel's config files, taken now.

    Duck-typed (config.to_json_string), so transformers stays an optional dependency; a plain
    nn.Module or state dict gives {}.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not hasattr(model, "state_dict"):
        return {}
    out = {"config.json": config.to_json_string()}
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation is not None and hasattr(generation, "to_json_string") and can_generate():
        out["generation_config.json"] = generation.to_json_string()
    return out
