"""Pretrain BEiT-3 with masked data modeling on images, texts and image-text pairs.

    python tasks/pretrain.py --config configs/pretrain/tiny.yaml [--set train.max_steps=100 ...]
    deepspeed --num_gpus 2 tasks/pretrain.py --config configs/pretrain/tiny.yaml      # 2 processes (CPU or GPU)

The YAML describes the whole run; --set overrides any field. A restart with the same output_dir
resumes from its newest complete checkpoint.

With data.sources.image_codes (the folder tokenizers/encode_images.py wrote for data.sources.images),
the image targets are those precomputed codes and visual_tokenizer may be null:

    python tokenizers/encode_images.py --tokenizer runs/tiny/visual-tokenizer --images runs/tiny/data/images --output runs/tiny/data/image-codes
    python tasks/pretrain.py --config configs/pretrain/tiny.yaml --set data.sources.image_codes=runs/tiny/data/image-codes --set visual_tokenizer=null
"""

from beit3.training.pretraining import run

if __name__ == "__main__":
    run()
