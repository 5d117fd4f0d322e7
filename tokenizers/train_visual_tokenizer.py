"""Train a visual tokenizer (VQ-KD of BEiT v2, or a BEiT v1 style dVAE) on a folder of images.

    python tokenizers/train_visual_tokenizer.py --kind vqkd --config configs/tokenizers/vqkd_tiny.yaml [--set train.max_steps=500]

The runner, its options and the config it reads: beit3/training/tokenizer_training.py (or --help).
"""

from beit3.training.tokenizer_training import run

if __name__ == "__main__":
    run()
