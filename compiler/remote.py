"""Measuring on another machine through TVM's RPC tracker: ``--rpc TRACKER_HOST:PORT:KEY``.

A TVM RPC tracker (``python -m tvm.exec.rpc_tracker``) hands out the devices registered with it
under a key (``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`` on each device).
`Remote` asks the tracker for one, uploads a compiled kernel library and times it there with
TVM's time evaluator: `fxopt tune --rpc` measures every tuning candidate and fxopt's own
schedules that way, so the records describe the remote device (build for its target), and
`fxopt bench --rpc` times a whole model's TVM build there (`time_model`). The tracker needs the
tornado package, and TVM's server psutil and cloudpickle (``pip install 'fxopt[rpc]'``); the
device needs the TVM runtime, not fxopt.
"""

from __future__ import annotations

import json
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .codegen import tvm_api as tv
from .codegen.runtime import METADATA_FUNCTION, CallSpec
from .ir.errors import InputError, UnsupportedError, first_line


@dataclass(frozen=True)
class Remote:
    """A device reached through an RPC tracker."""

    host: str
    port: int
    key: str
    timeout_s: int = 60  # per session the tracker grants

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.key}"

    def connect(self):
        """An RPC session on a device registered under `key` (UnsupportedError naming the
        tracker when it cannot be reached or has no such device)."""
        try:
            socket.create_connection((self.host, self.port), timeout=10).close()  # fail fast
            tracker = tv.tvm.rpc.connect_tracker(self.host, self.port)
            return tracker.request(self.key, priority=1, session_timeout=self.timeout_s)
        except Exception as error:  # noqa: BLE001 - socket errors, timeouts, tracker refusals
            raise UnsupportedError(
                f"no device under key {self.key!r} from the RPC tracker at "
                f"{self.host}:{self.port} ({first_line(error)}); start one with python -m "
                f"tvm.exec.rpc_server --tracker {self.host}:{self.port} --key {self.key}"
            ) from None

    @contextmanager
    def uploaded(self, library: Path, kind: str):
        """A session with `library` uploaded: (session, its loaded module, the device for a
        target of `kind`); the upload is removed afterwards."""
        session = self.connect()
        session.upload(str(library), library.name)
        try:
            device = session.device("cpu" if kind in ("llvm", "c") else kind, 0)
            yield session, session.load_module(library.name), device
        finally:
            session.remove(library.name)

    def time(self, module, device_type: str, args_info, config) -> list[float]:
        """Seconds per run of `module`'s entry function on the remote device, on random
        arguments described by `args_info` (MetaSchedule's ArgInfo JSON), timed as `config`
        (a MetaSchedule EvaluatorConfig) says."""
        from tvm.s_tir.meta_schedule.runner.rpc_runner import default_alloc_argument
        from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "fxopt_kernel.so"
            module.export_library(str(path))
            with self.uploaded(path, device_type) as (session, remote, device):
                args = default_alloc_argument(session, device, args_info, 1)
                return [float(c) for c in run_evaluator_common(remote, device, config, args)]

    def time_model(
        self, library: Path, kind: str, inputs: tuple, repeats: int, warmup: int
    ) -> list[float]:
        """Seconds per call of the exported model `library` (`Artifact.export`, built for a
        target of `kind`) on the remote device, `warmup` calls first, then `repeats` timed
        ones, on copies of `inputs`."""
        with self.uploaded(library, kind) as (_, executable, device):
            vm = tv.virtual_machine(executable, device)
            call = CallSpec.from_metadata(json.loads(str(vm[METADATA_FUNCTION]())))
            arrays = [
                tv.tvm.runtime.tensor(t.detach().contiguous().numpy(), device)
                for t in call.tensors(inputs, {})
            ]
            if warmup:
                vm.time_evaluator("main", device, number=1, repeat=warmup)(*arrays)
            timer = vm.time_evaluator("main", device, number=1, repeat=repeats)
            return [float(s) for s in timer(*arrays).results]


def parse(text: str | None) -> Remote | None:
    """``"HOST:PORT:KEY"`` as a `Remote`; None for None."""
    if text is None:
        return None
    host, _, rest = str(text).partition(":")
    port, _, key = rest.partition(":")
    if not (host and port.isdigit() and key):
        raise InputError(
            f"--rpc takes TRACKER_HOST:PORT:KEY, e.g. 127.0.0.1:9190:rasp4, not {text!r}"
        )
    return Remote(host, int(port), key)
