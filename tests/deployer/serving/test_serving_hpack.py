"""HPACK decoding against the examples of RFC 7541 Appendix C."""

from __future__ import annotations

from fractions import Fraction

import pytest

from deployer.serving.hpack import (
    HUFFMAN_LENGTHS,
    Decoder,
    HpackError,
    canonical_codes,
    encode_integer,
    encode_literal,
    huffman_decode,
)


def test_huffman_code_is_complete_and_matches_the_rfc_codes() -> None:
    assert len(HUFFMAN_LENGTHS) == 257
    assert sum(Fraction(1, 2**length) for length in HUFFMAN_LENGTHS) == 1
    codes = canonical_codes()
    # A sample of (symbol, code, length) rows from RFC 7541 Appendix B.
    for symbol, code, length in [
        (0, 0x1FF8, 13),
        (10, 0x3FFFFFFC, 30),
        (32, 0x14, 6),
        (48, 0x0, 5),
        (97, 0x3, 5),
        (127, 0xFFFFFFC, 28),
        (199, 0x1FFFFEC, 25),
        (255, 0x3FFFFEE, 26),
        (256, 0x3FFFFFFF, 30),
    ]:
        assert (codes[symbol], HUFFMAN_LENGTHS[symbol]) == (code, length), symbol


def test_rfc_huffman_string_example() -> None:
    assert huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    assert huffman_decode(bytes.fromhex("a8eb10649cbf")) == b"no-cache"


def test_rfc_request_examples_with_huffman_and_dynamic_table() -> None:
    decoder = Decoder()
    first = decoder.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
    assert first == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
    ]
    second = decoder.decode(bytes.fromhex("828684be5886a8eb10649cbf"))
    assert second[-1] == (b"cache-control", b"no-cache")
    assert second[3] == (b":authority", b"www.example.com")  # from the dynamic table
    third = decoder.decode(bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"))
    assert third[-1] == (b"custom-key", b"custom-value")
    assert decoder.size == 164  # the table size the RFC gives after the third request


def test_eviction_and_size_update() -> None:
    decoder = Decoder(max_table_size=4096)
    block = encode_integer(0, 6, 0x40) + b"\x01a" + b"\x01b"  # literal with indexing, a: b
    assert decoder.decode(block) == [(b"a", b"b")]
    assert decoder.size == 34
    assert decoder.decode(encode_integer(0, 5, 0x20)) == []  # size update to 0 evicts all
    assert decoder.size == 0
    with pytest.raises(HpackError):
        decoder.decode(encode_integer(62, 7, 0x80))  # index into the now empty table
    with pytest.raises(HpackError):
        decoder.decode(encode_integer(5000, 5, 0x20))  # above what we advertised


@pytest.mark.parametrize(
    "bad",
    [
        bytes.fromhex("ff"),  # 8 bits of padding
        bytes.fromhex("00"),  # padding that is not all ones
        bytes.fromhex("ffffffff"),  # contains EOS
    ],
)
def test_bad_huffman_is_rejected(bad: bytes) -> None:
    with pytest.raises(HpackError):
        huffman_decode(bad)


def test_literal_round_trip_and_truncation() -> None:
    block = encode_literal(b"grpc-status", b"0") + encode_literal(b"x" * 200, b"y" * 300)
    assert Decoder().decode(block) == [(b"grpc-status", b"0"), (b"x" * 200, b"y" * 300)]
    with pytest.raises(HpackError):
        Decoder().decode(block[:-1])
