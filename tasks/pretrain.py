"""Pretrain BEiT-3 with masked data modeling on images, texts and image-text pairs.

    python tasks/pretrain.py --config configs/pretrain/tiny.yaml [--set train.max_steps=100 ...]

The runner, its options and the config it reads: beit3/training/pretraining.py (or --help).
"""

from beit3.training.pretraining import run

if __name__ == "__main__":
    run()
