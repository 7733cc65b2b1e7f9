"""A model card written from a checkpoint alone: what a reader of an experiment tracker needs to
judge a run without opening the file (data, recipe, validation figures, calibration)."""

import json

from emotion.checkpoint import Checkpoint


def model_card(checkpoint: Checkpoint) -> str:
    """Markdown describing `checkpoint`; every figure comes from the checkpoint's own metrics."""
    validation = checkpoint.metrics.get("validation", {})
    lines = [
        f"# Model card: {checkpoint.name or checkpoint.arch}",
        "",
        f"- Architecture: `{checkpoint.arch}` {json.dumps(checkpoint.arch_kwargs)}, "
        f"{checkpoint.num_params:,} parameters",
        f"- Input: {checkpoint.channels} channel(s), {checkpoint.input_size}x{checkpoint.input_size}, "
        f"mean {list(checkpoint.mean)}, std {list(checkpoint.std)}",
        f"- Labels: {', '.join(checkpoint.labels)}",
        f"- Trained on: {checkpoint.trained_on}",
        f"- Created: {checkpoint.created}",
        f"- Test-time mirroring: {'on' if checkpoint.test_time_flip else 'off'}; "
        f"temperature {checkpoint.temperature:.3f}",
        "",
        "## Validation (the kept epoch)",
        "",
    ]
    shown = ("epoch", "val_accuracy", "val_macro_f1", "val_loss", "val_ece", "val_ece_uncalibrated", "train_accuracy")
    lines += [f"- {key}: {validation[key]:.4g}" for key in shown if isinstance(validation.get(key), int | float)]
    per_class = validation.get("per_class", {})
    rows = [label for label in checkpoint.labels if label in per_class]
    if rows:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for label in rows:
            scores = per_class[label]
            lines.append(f"| {label} | {scores['precision']:.3f} | {scores['recall']:.3f} | "
                         f"{scores['f1-score']:.3f} | {int(scores['support'])} |")
    if checkpoint.recipe:
        lines += ["", "## Recipe", "", "```json", json.dumps(checkpoint.recipe, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"
