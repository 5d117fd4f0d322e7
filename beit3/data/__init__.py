"""Data: one reader per format and the pretraining mixture.

pretraining.py  images, texts, image-text pairs (jsonl or webdataset), mixed per step
synthetic.py    a generated shapes world with captions (tests, demo)
vqa.py, nlvr2.py, karpathy.py, imagenet.py   the fine-tuning datasets' standard formats
common.py       what the readers share (jsonl, images, text encoding, batch splitting)
"""
