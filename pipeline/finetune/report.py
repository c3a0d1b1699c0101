"""The terminal summary of a fine-tune: the fine-tuned model against the linear probe, on the same test split."""

from __future__ import annotations

from pipeline import charts


def print_finetune_summary(metrics: dict, output_uri: str, console) -> None:
    probe = metrics.get("linear_probe") or {}
    state = "already finished" if metrics.get("already_done") else "written"
    rows = [(f"{name} (test split)", f"{metrics[key]:.4f}   linear probe {probe.get(key, float('nan')):.4f}")
            for name, key in (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"))]
    rows += [("images", f"{metrics['num_train']} train, {metrics['num_validation']} validation, "
                        f"{metrics['num_test']} test"),
             ("epochs", f"{metrics['epochs']} (best: {metrics['best_epoch']})"),
             ("left out", f"{len(metrics.get('left_out_images') or {})} images that could not be decoded")]
    if metrics.get("resumed_from_epochs"):
        rows.append(("resumed", "after epoch " + ", ".join(map(str, metrics["resumed_from_epochs"]))))
    console.print(charts.key_value_table("Fine-tune: the new head and the top of the network", rows))
    console.print(f"model.keras, class_names.txt, curves.png and metrics.json {state} in {output_uri}",
                  highlight=False, soft_wrap=True)
