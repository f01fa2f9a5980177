"""Model cards: the README.md beside a checkpoint saying what it was trained on, how, and how well."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ctfm_engine.io import atomic_output
from ctfm_engine.models.checkpoint import CARD_FILE, WEIGHTS_FILE, read_checkpoint, save_checkpoint, sha256_of
from ctfm_engine.training.data import ManifestEntry
from ctfm_engine.training.recipe import WEIGHT_DTYPES, Recipe


def export_model(
    network: nn.Module,
    config: dict[str, Any],
    recipe: Recipe,
    entries: Sequence[ManifestEntry],
    results: dict[str, Any],
    kind: str,
) -> dict[str, Any]:
    """Save ``network`` to the recipe's ``output.export`` folder with its model card; the export's identity."""
    folder = Path(str(recipe.output.export))
    dtype_name = recipe.output.weights_dtype
    save_checkpoint(network.cpu(), folder, config, dtype=WEIGHT_DTYPES[dtype_name])
    write_model_card(folder, recipe, entries, {**results, "weights_dtype": dtype_name}, kind=kind)
    return {"weights": read_checkpoint(folder).identity, "export": str(folder)}


def write_model_card(
    folder: Path, recipe: Recipe, entries: Sequence[ManifestEntry], results: dict[str, Any], kind: str
) -> Path:
    """Write ``README.md`` into a checkpoint folder: data, recipe, results, sha256, and the clinical-use warning."""
    name = recipe.output.name or folder.name
    recipe_text = yaml.safe_dump(dict(recipe.given), sort_keys=False)
    data_lines = "\n".join(f"- `{entry.path.name}`" + (f" (labels `{entry.labels.name}`)" if entry.labels else "")
                           for entry in entries)
    card = f"""---
library_name: project-lighter
tags: [ct, ct-fm, {kind}, demonstration]
---
# {name}

**A demonstration model, not for clinical use.** It was trained by SlicerCTFM's own training stack on the few
real CT scans listed below, to show the pipeline working offline; it is not CT-FM and not comparable to it.

- Kind: {kind} (MONAI SegResNetDS family, Hugging Face layout: `config.json` + `model.safetensors`)
- Weights sha256: `{sha256_of(folder / WEIGHTS_FILE)}`

## Training data ({len(entries)} scan{"" if len(entries) == 1 else "s"})
{data_lines}

## Results
```json
{json.dumps({k: v for k, v in results.items() if k not in {"checkpoint", "metrics"}}, indent=2)}
```

## Recipe
```yaml
{recipe_text}```
"""
    path = folder / CARD_FILE
    with atomic_output(path) as temporary:
        temporary.write_text(card)
    return path
