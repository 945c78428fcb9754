"""Make a tiny Llama model directory for vLLM, with no download.

Usage (with the vLLM venv's interpreter, which has transformers and tokenizers)::

    python scripts/make_tiny_llama.py OUT_DIR

Writes config, generation config and a byte-level BPE tokenizer trained here on a
bounded, sorted subset of the Python standard library's sources. There are no
weights: serve it with ``--load-format dummy`` (random weights, gibberish text,
but the real engine, scheduler, streaming and metrics).

Idempotent: a stamp file written last records the spec; when it matches, nothing
is done. Deterministic for a given interpreter (the corpus is its stdlib).
"""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]  # ids 0, 1, 2, ...
CORPUS_BYTES = 2_000_000

# Head size 64: the CPU attention backend rejects small head sizes such as 16
# only on the first request, so a bad choice here surfaces late.
MODEL_SPEC: dict[str, int] = {
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "vocab_size": 4096,
    "max_position_embeddings": 2048,
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

STAMP = ".chatfleet-tiny-llama.json"
STAMP_CONTENT = {"spec": MODEL_SPEC, "special_tokens": SPECIAL_TOKENS, "chat_template": CHAT_TEMPLATE}


def is_complete(out: Path) -> bool:
    """True when ``out`` holds a model made by this exact version of the script."""
    stamp = out / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == STAMP_CONTENT


def corpus_files() -> list[str]:
    """Sorted top-level stdlib sources, up to CORPUS_BYTES, so training is quick and repeatable."""
    files: list[str] = []
    total = 0
    for path in sorted(Path(sysconfig.get_path("stdlib")).glob("*.py")):
        files.append(str(path))
        total += path.stat().st_size
        if total >= CORPUS_BYTES:
            break
    return files


def train_tokenizer() -> PreTrainedTokenizerFast:
    # Imported here, not at the top: importing transformers takes seconds, and the
    # already-complete path should not pay for it.
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SPEC["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(corpus_files(), trainer)
    # Like Llama: encoding a plain prompt prepends BOS (chat prompts get it from the template).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SPEC["max_position_embeddings"],
    )


def make(out: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = LlamaConfig(
        **MODEL_SPEC,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / STAMP).write_text(json.dumps(STAMP_CONTENT, indent=2))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    if is_complete(out):
        print(f"tiny llama already at {out}", file=sys.stderr)
        return 0
    started = time.monotonic()
    make(out)
    print(f"made tiny llama at {out} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
