"""Run llama.cpp's own `convert_hf_to_gguf.py` on a checkpoint, in this process, unmodified on disk.

    python -m edgevl.bench.gguf_convert LLAMA_CPP_SOURCE CHECKPOINT --outfile OUT.gguf --outtype f32 [--mmproj]

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a probe string and
refuses hashes it does not know. The synthetic tokenizer of `edgevl make-model` splits text the
way Qwen2's does but is its own vocabulary, so its hash is unknown: when (and only when) the
converter gives up, this reports `qwen2`. Real Qwen3-VL checkpoints keep the converter's own answer.

Qwen's converter tries a SentencePiece vocabulary first and falls back to BPE on
FileNotFoundError, but imports `sentencepiece` before looking for the file; a checkpoint without
`tokenizer.model` gets that FileNotFoundError here first, so `sentencepiece` need not be installed.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

FALLBACK_PRE_TOKENIZER = "qwen2"


def main(argv: list[str]) -> None:
    source, *converter_args = argv
    script = Path(source) / "convert_hf_to_gguf.py"
    # the converter's imports: its `conversion` package and the gguf-py it ships
    sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return FALLBACK_PRE_TOKENIZER

    sentencepiece_vocab = TextModel._create_vocab_sentencepiece

    def create_vocab_sentencepiece(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(self.dir_model / "tokenizer.model")
        return sentencepiece_vocab(self)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
    sys.argv = [str(script), *converter_args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
