import random

import pytest
import torch

from feature_store.codec import CodecError, decode, encode


def state():
    g = torch.Generator().manual_seed(0)
    return {
        "k0": torch.randn(2, 4, 10, 8, generator=g),
        "valid0": torch.rand(2, 10, generator=g) > 0.3,
        "latest_ts": torch.tensor([1_700_000_000, -1]),
        "cls": torch.randn(2, 32, generator=g).half(),
        "empty": torch.zeros(0, 3),
    }


def test_fp32_round_trip_is_exact():
    s = state()
    out, meta = decode(encode(s, "fp32", meta={"seq_version": 7}))
    assert meta == {"seq_version": 7} and out.keys() == s.keys()
    for k in s:
        assert out[k].dtype == s[k].dtype and torch.equal(out[k], s[k]), k


@pytest.mark.parametrize("precision,tol", [("bf16", 1e-2), ("fp16", 1e-3)])
def test_reduced_precision_keeps_dtypes_and_ints_exact(precision, tol):
    s = state()
    blob = encode(s, precision)
    assert len(blob) < len(encode(s, "fp32"))
    out, _ = decode(blob)
    assert torch.equal(out["latest_ts"], s["latest_ts"]) and torch.equal(out["valid0"], s["valid0"])
    assert out["k0"].dtype == torch.float32
    assert (out["k0"] - s["k0"]).abs().max() <= tol * s["k0"].abs().max()


def test_every_corruption_is_a_codec_error():
    blob = encode(state(), "fp32")
    rng = random.Random(0)
    for _ in range(300):
        b = bytearray(blob)
        kind = rng.randrange(3)
        if kind == 0:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b = b[: rng.randrange(len(b))]
        else:
            b += bytes([rng.randrange(256)])
        with pytest.raises(CodecError):
            decode(bytes(b))
    for junk in (b"", b"LGUS", b"\x00" * 64, "text"):
        with pytest.raises(CodecError):
            decode(junk)


def test_forged_header_with_valid_checksum_is_refused():
    import hashlib
    import json
    import struct

    def forge(header: dict, payload: bytes) -> bytes:
        h = json.dumps(header).encode()
        body = struct.pack("<4sHHI", b"LGUS", 1, 0, len(h)) + h + payload
        return body + hashlib.blake2b(body, digest_size=16).digest()

    with pytest.raises(CodecError, match="runs past the end"):
        decode(
            forge(
                {
                    "meta": {},
                    "tensors": [{"name": "x", "dtype": "float32", "stored": "float32", "shape": [1000]}],
                },
                b"\x00" * 16,
            )
        )
    with pytest.raises(CodecError, match="bad tensor entry"):
        decode(
            forge(
                {
                    "meta": {},
                    "tensors": [{"name": "x", "dtype": "object", "stored": "float32", "shape": [1]}],
                },
                b"\x00" * 4,
            )
        )
    with pytest.raises(CodecError, match="trailing bytes"):
        decode(forge({"meta": {}, "tensors": []}, b"\x00"))
    with pytest.raises(CodecError, match="unreadable header"):
        decode(forge({"tensors": []}, b""))
