"""Training in a child process, so a running fine-tune never holds the viewer's GIL.

Kept free of napari and Qt imports: the child (multiprocessing "spawn") imports only this
module and the engine.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def compiler_stack_unsafe_here() -> bool:
    """True when training in this process would import triton for the first time.

    torch's optimizers import torch._dynamo, which imports triton where it is installed (CUDA
    builds of torch). Loaded after Mesa's OpenGL driver (napari under Xvfb, VMs, remote
    desktops), triton's bundled LLVM crashes the process (seen with torch 2.14 + triton 3.8),
    which would take the viewer and unsaved annotations with it. A spawned process is clean.
    """
    import importlib.util

    if "torch._dynamo" in sys.modules or "triton" in sys.modules:
        return False  # already loaded: nothing new is imported
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


class _ForwardRecords(logging.Handler):
    """Passes the engine's log warnings issued in one thread to a sink."""

    def __init__(self, thread: int, send: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.thread, self.send = thread, send

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.send(record.getMessage())
        # Logging prints a warning to stderr only when no handler is set up anywhere;
        # this one would count as set up, so the terminal copy is kept here.
        if logging.lastResort is not None and self._only_handler(record.name):
            logging.lastResort.handle(record)

    def _only_handler(self, name: str) -> bool:
        logger: logging.Logger | None = logging.getLogger(name)
        forwarders = []
        while logger is not None:
            for handler in logger.handlers:
                if not isinstance(handler, _ForwardRecords):
                    return False
                forwarders.append(handler)
            logger = logger.parent if logger.propagate else None
        return forwarders[:1] == [self]  # one terminal copy when two runs forward


@contextlib.contextmanager
def forward_warnings(sink: Callable[[str], Any]) -> Iterator[None]:
    """Within the block, pass the engine's warnings issued in this thread (its log warnings
    and Python warnings raised in its files) to `sink` as text, each distinct text once;
    they still reach the terminal as before.

    Training warns about images left out (no boxes, unreadable) while it loads and trains;
    a viewer shows these to its user only when told. Other threads' warnings are left alone.
    """
    import boxlevelset

    thread = threading.get_ident()
    engine_dir = os.path.dirname(os.path.abspath(boxlevelset.__file__))
    seen: set[str] = set()
    active = True

    def send(text: str) -> None:
        if active and text not in seen:  # a warning repeated every iteration: shown once
            seen.add(text)
            sink(text)

    previous = warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:
        if threading.get_ident() == thread and \
                os.path.abspath(filename).startswith(engine_dir + os.sep):
            send(str(message))
        previous(message, category, filename, lineno, file, line)

    handler = _ForwardRecords(thread, send)
    engine_logger = logging.getLogger("boxlevelset")
    engine_logger.addHandler(handler)
    warnings.showwarning = showwarning
    try:
        yield
    finally:
        active = False
        engine_logger.removeHandler(handler)
        # Another thread may have replaced showwarning meanwhile (catch_warnings): then
        # this one stays in its chain, passing everything on.
        if warnings.showwarning is showwarning:
            warnings.showwarning = previous


def _child(values: dict[str, Any], events: Any, stop: Any) -> None:
    import torch

    from boxlevelset.train import TrainConfig, train

    # Leave one core to the viewer: its event loop must keep running while training does.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))

    stop_event = threading.Event()

    def forward_stop() -> None:
        stop.wait()
        stop_event.set()

    threading.Thread(target=forward_stop, daemon=True).start()
    try:
        with forward_warnings(lambda text: events.put(("warning", text))):
            path = train(TrainConfig(**values, stop_event=stop_event), callbacks=[events.put])
        events.put(("done", str(path)))
    except BaseException as err:  # reported to the parent, which raises it in its worker
        events.put(("error", f"{type(err).__name__}: {err}"))


def _main_is_unguarded_script() -> bool:
    """True when __main__ is a script file (not napari's own entry point or an interpreter),
    the case in which a spawned child re-runs it."""
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return bool(path) and getattr(main, "__spec__", None) is None \
        and not str(path).endswith(("napari", "napari.exe", "pytest"))


def train_in_subprocess(values: dict[str, Any], on_event: Callable[[Any], Any],
                        stop_requested: threading.Event, poll_s: float = 0.1,
                        on_warning: Callable[[str], Any] | None = None) -> Path:
    """Run `boxlevelset.train(TrainConfig(**values))` in a spawned process.

    Every TrainEvent is passed to `on_event` and the engine's warnings (text, each once)
    to `on_warning` (both in the calling thread); setting
    `stop_requested` stops training cleanly (the child saves its checkpoint). Returns the
    checkpoint path; raises RuntimeError with the child's error message on failure.
    """
    ctx = mp.get_context("spawn")  # fork after Qt/torch threads exist is unsafe
    events, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_child, args=(values, events, stop), daemon=True,
                       name="boxlevelset-finetune")
    proc.start()
    try:
        while True:
            if stop_requested.is_set() and not stop.is_set():
                stop.set()
            try:
                item = events.get(timeout=poll_s)
            except queue.Empty:
                if not proc.is_alive():
                    # A spawned child imports the launching script as __main__; a script
                    # without a main guard runs again there and fails in bootstrapping.
                    # Unticking 'Separate process' helps only where training may run in
                    # napari's process (not where triton would be loaded into it).
                    untick = ("" if compiler_stack_unsafe_here()
                              else ", or untick 'Separate process'")
                    hint = ("; when napari is started from a script, put the script's code "
                            "under `if __name__ == '__main__':` (the training process imports "
                            f"it){untick}" if _main_is_unguarded_script() else "")
                    raise RuntimeError(
                        f"training process ended unexpectedly (exit code {proc.exitcode})"
                        f"{hint}") from None
                continue
            if isinstance(item, tuple):
                kind, payload = item
                if kind == "done":
                    return Path(payload)
                if kind == "warning":
                    if on_warning is not None:
                        on_warning(payload)
                    continue
                raise RuntimeError(payload)
            on_event(item)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
