"""One physical Modbus bus (an RS-485 line or a TCP host:port): one pymodbus client, one lock.

Every unit on the bus goes through `Bus.session()`, which waits for the lock (failing at once
when `queue_size` requests already wait), reconnects with backoff when the link is down, and
keeps `frame_gap` of silence between frames. Inside a session, `read`/`write_*` turn pymodbus
outcomes into the gateway's errors: an exception response is a DeviceProtocolError named after
its code, no answer is a DeviceTimeoutError, a broken link is dropped and is a
DeviceUnavailableError.
Imports pymodbus: only the driver's connection code imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from gateway.errors import (
    ConnectError,
    DeviceProtocolError,
    DeviceTimeoutError,
    DeviceUnavailableError,
)

from .config import BusSettings
from .errors import BusBusyError
from .registers import exception_name

# pymodbus logs every time-out at ERROR and every reconnect at WARNING; the driver reports
# faults itself (first failure WARNING, repeats DEBUG): the daemon's logging setup shows
# pymodbus' own lines at DEBUG (gateway.logs.LibraryNoise).

#: Consecutive time-outs (of any unit) after which a TCP connection is considered dead.
TCP_DROP_AFTER_TIMEOUTS = 3

#: pymodbus' own time-out, fixed when a client is made (it works from its own copy of the
#: parameters, so it cannot follow the unit being asked). Every connect and request is bounded
#: by its device's own deadline with `asyncio.timeout` instead; this only has to be longer.
CLIENT_TIMEOUT = 24 * 3600.0


class Bus:
    def __init__(self, settings: BusSettings, logger: logging.Logger) -> None:
        self.settings = settings
        self.logger = logger
        self.users: set[str] = set()
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._last_frame = 0.0
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self.backoff = settings.retry.backoff()  # between failed connects
        self._next_connect = 0.0
        self.requests = 0  # frames sent, for the benchmark and diagnostics
        self._timeouts = 0  # consecutive, any unit

    @property
    def label(self) -> str:
        return self.settings.label

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        s = self.settings
        timeout = CLIENT_TIMEOUT
        # reconnect_delay=0: pymodbus must not reconnect behind our back; retries=0: a
        # silent unit costs one time-out, and the breaker decides about repeats.
        if s.transport == "tcp":
            client: AsyncModbusTcpClient | AsyncModbusSerialClient = AsyncModbusTcpClient(
                s.host, port=s.port, timeout=timeout, retries=0, reconnect_delay=0
            )
        else:
            client = AsyncModbusSerialClient(
                s.serial_port, baudrate=s.baudrate, parity=s.parity, stopbits=s.stopbits,
                bytesize=s.bytesize, timeout=timeout, retries=0, reconnect_delay=0,
            )  # fmt: skip
        # One silent unit must not tear down the link its neighbours share (see _timed_out).
        client.set_max_no_responses(1 << 30)
        return client

    async def _ensure_connected(self, device: str, deadline: float) -> None:
        client = self._client
        if client is not None and client.connected:
            return
        now = time.monotonic()
        if now < self._next_connect:
            raise ConnectError(
                device, f"{self.label}: not connected (next attempt in "
                f"{self._next_connect - now:.1f} s)",
            )  # fmt: skip
        limit = max(deadline - now, 0.01)
        if client is None:
            client = self._client = self._make_client()
        try:
            async with asyncio.timeout(limit):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException) as exc:
            ok = False
            reason = str(exc) or type(exc).__name__
        else:
            reason = "connection refused or port unavailable"
        if ok and client.connected:
            self.backoff.reset()
            self._next_connect = 0.0
            self.logger.debug("modbus %s: connected", self.label)
            return
        client.close()
        # Jittered, so several gateways do not reconnect in step.
        self._next_connect = time.monotonic() + self.backoff.next()
        raise ConnectError(device, f"{self.label}: cannot connect: {reason}")

    def _timed_out(self) -> None:
        # A TCP link on which nobody answers any more (a half-open connection, a gateway that
        # allows one client and lost track of us) is dropped and reopened. One silent unit
        # among live ones does not trigger this: their answers reset the count.
        self._timeouts += 1
        if self.settings.transport == "tcp" and self._timeouts >= TCP_DROP_AFTER_TIMEOUTS:
            self.logger.debug(
                "modbus %s: %d time-outs in a row, reconnecting", self.label, self._timeouts
            )
            self._timeouts = 0
            self.drop()

    def drop(self) -> None:
        """Close a broken connection; the next session reconnects (after backoff)."""
        if self._client is not None:
            self._client.close()

    @contextlib.asynccontextmanager
    async def session(self, device: str, unit: int, deadline: float) -> AsyncIterator[Session]:
        """Hold the bus for a few requests of one unit, all to be done by `deadline`
        (time.monotonic()): waiting for the bus, connecting and every answer count."""
        if self._lock.locked() and self._waiting >= self.settings.queue_size:
            raise BusBusyError(
                device, f"{self.label}: bus busy ({self._waiting} requests already waiting)"
            )
        if not self._lock.locked():
            await self._lock.acquire()  # free: taken at once, no timer needed
        else:
            self._waiting += 1
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    await self._lock.acquire()
            except TimeoutError:
                raise BusBusyError(
                    device, f"{self.label}: bus busy (no turn within the device's time-out)"
                ) from None
            finally:
                self._waiting -= 1
        try:
            await self._ensure_connected(device, deadline)
            assert self._client is not None
            yield Session(self, self._client, device, unit, deadline)
        finally:
            self._lock.release()

    async def _call(self, session: Session, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        device = session.device
        gap = self.settings.frame_gap
        if gap > 0:
            wait = self._last_frame + gap - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        limit = session.deadline - time.monotonic()
        if limit <= 0:
            raise DeviceTimeoutError(
                device, f"no time left for {what} within the device's time-out"
            )
        self.requests += 1
        try:
            # This device's own deadline, whichever device opened the link (see CLIENT_TIMEOUT).
            async with asyncio.timeout(limit):
                response = await call()
        except TimeoutError:
            self._timed_out()
            raise DeviceTimeoutError(device, f"no answer to {what} within {limit:.2g} s") from None
        except ConnectionException as exc:
            self.drop()
            raise DeviceUnavailableError(device, f"{self.label}: connection lost ({exc})") from None
        except ModbusIOException as exc:
            if self._client is not None and not self._client.connected:
                self.drop()
                raise DeviceUnavailableError(device, f"{self.label}: connection lost") from None
            # pymodbus (pinned to 3.16) says "No response received..." for its own time-out
            # (not expected: ours comes first); its other I/O errors (a mismatched unit or
            # transaction id) are protocol errors.
            if "No response" in str(exc):
                self._timed_out()
                raise DeviceTimeoutError(
                    device, f"no answer to {what} within {limit:.2g} s"
                ) from None
            raise DeviceProtocolError(device, f"{what}: {exc}") from None
        except ModbusException as exc:
            raise DeviceProtocolError(device, f"{what}: {exc}") from None
        finally:
            self._last_frame = time.monotonic()
        self._timeouts = 0
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            raise DeviceProtocolError(
                device, f"{what}: {exception_name(code)} (exception {code})", code=code
            )
        return response

    async def close(self) -> None:
        # Not under the lock: stopping must not wait for a queue of slow requests; one still
        # in flight ends with its own time-out.
        if self._client is not None:
            self._client.close()
            self._client = None


class Session:
    """Requests to one unit while its bus is held."""

    def __init__(
        self,
        bus: Bus,
        client: AsyncModbusTcpClient | AsyncModbusSerialClient,
        device: str,
        unit: int,
        deadline: float,
    ) -> None:
        self.bus = bus
        self.client = client
        self.device = device
        self.unit = unit
        self.deadline = deadline

    async def read(self, table: str, address: int, count: int) -> list[int] | list[bool]:
        c, u = self.client, self.unit
        what = f"read {table} {address}+{count} (unit {u})"
        fn = {
            "holding": c.read_holding_registers,
            "input": c.read_input_registers,
            "coil": c.read_coils,
            "discrete_input": c.read_discrete_inputs,
        }[table]
        response = await self.bus._call(self, what, lambda: fn(address, count=count, device_id=u))
        if table in ("coil", "discrete_input"):
            bits: list[bool] = list(response.bits[:count])
            if len(bits) < count:
                raise DeviceProtocolError(self.device, f"{what}: short answer ({len(bits)} bits)")
            return bits
        regs: list[int] = list(response.registers)
        if len(regs) != count:
            raise DeviceProtocolError(self.device, f"{what}: answer has {len(regs)} registers")
        return regs

    async def write_coil(self, address: int, value: bool) -> None:
        c, u = self.client, self.unit
        what = f"write coil {address} (unit {u})"
        await self.bus._call(self, what, lambda: c.write_coil(address, value, device_id=u))

    async def write_registers(self, address: int, values: list[int]) -> None:
        c, u = self.client, self.unit
        what = f"write holding {address}+{len(values)} (unit {u})"
        if len(values) == 1:
            call: Callable[[], Awaitable[Any]] = lambda: c.write_register(  # noqa: E731
                address, values[0], device_id=u
            )
        else:
            call = lambda: c.write_registers(address, values, device_id=u)  # noqa: E731
        await self.bus._call(self, what, call)
