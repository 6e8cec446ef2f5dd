"""Byte-level tokenizer: every UTF-8 byte is a token, plus BOS and EOS. Nothing to download or train."""

from __future__ import annotations

import codecs
import dataclasses


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    bos_id: int = 256
    eos_id: int = 257
    vocab_size: int = 258

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; special tokens are skipped, invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder()

    def to_dict(self) -> dict:
        return {"type": "bytes", **dataclasses.asdict(self)}


class StreamDecoder:
    """Decode tokens one at a time as they are generated: a multi-byte character is printed when its
    last byte arrives, not as replacement characters."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(bytes([token_id])) if 0 <= token_id < 256 else ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def tokenizer_from_dict(data: dict) -> ByteTokenizer:
    """The tokenizer described in a model manifest; only the byte tokenizer exists so far."""
    if not isinstance(data, dict) or data.get("type") != "bytes":
        raise ValueError(f"unsupported tokenizer {data!r}: this version knows only {{'type': 'bytes'}}")
    return ByteTokenizer(**{k: int(v) for k, v in data.items() if k in ("bos_id", "eos_id", "vocab_size")})
