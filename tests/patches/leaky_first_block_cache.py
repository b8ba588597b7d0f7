"""A deliberately leaky first-block cache: ``fixtures/patches/first_block_cache.py`` with its cache in a module-level
dict keyed by the image stream's shape, not by the model. A second model whose tokens have the same shape (tiny FLUX
and tiny Qwen both have 64 tokens of width 64) finds the first one's residuals and skips its own blocks with them.
Its residuals are filled once per shape and never refreshed. The sequences must report it as a state leak and
name the dict."""

from __future__ import annotations



THRESHOLD = 0.12
_CACHE: dict[tuple, dict] = {}

BLOCK_LISTS = (("transformer_blocks", "double_block"), ("double_blocks", "double_block"), ("single_blocks", "single_block"), ("blocks", "double_block"))


def patch(model):
    diffusion_model = model.model.diffusion_model
    blocks = [(name, i) for attr, name in BLOCK_LISTS if hasattr(diffusion_model, attr) for i in range(len(getattr(diffusion_model, attr)))]
    patched = model.clone()

    def first_block(args, extra):
        entry = _CACHE.setdefault(tuple(args["img"].shape), {"residuals": {}})
        out = extra["original_block"](args)
        residual = out["img"] - args["img"]
        previous = entry.get("first")
        change = float((residual - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)) if previous is not None else float("inf")
        entry["skipping"] = change < THRESHOLD and bool(entry["residuals"])
        entry["first"] = residual
        return out

    def later_block(key):
        def run(args, extra):
            entry = _CACHE[tuple(args["img"].shape)] if key[0] == "double_block" else next(iter(_CACHE.values()))
            if entry.get("skipping") and key in entry["residuals"] and all(args[n].shape == d.shape for n, d in entry["residuals"][key].items()):
                return {name: args[name] + delta for name, delta in entry["residuals"][key].items()}
            out = extra["original_block"](args)
            entry["residuals"].setdefault(key, {name: out[name] - args[name] for name in out if name in ("img", "txt")})  # filled once per shape
            return out

        return run

    patched.set_model_patch_replace(first_block, "dit", blocks[0][0], blocks[0][1])
    for key in blocks[1:]:
        patched.set_model_patch_replace(later_block(key), "dit", key[0], key[1])
    return patched


