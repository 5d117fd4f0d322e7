"""ImageNet-style classification: fine-tune Beit3ForImageClassification (layer decay, mixup/cutmix, label smoothing), score top-1/top-5.

    python tasks/classification.py --config configs/tasks/classification_base.yaml                      # fine-tune, export output_dir/final, evaluate
    python tasks/classification.py --config configs/tasks/classification_base.yaml --mode evaluate      # score output_dir/final (or --model DIR|X.pth)
    python tasks/classification.py --config configs/tasks/classification_base.yaml --mode predict       # predictions on data.predict
    deepspeed --num_gpus 8 tasks/classification.py --config configs/tasks/classification_base.yaml     # many GPUs

--set key=value overrides any config field. See beit3/training/finetune.py for the config sections.
"""

from beit3.training.finetune import run

if __name__ == "__main__":
    run("classification")
