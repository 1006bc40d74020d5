"""The finetune job and what it needs: the job itself, the models it runs, the built-in tasks and the user's
data, prompt encoding, training with the Hugging Face ``Trainer``, evaluation and ROUGE, the built-in models.

- ``job``: :func:`job.run`, the job behind ``modulora finetune``, read top to bottom;
- ``models``: the default quantizer, a quantized base (``modulora.load``), PEFT's LoRA config for it, a base
  plus an adapter for inference; ``console``: status lines from the main process;
- ``train`` / ``train_config``: the Trainer that checkpoints the adapter only, and the job's options;
- ``tasks`` / ``data`` / ``encoding``: examples from stdlib docstrings or the user's files, as token ids;
- ``evaluate`` / ``rouge``: loss, perplexity, generation and task metrics;
- ``pretrained``: SmolLM2-135M-Instruct (real weights, no hub); ``tiny``: a tiny random Llama for smoke tests.

Nothing is imported here: ``train`` imports transformers, so each module is imported where it is used.
"""
