"""Train a visual tokenizer (VQ-KD of BEiT v2, or a BEiT v1 style dVAE) on a folder of images.

    python tokenizers/train_visual_tokenizer.py --kind vqkd --config configs/tokenizers/vqkd_tiny.yaml [--set train.max_steps=500]
    deepspeed --num_gpus 8 tokenizers/train_visual_tokenizer.py --kind vqkd --config configs/tokenizers/vqkd_base.yaml

Progress bar, metrics.jsonl (loss, codebook usage, perplexity), checkpoints and resume come from the
shared engine; the trained tokenizer is written to output_dir/tokenizer (VisualTokenizer.from_pretrained).
"""

from beit3.training.tokenizer_training import run

if __name__ == "__main__":
    run()
