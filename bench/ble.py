"""BLE advertisement throughput: dispatch + decoders + dedupe vs a bare struct.unpack.

    .venv/bin/python bench/ble.py [--packets N] [--repeats R]

Each device sends every measurement R times (as real sensors do, several times a second);
the driver path (`Dispatcher.handle`: address lookup, decoder, replay guard, dedupe, emit
to a counting context) is timed against a bare `struct.unpack` of the very same bytes, in
the same run. Printed: adverts/s for each, the ratio, and how many readings were emitted.
"""

from __future__ import annotations

import argparse
import logging
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.ble.config import compile_device
from drivers.ble.dispatch import Advert, Dispatcher
from drivers.testing import RecordingContext
from gateway.config import loads

UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
PLAIN_MAC, ENC_MAC, RUUVI_MAC = "54:48:E6:8F:80:A1", "54:48:E6:8F:80:A5", "CB:B8:33:4C:88:4F"

CONFIG = f"""
[devices.plain]
driver = "ble"
address = "{PLAIN_MAC}"
format = "bthome"
[devices.plain.points.temperature]
[devices.plain.points.humidity]
[devices.enc]
driver = "ble"
address = "{ENC_MAC}"
format = "bthome"
bindkey = "{KEY.hex()}"
[devices.enc.points.temperature]
[devices.enc.points.humidity]
[devices.ruuvi]
driver = "ble"
address = "{RUUVI_MAC}"
format = "ruuvi"
[devices.ruuvi.points.temperature]
[devices.ruuvi.points.humidity]
[devices.ruuvi.points.pressure]
"""


def counting_context() -> RecordingContext:
    """Counts the readings emitted and records nothing (the timed path stays the driver's)."""
    logger = logging.getLogger("bench.ble")
    logger.setLevel(logging.ERROR)
    return RecordingContext(logger, record=False)


def encrypt(plain: bytes, counter: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM

    ctr = struct.pack("<I", counter)
    nonce = bytes.fromhex(ENC_MAC.replace(":", "")) + b"\xd2\xfc\x41" + ctr
    sealed = AESCCM(KEY, tag_length=4).encrypt(nonce, plain, None)
    return b"\x41" + sealed[:-4] + ctr + sealed[-4:]


def packets(kind: str, n: int, repeats: int) -> list[Advert]:
    out: list[Advert] = []
    for i in range(n):
        t, h = 2000 + i % 700, 5000 + i % 300
        if kind == "plain":
            data = struct.pack("<BBBBhBH", 0x40, 0x00, i & 0xFF, 0x02, t, 0x03, h)
            adv = Advert(PLAIN_MAC, -60, service_data={UUID: data})
        elif kind == "encrypted":
            data = encrypt(struct.pack("<BhBH", 0x02, t, 0x03, h), i + 1)
            adv = Advert(ENC_MAC, -60, service_data={UUID: data})
        else:
            raw = bytearray.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
            raw[1:3] = struct.pack(">h", t)
            raw[16:18] = struct.pack(">H", i & 0xFFFF)
            adv = Advert(RUUVI_MAC, -60, manufacturer_data={0x0499: bytes(raw)})
        out.extend([adv] * repeats)
    return out


def bare(kind: str) -> Callable[[Advert], object]:
    """The baseline: unpack the same bytes with one precompiled struct, nothing else."""
    if kind == "plain":
        s = struct.Struct("<BBBBhBH")
        return lambda a: s.unpack(a.service_data[UUID])
    if kind == "encrypted":
        s = struct.Struct("<B6sI4s")  # info, ciphertext, counter, MIC (not decrypted)
        return lambda a: s.unpack(a.service_data[UUID])
    r = struct.Struct(">BhHHhhhHBH6s")
    return lambda a: r.unpack(a.manufacturer_data[0x0499])


def run(kind: str, n: int, repeats: int, rounds: int) -> tuple[float, float, int]:
    advs = packets(kind, n, repeats)
    cfg = loads(CONFIG)
    best_driver = best_bare = float("inf")
    emitted = 0
    for _ in range(rounds):
        ctx = counting_context()
        d = Dispatcher(ctx, discovery=False)
        for spec in cfg.devices.values():
            d.add(compile_device(spec))
        handle = d.handle
        t0 = time.perf_counter()
        for a in advs:
            handle(a)
        best_driver = min(best_driver, time.perf_counter() - t0)
        emitted = ctx.count
        unpack = bare(kind)
        t0 = time.perf_counter()
        for a in advs:
            unpack(a)
        best_bare = min(best_bare, time.perf_counter() - t0)
    return len(advs) / best_driver, len(advs) / best_bare, emitted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=20000, help="measurements per kind")
    ap.add_argument("--repeats", type=int, default=5, help="times each measurement is heard")
    ap.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()
    print(
        f"BLE adverts: {args.packets} measurements x {args.repeats} repeats per kind, "
        f"best of {args.rounds}; python {sys.version.split()[0]}"
    )
    print(f"{'kind':<10} {'driver adv/s':>14} {'bare adv/s':>14} {'ratio':>7} {'readings':>9}")
    for kind in ("plain", "encrypted", "ruuvi"):
        drv, base, emitted = run(kind, args.packets, args.repeats, args.rounds)
        print(f"{kind:<10} {drv:>14,.0f} {base:>14,.0f} {base / drv:>6.1f}x {emitted:>9}")
    print("ratio = bare / driver (how many times slower the full path is than struct.unpack)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
