"""Data: readers for each format, the pretraining mixture, generated worlds for tests and the demo."""
