"""Reading instruction-tuning records (Alpaca / Code Alpaca / Evol-Instruct layout).

A record is an object with ``instruction`` (str), ``output`` (str) and an optional ``input`` (str or
null); other keys are ignored. Files are either a JSON list of records or JSON Lines (one record per
line; blank lines skipped). The format is detected from the content, not the file extension: a
file whose first non-blank character is ``[`` is a JSON list, one starting with ``{`` is JSON Lines.

Every error (:class:`DataFormatError`) names the file and the place: ``path:LINE: ...`` for bad
JSON or bad bytes, ``path: line LINE: ...`` for an invalid JSON Lines record and ``path: record
INDEX (line LINE): ...`` for an invalid record of a JSON list (parsed record by record, so that
its line is known).
"""
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

__all__ = ["InstructionRecord", "DataFormatError", "detect_format", "read_records"]

_WHITESPACE = " \t\r\n"


class DataFormatError(ValueError):
    """A malformed input file or record; the message starts with the file and line at fault."""


@dataclass(frozen=True)
class InstructionRecord:
    """One instruction / (optional) input / output triple and where it came from."""
    instruction: str
    output: str
    input: Optional[str]
    source: str
    where: str  # "line 12" (JSON Lines) or "record 3 (line 17)" (JSON list), for messages


def detect_format(path: str) -> str:
    """Return ``"json"`` (a JSON list) or ``"jsonl"`` (JSON Lines) from the file's first character."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as handle:  # bytes: decoding errors are reported later, with their line
        head = handle.read(3)
        if head.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            head = head[3:]
        while True:
            stripped = head.lstrip(_WHITESPACE.encode())
            if stripped:
                first = chr(stripped[0])
                break
            head = handle.read(65536)
            if not head:
                raise DataFormatError(f"{path}: the file is empty")
    if first == "[":
        return "json"
    if first == "{":
        return "jsonl"
    raise DataFormatError(f"{path}: neither a JSON list nor JSON Lines (starts with {first!r})")


def _make_record(obj, path: str, where: str) -> InstructionRecord:
    """Validate one parsed object."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: {where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj and "instruction" not in obj:
        raise DataFormatError(f"{path}: {where}: a 'conversations' record (upstream MindFormers' alpaca_converter.py "
                              "output, prompt already applied); pass the original code_alpaca file, or convert it "
                              "with research/deepseek1_5/alpaca_converter.py --data_path ORIGINAL.json")
    for key in ("instruction", "output"):
        if key not in obj:
            raise DataFormatError(f"{path}: {where}: missing key {key!r}")
        if not isinstance(obj[key], str):
            raise DataFormatError(f"{path}: {where}: key {key!r} must be a string, got {type(obj[key]).__name__}")
    inp = obj.get("input")
    if inp is not None and not isinstance(inp, str):
        raise DataFormatError(f"{path}: {where}: key 'input' must be a string or null, got {type(inp).__name__}")
    return InstructionRecord(instruction=obj["instruction"], output=obj["output"], input=inp,
                             source=path, where=where)


def _read_jsonl(path: str) -> Iterator[InstructionRecord]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as handle:  # binary, decoded per line: a bad byte is reported on its own line
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}:{lineno}: not UTF-8 text ({err})") from err
            if not line.strip(_WHITESPACE):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                hint = ""
                if lineno == 1 and line.strip() == "{":
                    hint = " (a pretty-printed JSON object? expected a JSON list of records or one record per line)"
                raise DataFormatError(f"{path}:{lineno}: invalid JSON line: {err.msg} at column {err.colno}{hint}") \
                    from err
            yield _make_record(obj, path, f"line {lineno}")


def _read_json_list(path: str) -> Iterator[InstructionRecord]:
    """Parse a JSON list element by element, so each record's line is known for messages."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    decoder = json.JSONDecoder()
    size = len(text)
    line, counted = 1, 0  # line number at text offset `counted`

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def skip(pos: int) -> int:
        while pos < size and text[pos] in _WHITESPACE:
            pos += 1
        return pos

    pos = skip(0) + 1  # past '[' (detect_format checked it)
    index = 0
    pos = skip(pos)
    if pos < size and text[pos] == "]":
        pos = skip(pos + 1)
    else:
        while True:
            if pos >= size:
                raise DataFormatError(f"{path}:{line_at(size)}: unterminated JSON list")
            where = f"record {index} (line {line_at(pos)})"
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{err.lineno}: {where}: invalid JSON: {err.msg} at column {err.colno}") \
                    from err
            yield _make_record(obj, path, where)
            index += 1
            pos = skip(pos)
            if pos < size and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < size and text[pos] == "]":
                pos = skip(pos + 1)
                break
            raise DataFormatError(f"{path}:{line_at(min(pos, size))}: expected ',' or ']' after {where}")
    if pos < size:
        raise DataFormatError(f"{path}:{line_at(pos)}: extra data after the JSON list")


def read_records(path: str, fmt: Optional[str] = None) -> Iterator[InstructionRecord]:
    """Yield the records of ``path``; ``fmt`` ("json" / "jsonl") skips the detection."""
    fmt = fmt or detect_format(path)
    if fmt == "json":
        return _read_json_list(path)
    if fmt == "jsonl":
        return _read_jsonl(path)
    raise ValueError(f"unknown format {fmt!r} for {path} (expected 'json' or 'jsonl')")
