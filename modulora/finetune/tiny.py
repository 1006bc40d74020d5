"""A tiny random Llama with a byte-level tokenizer and a chat template: nothing to download, seconds to
train. For smoke tests of the whole pipeline (``python -m modulora.finetune.tiny DIR`` writes one), never for
numbers that mean anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_llama_dir(directory: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Save a random ``LlamaForCausalLM`` (hidden ``hidden``, ``layers`` blocks) and ByT5's byte tokenizer
    (with :data:`CHAT_TEMPLATE`) as a Hugging Face model directory; returns it."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = ByT5Tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    d = Path(directory)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}


def run_modulora(*args: object, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m modulora ARGS`` in a subprocess, one thread and quiet warnings (tests of the command);
    with ``check``, a failure raises with the end of its stderr."""
    p = subprocess.run([sys.executable, "-m", "modulora", *map(str, args)], capture_output=True, text=True,
                       env=_quiet_env(), timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"modulora {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


_WITH_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('modulora', run_name='__main__', alter_sys=True)")


def interrupt_modulora(*args: object, when: str, timeout: float = 300) -> tuple[int, str]:
    """Run ``python -m modulora ARGS``, press Ctrl-C (SIGINT) as soon as a line of its output contains
    ``when``, and return its exit status and the output after that line."""
    # unbuffered: a block-buffered stdout would hand over the ``when`` line only at exit, after the run is over.
    # SIGINT as a terminal gives it: a shell without job control starts background commands (``cmd &``, a CI
    # runner's) with SIGINT ignored, the child inherits that, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-c", _WITH_CTRL_C, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**_quiet_env(), "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout or ():
            if when in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, rest


if __name__ == "__main__":
    print(tiny_llama_dir(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
