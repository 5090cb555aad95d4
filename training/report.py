"""The training run written down: its section of ``benchmarks/RESULTS.md`` (each stage's
steps, seconds and losses, the command, the machine) and a plot of the loss curves."""
from __future__ import annotations

import os

TITLE = "The tiny trained model"
PLOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tiny_training.png")


def plot_curves(doc: dict, path: str = PLOT) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = doc["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8))
    for ax, stage in zip(axes, stages):
        steps, losses = zip(*stage["curve"]) if stage["curve"] else ((), ())
        ax.plot(steps, losses)
        ax.set_title(stage["name"], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel(f"loss (mean of {stages[0]['every']} steps)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section(doc: dict, command: str, machine: str) -> str:
    rows = "\n".join(f"| {s['name']} | {s['steps']} | {s['seconds']:.0f} | {s['first']:.4f} | {s['last_mean']:.4f} |"
                     for s in doc["stages"])
    how = (f"`{command}` (seed {doc['seed']}, {doc['threads']} torch threads, torch {doc['torch']}), "
           f"{doc['seconds'] / 60:.1f} min in all on {machine}.")
    if "threads_loras" in doc:  # the LoRA stage run alone on the weights of a whole run
        how = (f"`python -m training --threads {doc['threads']}` (seed {doc['seed']}, torch {doc['torch']}) "
               f"trained the VAE and the transformer; `{command}` the LoRAs on its weights; "
               f"{doc['seconds'] / 60:.1f} min of stages in all on {machine}.")
    return (how + "\n\n"
            "| stage | steps | seconds | first loss | last loss (mean of the last window) |\n"
            "|---|---|---|---|---|\n" + rows + "\n\n"
            "Losses: the VAE's is L1 + MSE of the reconstruction in [-1, 1]; the transformer's and each "
            "LoRA's the flow-matching velocity MSE on normalised latents.\n\n"
            f"![loss curves]({os.path.basename(PLOT)})\n")


def write_results(doc: dict, command: str) -> None:
    from benchmarks.common import machine, replace_section

    plot_curves(doc)
    replace_section(TITLE, section(doc, command, machine(("torch", "diffusers"))))
