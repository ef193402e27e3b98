"""HPACK (RFC 7541) header decoding, and the few literal encodings the gRPC server sends."""

from __future__ import annotations

from collections import deque

# Appendix A: the static table (index 1..61).
STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)

# Appendix B: the Huffman code is canonical (codes assigned in order of length, then
# symbol), so the bit length of each symbol 0..255 and EOS (256) defines it completely.
HUFFMAN_LENGTHS: tuple[int, ...] = (
    # 0-31: control characters
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    # 32-63: ' ' ! " # $ % & ' ( ) * + , - . / 0-9 : ; < = > ?
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    # 64-95: @ A-Z [ \ ] ^ _
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    # 96-127: ` a-z { | } ~ DEL
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    # 128-255
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    # 256: EOS
    30,
)  # fmt: skip

EOS = 256


class HpackError(ValueError):
    """The header block cannot be decoded (a COMPRESSION_ERROR in HTTP/2 terms)."""


def canonical_codes(lengths: tuple[int, ...] = HUFFMAN_LENGTHS) -> list[int]:
    """The code of each symbol, from the bit lengths (RFC 7541's canonical assignment)."""
    order = sorted(range(len(lengths)), key=lambda sym: (lengths[sym], sym))
    codes = [0] * len(lengths)
    code = 0
    previous = lengths[order[0]]
    for sym in order:
        code <<= lengths[sym] - previous
        previous = lengths[sym]
        codes[sym] = code
        code += 1
    return codes


def _build_decoder() -> dict[tuple[int, int], int]:
    codes = canonical_codes()
    return {(HUFFMAN_LENGTHS[sym], code): sym for sym, code in enumerate(codes)}


_DECODE = _build_decoder()
_MIN_LENGTH = min(HUFFMAN_LENGTHS)


_CACHE: dict[bytes, bytes] = {}
_CACHE_LIMIT = 4096


def huffman_decode(data: bytes | memoryview) -> bytes:
    """Decode a Huffman-coded string literal (memoised: clients repeat the same values)."""
    raw = bytes(data)
    cached = _CACHE.get(raw)
    if cached is not None:
        return cached
    decoded = _huffman_decode(raw)
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.clear()
    _CACHE[raw] = decoded
    return decoded


def _huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    code = 0
    length = 0
    table = _DECODE
    for byte in data:
        for shift in (7, 6, 5, 4, 3, 2, 1, 0):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            if length >= _MIN_LENGTH:
                sym = table.get((length, code))
                if sym is not None:
                    if sym == EOS:
                        raise HpackError("EOS symbol inside a Huffman string")
                    out.append(sym)
                    code = 0
                    length = 0
                elif length > 30:
                    raise HpackError("invalid Huffman code")
    # What is left must be padding: fewer than 8 bits, all ones (a prefix of EOS).
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def _integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """Decode an HPACK integer whose prefix is in data[pos]; returns (value, next pos)."""
    mask = (1 << prefix_bits) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 28:
            raise HpackError("integer too large")


def encode_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """Encode an HPACK integer; `first` holds the bits above the prefix in the first byte."""
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes([first | value])
    out = bytearray([first | mask])
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal without indexing, new name, no Huffman coding."""
    return b"\x00" + encode_integer(len(name), 7) + name + encode_integer(len(value), 7) + value


def encode_literal_indexed_name(index: int, value: bytes) -> bytes:
    """A header as a literal without indexing whose name is static-table entry `index`."""
    return encode_integer(index, 4) + encode_integer(len(value), 7) + value


class Decoder:
    """Decodes header blocks, keeping the dynamic table between them (one per connection)."""

    def __init__(self, max_table_size: int = 4096) -> None:
        self.max_allowed = max_table_size  # what we advertised in SETTINGS_HEADER_TABLE_SIZE
        self.max_size = max_table_size
        self.size = 0
        self.dynamic: deque[tuple[bytes, bytes]] = deque()

    def _add(self, name: bytes, value: bytes) -> None:
        entry_size = len(name) + len(value) + 32
        self.dynamic.appendleft((name, value))
        self.size += entry_size
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.dynamic:
            old_name, old_value = self.dynamic.pop()
            self.size -= len(old_name) + len(old_value) + 32

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if index <= 0:
            raise HpackError("header index 0")
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        position = index - len(STATIC_TABLE) - 1
        if position >= len(self.dynamic):
            raise HpackError(f"header index {index} is past the dynamic table")
        return self.dynamic[position]

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(data):
            raise HpackError("truncated string")
        huffman = data[pos] & 0x80
        length, pos = _integer(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HpackError("truncated string")
        raw = data[pos:end]
        return (huffman_decode(raw) if huffman else raw), end

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Decode one complete header block into (name, value) pairs."""
        headers: list[tuple[bytes, bytes]] = []
        pos = 0
        size = len(block)
        while pos < size:
            byte = block[pos]
            if byte & 0x80:  # indexed header field
                index, pos = _integer(block, pos, 7)
                headers.append(self._entry(index))
            elif byte & 0x40:  # literal with incremental indexing
                index, pos = _integer(block, pos, 6)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                self._add(name, value)
                headers.append((name, value))
            elif byte & 0x20:  # dynamic table size update
                new_size, pos = _integer(block, pos, 5)
                if new_size > self.max_allowed:
                    raise HpackError("table size update above the advertised maximum")
                self.max_size = new_size
                self._evict()
            else:  # literal without indexing (0000) or never indexed (0001)
                index, pos = _integer(block, pos, 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                headers.append((name, value))
        return headers
