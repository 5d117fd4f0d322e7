"""The demo's report, from the files its stages wrote: results.json, results.md (the table of both inits per task,
the blind controls, VQA per question type against each type's prior, the exact-shapes captions, the matching probe,
a warning for any model whose predictions are constant) and the pictures."""

from __future__ import annotations

import json
import os
import shutil
import statistics

from demo_probe import exact_shapes, matching_probe
from demo_processes import REPRODUCIBLE_KERNELS, cpu_description, run_side_by_side

# A gain counts as clear from 5 points on the 0-100 scale of every metric here (about 1.5 standard errors of a
# difference between two accuracies near 50% on the 250 held-out examples of each task), and only when it is also
# at least twice its standard deviation over fine-tuning seeds: a gain one draw could flip is not called clear.
CLEAR_MARGIN = 5.0
SEED_SPREADS = 2.0
INITS = ("scratch", "pretrained")


def near_the_bar(gain: float, near: float) -> bool:
    """Whether a seed-0 gain lies within ``near`` points of the bar, where another seed could flip the verdict."""
    return abs(gain - CLEAR_MARGIN) < near


def gain_over_seeds(scratch: list[float], pretrained: list[float]) -> dict:
    """The gain of pretraining over the fine-tuning seeds both arms ran, seed by seed: its mean, its standard
    deviation over seeds (None for one seed), the arms' means and the verdict."""
    gains = [p - s for s, p in zip(scratch, pretrained)]
    mean = statistics.fmean(gains)
    spread = statistics.stdev(gains) if len(gains) > 1 else None
    if mean >= CLEAR_MARGIN and (spread is None or mean >= SEED_SPREADS * spread):
        verdict = "clear gain"
    else:
        verdict = "gain within noise" if mean > 0 else "no gain"
    return {
        "seeds": len(gains),
        "scratch_mean": round(statistics.fmean(scratch), 2),
        "pretrained_mean": round(statistics.fmean(pretrained), 2),
        "mean": round(mean, 2),
        "sd": None if spread is None else round(spread, 2),
        "per_seed": [round(g, 2) for g in gains],
        "verdict": verdict,
    }


def distinct_predictions(task_class, run) -> int | None:
    """How many different predictions a run made on the held-out data (1: a constant model); None where the task's
    predictions are rankings (retrieval, classification)."""
    predictions = task_class.held_out_predictions(run)
    return None if predictions is None else len(set(predictions))


def results_of(demo) -> dict:
    """results.json: per task the scores of both inits and their blind controls, how many different answers each
    model gave, VQA per question type, captions naming the exact shapes; the matching probe; kernels and timings."""
    from beit3.training.tasks import TASKS

    tasks = {}
    for task in demo.settings["finetune_steps"]:
        tasks[task] = {
            "metric": TASKS[task].metric_label,
            **{init: round(demo.score(task, init)[1], 2) for init in INITS},
            "blind": round(demo.score(task, "pretrained", blind=True)[1], 2),
            "scratch_blind": round(demo.score(task, "scratch", blind=True)[1], 2),
            "distinct_predictions": {
                init: distinct_predictions(TASKS[task], demo.run_folder(task, init)) for init in INITS
            },
            "over_seeds": {init: [round(v, 2) for v in demo.scores_over_seeds(task, init)] for init in INITS},
            "evaluation": demo.scores(task, "pretrained").get("evaluation"),  # which official tool it reproduces
        }
        tasks[task]["gain"] = gain_over_seeds(
            tasks[task]["over_seeds"]["scratch"], tasks[task]["over_seeds"]["pretrained"]
        )
    if "vqa" in tasks:
        kinds = {init: demo.scores("vqa", init).get("per_question_type", {}) for init in INITS}
        tasks["vqa"]["per_kind"] = {
            kind: {
                "scratch": round(kinds["scratch"][kind]["accuracy"], 2),
                "pretrained": round(row["accuracy"], 2),
                "prior": None if row["prior"] is None else round(row["prior"], 2),
            }
            for kind, row in kinds["pretrained"].items()
        }
    if "captioning" in tasks:
        tasks["captioning"]["exact_shapes"] = {
            init: round(
                exact_shapes(
                    demo.karpathy, demo.run_folder("captioning", init) / TASKS["captioning"].eval_predictions_file
                ),
                2,
            )
            for init in INITS
        }
    contrastive = json.loads((demo.output / "contrastive" / "eval_results.json").read_text())
    return {
        "tasks": tasks,
        "pretraining": {"matching_swap_auc": matching_probe(demo.output / "pretrained", demo.karpathy.parent)},
        "profile": demo.profile,
        "cpu": cpu_description(),
        "kernels": {name: os.environ.get(name, "native") for name in REPRODUCIBLE_KERNELS},
        "seconds": {k: round(v, 1) for k, v in demo.timings.items()},
        "contrastive_stage": {"steps": demo.settings["contrastive_steps"], "tr_r1": round(contrastive["tr_r1"], 2)},
    }


def write_report(demo) -> str:
    """Writes results.json, results.md and the pictures into the demo's output folder; returns the summary line."""
    from beit3.io import write_json_atomic
    from beit3.training.tasks import TASKS

    results = results_of(demo)
    write_json_atomic(demo.output / "results.json", results)
    multimodal = [task for task in results["tasks"] if TASKS[task].reads_text]
    wins = [t for t in multimodal if results["tasks"][t]["gain"]["verdict"] == "clear gain"]
    summary = (
        f"pretrained beats scratch clearly (by {CLEAR_MARGIN:g} points or more, beyond the seed spread where measured) "
        f"on {len(wins)} of the {len(multimodal)} multimodal tasks" + (f": {', '.join(wins)}" if wins else "")
    )
    lines = table_lines(demo.profile, results) + detail_lines(results)
    lines += [
        "",
        summary[0].upper() + summary[1:] + ".",
        "",
        f"The pretrained arm of retrieval starts from the image-text contrastive stage on the pretraining pairs "
        f"({results['contrastive_stage']['steps']} steps; image->text R@1 {results['contrastive_stage']['tr_r1']:.2f} before "
        "fine-tuning), as BEiT-3's retrieval models do; the other tasks start from the masked data modeling export.",
        "",
        "Pictures: `pretraining_loss.png`, `visual_tokens.png`, `captions.png`, `retrieval.png`.",
    ]
    (demo.output / "results.md").write_text("\n".join(lines) + "\n")
    pictures(demo)
    return f"{summary}; see {demo.output / 'results.md'}"


def table_lines(profile: str, results: dict) -> list[str]:
    """results.md's head: the machine and the rules, the table of both inits per task, each task's evaluation and
    the scores per seed where more seeds ran."""
    cpu = results["cpu"]
    lines = [
        "# BEiT-3 demo: fine-tuning from the pretrained model vs from random weights",
        "",
        f"Profile `{profile}` on {cpu['model']} ({', '.join(cpu['instructions']) or 'no AVX2'}; {cpu['cores']} "
        f"logical cores), CPU kernels {', '.join(f'{k}={v}' for k, v in results['kernels'].items())}; "
        "the same fine-tuning budget for both; scores on held-out data (higher is better). "
        "Images swapped: the same model scored with every example's image(s) swapped for another example's, the "
        "control that tells reading the image from answering from the text. A task whose seed-0 gain is near the "
        "bar is fine-tuned with more seeds: its scores are then the means, its gain the mean ± the standard "
        f"deviation over seeds, and it counts as clear from {CLEAR_MARGIN:g} points and {SEED_SPREADS:g} standard "
        "deviations.",
        "",
        "| task | metric | from scratch | pretrained | gain | pretrained, images swapped | scratch, images swapped |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, row in results["tasks"].items():
        gain = row["gain"]
        spread = f" ± {gain['sd']:.2f}, {gain['seeds']} seeds" if gain["seeds"] > 1 else ""
        constant = ", both constant" if all(row["distinct_predictions"][init] == 1 for init in INITS) else ""
        lines.append(
            f"| {task} | {row['metric']} | {gain['scratch_mean']:.2f} | {gain['pretrained_mean']:.2f} | "
            f"{gain['mean']:+.2f}{spread} ({gain['verdict']}{constant}) | {row['blind']:.2f} | {row['scratch_blind']:.2f} |"
        )
    lines += [""] + [f"{task}: {row['evaluation']}." for task, row in results["tasks"].items() if row["evaluation"]]
    return (
        lines
        + [""]
        + [
            f"{task} per seed, scratch -> pretrained: "
            + ", ".join(f"seed {n} {s:.2f} -> {p:.2f}" for n, (s, p) in enumerate(zip(*row["over_seeds"].values())))
            + " (the images-swapped controls, the tables below and the pictures are seed 0's)."
            for task, row in results["tasks"].items()
            if row["gain"]["seeds"] > 1
        ]
    )


def detail_lines(results: dict) -> list[str]:
    """results.md's body: constant models, VQA per question type, exact-shape captions and the matching probe."""
    tasks = results["tasks"]
    lines = [
        f"**Warning: the {init} {task} model gives the same prediction for every held-out example**: it reads neither "
        "the image nor the text."
        for task, row in tasks.items()
        for init, count in row["distinct_predictions"].items()
        if count == 1
    ]
    if lines:
        lines.insert(0, "")
    if "vqa" in tasks:
        lines += [
            "",
            "VQA accuracy per question type; prior: always the type's most frequent training answer.",
            "",
            "| question type | prior | from scratch | pretrained |",
            "|---|---|---|---|",
        ]
        for kind, row in tasks["vqa"]["per_kind"].items():
            prior = "-" if row["prior"] is None else f"{row['prior']:.2f}"
            lines.append(f"| {kind} | {prior} | {row['scratch']:.2f} | {row['pretrained']:.2f} |")
    if "captioning" in tasks:
        exact = tasks["captioning"]["exact_shapes"]
        lines += [
            "",
            f"Generated captions that name exactly the scene's shapes (each with its color and kind): "
            f"{exact['scratch']:.1f}% from scratch, {exact['pretrained']:.1f}% pretrained.",
        ]
    probe = results["pretraining"]["matching_swap_auc"]
    if probe:
        lines += [
            "",
            "The export's image-text matching head, a held-out caption against the same caption with one word "
            f"swapped (AUC; 0.5 is chance): color {probe['color']:.3f}, kind {probe['kind']:.3f}.",
        ]
    return lines


def pictures(demo) -> None:
    """captions.png and retrieval.png from the pretrained arms' predictions on the test split, beside the pretraining
    loss curves and the visual tokenizer's code maps."""
    import torch

    from beit3.data.common import load_rgb
    from beit3.training.tasks import TASKS
    from beit3.visualization import save_captioned_images

    shutil.copy(demo.output / "pretrain" / "loss_curves.png", demo.output / "pretraining_loss.png")
    shutil.copy(demo.output / "vqkd" / "code_maps.png", demo.output / "visual_tokens.png")
    to_tensor = lambda path: torch.from_numpy(
        __import__("numpy").asarray(load_rgb(path), dtype="float32") / 255
    ).permute(2, 0, 1)
    pictures = (("captioning", "captions.png"), ("retrieval", "retrieval.png"))
    folders = {task: demo.run_folder(task, "pretrained") for task, _ in pictures}
    run_side_by_side([demo.trained_model_command(task, folders[task], "predict") for task, _ in pictures], demo.log)
    references = {}
    for image in json.loads(demo.karpathy.read_text())["images"]:
        references[image["cocoid"]] = (
            demo.output / "data" / "coco" / image["filepath"] / image["filename"],
            image["sentences"][0]["raw"],
        )
    for task, picture in pictures:
        folder = folders[task]
        if task == "captioning":
            items = json.loads((folder / TASKS["captioning"].predictions_file).read_text())[:12]
            images = [references[i["image_id"]][0] for i in items]
            texts = [f"generated: {i['caption']}\ntruth: {references[i['image_id']][1]}" for i in items]
            title = "Captions generated by the fine-tuned model (held-out images)"
        else:
            items = json.loads((folder / TASKS["retrieval"].predictions_file).read_text())[:12]
            images = [i["image"] for i in items]
            texts = [f"best caption: {i['captions'][0]}" for i in items]
            title = "Image -> text retrieval over held-out captions"
        save_captioned_images(torch.stack([to_tensor(p) for p in images]), texts, demo.output / picture, title=title)
