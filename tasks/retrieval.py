"""COCO / Flickr30k retrieval (Karpathy split): fine-tune Beit3ForImageTextRetrieval contrastively, score R@1/5/10 both ways.

    python tasks/retrieval.py --config configs/tasks/retrieval_base.yaml                      # fine-tune, export output_dir/final, evaluate
    python tasks/retrieval.py --config configs/tasks/retrieval_base.yaml --mode evaluate      # score output_dir/final (or --model DIR|X.pth)
    python tasks/retrieval.py --config configs/tasks/retrieval_base.yaml --mode predict       # predictions on data.predict
    deepspeed --num_gpus 8 tasks/retrieval.py --config configs/tasks/retrieval_base.yaml     # many GPUs

--set key=value overrides any config field. See beit3/training/finetune.py for the config sections.
"""

from beit3.training.finetune import run

if __name__ == "__main__":
    run("retrieval")
