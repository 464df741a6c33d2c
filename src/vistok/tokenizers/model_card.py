"""The model card (README.md) `save_pretrained` writes beside config.json, in the Hugging Face Hub's format
(YAML metadata block + markdown), from the release config and what training or conversion recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

README_NAME = "README.md"
# the last metadata line of every card vistok writes: a README without it is the user's and is never replaced
MARKER = "vistok_model_card: true"

_PAPERS = {
    "dualtoken": "DualToken (arXiv 2503.14324, songweii/DualToken)",
    "toklip": "TokLIP (arXiv 2505.05422, TencentARC/TokLIP)",
    "vqgan": "LlamaGen VQ-16 (FoundationVision/LlamaGen)",
    "kl": "MAR KL-16 (arXiv 2406.11838, LTH14/mar)",
    "mar": "MAR (arXiv 2406.11838, LTH14/mar)",
}


def is_ours(readme: Path) -> bool:
    """True if `readme` is absent or a card vistok wrote (which a new save may replace)."""
    if not readme.exists():
        return True
    try:
        head = readme.read_text(errors="replace")[:4000]
    except OSError:
        return False
    return head.startswith("---") and MARKER in head.split("\n---", 1)[0]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(config: dict, repo_id: Optional[str] = None) -> str:
    """Markdown model card for a release config (as written to config.json, `extra` keys included).

    Reads, where present: `family`, `_class_name`, `preset`, `codebooks`, `scaling_factor`, `preprocess`,
    `trained_steps`, `training` (dict, e.g. data / steps / batch_size), `metrics` (dict of held-out
    metrics, e.g. psnr), `source` (what a converter read)."""
    family = config.get("family", "")
    cls = config.get("_class_name", "VisualTokenizer")
    training = dict(config.get("training") or {})
    if config.get("trained_steps") is not None:
        training.setdefault("steps", config["trained_steps"])
    metrics = config.get("metrics") or {}
    source = config.get("source")
    where = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    lines = ["---", "library_name: vistok", "tags:", "- vistok", "- image-tokenizer"]
    lines += [f"- {family}"] if family else []
    lines += [MARKER, "---", "", f"# {repo_id.split('/')[-1] if repo_id else cls}", ""]
    lines.append(f"A {_PAPERS.get(family, family or 'vistok')} visual tokenizer saved by "
                 f"vistok {config.get('vistok_version', '')}: class `{cls}`"
                 + (f", built from the preset `{config['preset']}`." if config.get("preset") else "."))
    lines += ["", "| field | value |", "|---|---|", f"| family | {family or '-'} |"]
    pp = config.get("preprocess") or {}
    if pp.get("image_size"):
        lines.append(f"| input | {pp['image_size']} px, crop `{pp.get('crop', '')}`, pixels in [-1, 1] |")
    for name, spec in (config.get("codebooks") or {}).items():
        lines.append(f"| codebook `{name}` | {spec.get('size')} codes x depth {spec.get('depth')} |")
    if config.get("scaling_factor") is not None:
        lines.append(f"| latent scaling factor | {config['scaling_factor']} |")
    lines += ["", "## Training", ""]
    if training:
        lines += [f"- {k.replace('_', ' ')}: {_fmt(v)}" for k, v in training.items()]
    elif source:
        lines.append(f"Converted from released weights: {source}.")
    else:
        lines.append("Not recorded (weights as saved; a preset built with create_tokenizer is randomly initialised).")
    if metrics:
        lines += ["", "## Held-out metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    lines += ["", "## Use", "", "```python", "import vistok", "",
              f"tok = vistok.load_tokenizer({where!r})",
              "pixels = tok.preprocess([\"photo.jpg\"])  # (B, 3, H, W) in [-1, 1]",
              "enc = tok.encode(pixels)", "images = tok.decode(" +
              ("latents=enc.latents)" if family in ("kl", "mar") else "ids=enc.ids)"), "```", ""]
    if repo_id:
        lines += ["vistok reads the Hugging Face cache only; fetch the files first:", "", "```bash",
                  f"hf download {repo_id} config.json model.safetensors", "```", ""]
    return "\n".join(lines)
