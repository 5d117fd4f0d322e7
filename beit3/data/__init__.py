"""Data: one reader per format and the pretraining mixture.

pretraining.py  images, texts, image-text pairs (jsonl or webdataset), mixed per step
synthetic.py    a generated shapes world with captions (tests, demo)
vqa.py, nlvr2.py, karpathy.py, imagenet.py   the fine-tuning datasets' standard formats
images.py       a folder of images -> visual-token codes (encode_images, write_codes/read_codes)
sampling.py     step-indexed batches for exact resume
common.py       what the readers share (jsonl, images, text encoding, batch splitting)
"""
