"""The finetune job and what it needs: the built-in tasks and the user's data, prompt encoding, training with
the Hugging Face ``Trainer``, evaluation and ROUGE, and the built-in models.

- ``train`` / ``train_config``: the Trainer that checkpoints the adapter only, and its hyper-parameters;
- ``tasks`` / ``data`` / ``encoding``: examples from stdlib docstrings or the user's files, as token ids;
- ``evaluate`` / ``rouge``: loss, perplexity, generation and task metrics;
- ``pretrained``: SmolLM2-135M-Instruct (real weights, no hub); ``tiny``: a tiny random Llama for smoke tests.

Nothing is imported here: ``train`` imports transformers, so each module is imported where it is used.
"""
