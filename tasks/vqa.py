"""VQAv2: fine-tune Beit3ForVisualQuestionAnswering (soft-score BCE over the answer vocabulary), score VQA accuracy, write the test-dev submission JSON.

    python tasks/vqa.py --config configs/tasks/vqa_base.yaml                      # fine-tune, export output_dir/final, evaluate
    python tasks/vqa.py --config configs/tasks/vqa_base.yaml --mode evaluate      # score output_dir/final (or --model DIR|X.pth)
    python tasks/vqa.py --config configs/tasks/vqa_base.yaml --mode predict       # predictions on data.predict
    deepspeed --num_gpus 8 tasks/vqa.py --config configs/tasks/vqa_base.yaml     # many GPUs

--set key=value overrides any config field. See beit3/training/finetune.py for the config sections.
"""

from beit3.training.finetune import run

if __name__ == "__main__":
    run("vqa")
