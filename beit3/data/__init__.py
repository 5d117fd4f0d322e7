"""Data: one reader per format and the pretraining mixture.

sources.py      the pretraining sources: one registered builder per form (folder, files, shards, saved dataset)
pretraining.py  images, texts, image-text pairs mixed per step (BatchOptions: how samples become a batch)
matching.py     image-text matching batches with hard negatives
synthetic.py    a generated shapes world with captions (tests, demo)
vqa.py, nlvr2.py, karpathy.py, imagenet.py   the fine-tuning datasets' standard formats
images.py       a folder of images -> visual-token codes (encode_images, write_codes/read_codes)
sampling.py     step-indexed batches for exact resume
common.py       what the readers share (jsonl, images, text encoding, batch splitting)
"""
