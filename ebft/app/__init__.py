"""Layer 5: the application behind ``train.py``: run directories, callbacks, the Trainer, strategies,
the model card, and the recipe that puts them together; imports every layer below."""
