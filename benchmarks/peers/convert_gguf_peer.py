"""Run llama.cpp's ``convert_hf_to_gguf.py`` on a tokenizer it does not know (llama.cpp venv).

Usage: python convert_gguf_peer.py LLAMA_CPP_DIR MODEL_DIR --outtype q8_0 --outfile OUT.gguf

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a test
text, and refuses hashes it has no entry for: a tokenizer trained here has none
(``get_vocab_base_pre`` raises NotImplementedError). Ours is a byte-level BPE with
GPT-2's pre-tokenizer, so "gpt-2" is the right answer; this wrapper gives it and
then runs the converter unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    """Patch the pre-tokenizer lookup, then hand the remaining arguments to the converter."""
    src = Path(sys.argv[1])
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    import convert_hf_to_gguf as conv

    def gpt2_pre(self: object, tokenizer: object) -> str:
        return "gpt-2"

    # The method lives on TextModel: in conversion/base.py in newer llama.cpp, in the
    # script itself in older ones.
    modules = [conv]
    try:
        import conversion.base as base

        modules.append(base)
    except ImportError:
        pass
    for module in modules:
        for name in ("TextModel", "Model", "ModelBase"):
            cls = getattr(module, name, None)
            if cls is not None and "get_vocab_base_pre" in vars(cls):
                cls.get_vocab_base_pre = gpt2_pre
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    conv.main()


if __name__ == "__main__":
    main()
