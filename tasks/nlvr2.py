"""NLVR2: fine-tune Beit3ForVisualReasoning on (two images, statement) -> true/false, score accuracy, write identifier,prediction CSV.

    python tasks/nlvr2.py --config configs/tasks/nlvr2_base.yaml                      # fine-tune, export output_dir/final, evaluate
    python tasks/nlvr2.py --config configs/tasks/nlvr2_base.yaml --mode evaluate      # score output_dir/final (or --model DIR|X.pth)
    python tasks/nlvr2.py --config configs/tasks/nlvr2_base.yaml --mode predict       # predictions on data.predict
    deepspeed --num_gpus 8 tasks/nlvr2.py --config configs/tasks/nlvr2_base.yaml     # many GPUs

--set key=value overrides any config field. See beit3/training/finetune.py for the config sections.
"""

from beit3.training.finetune import run

if __name__ == "__main__":
    run("nlvr2")
