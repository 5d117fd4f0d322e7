"""COCO captioning (Karpathy split): fine-tune Beit3ForCaptioning with the official causal masked LM, score BLEU-4 and CIDEr, write COCO results JSON.

    python tasks/captioning.py --config configs/tasks/captioning_base.yaml                      # fine-tune, export output_dir/final, evaluate
    python tasks/captioning.py --config configs/tasks/captioning_base.yaml --mode evaluate      # score output_dir/final (or --model DIR|X.pth)
    python tasks/captioning.py --config configs/tasks/captioning_base.yaml --mode predict       # predictions on data.predict
    deepspeed --num_gpus 8 tasks/captioning.py --config configs/tasks/captioning_base.yaml     # many GPUs

--set key=value overrides any config field. See beit3/training/finetune.py for the config sections.
"""

from beit3.training.finetune import run

if __name__ == "__main__":
    run("captioning")
