"""Sentinel's probe inside vLLM: a `vllm.general_plugins` entry point.

vLLM loads every `vllm.general_plugins` entry point in each of its processes (API
server, engine core, workers) before it builds a model; `VLLM_PLUGINS=sentinel_probe`
(a comma-separated list) restricts which load. `register()` does nothing unless
`SENTINEL_PROBE_URL` is set; then it arranges for the model runners' `load_model` to be
wrapped, so that in the process that holds the model (the worker) the probe attaches
to it once the weights are loaded:

    SENTINEL_PROBE_URL=unix:/run/sentinel/probe.sock   # where Sentinel listens
    SENTINEL_WORKER=qwen3                              # the worker's name in sentinel.yaml
    SENTINEL_PROBE_TOKEN_FILE=$CREDENTIALS_DIRECTORY/probe-qwen3   # its token, if it has one
    SENTINEL_PROBE_INTERVAL=1                          # seconds between reports

`make vllm-env` installs the package into vLLM's venv (`pip install --no-deps -e .`,
which adds the entry point and nothing else). The wrapping is lazy: the runner modules
(`vllm.v1.worker.cpu_model_runner`, `gpu_model_runner`, and the V2 runners under
`vllm.v1.worker.gpu`/`cpu`) are patched when vLLM imports them, through an import hook,
so the API server and engine core processes, which never import them, do not pay the
seconds their import costs. A model is attached at most once (a subclass's `load_model`
calling its parent's would otherwise attach twice).

vLLM's router is not a module whose forward a hook can watch: a fused-MoE layer (the
`experts` of `Qwen3MoeSparseMoeBlock`, vLLM's `MoERunner`) holds a `FusedMoERouter`
(`BaseRouter`; `CPURouter` on the CPU build) that computes the top-k inside the
layer's forward and offers a capture callback on the *logical* expert ids it selected,
before EPLB maps them to physical replicas (`set_capture_fn`, vLLM 0.32; vLLM's own
routed-experts capture uses it too). `vllm_router_finder` hooks that callback (chaining
any callback already set), so the probe counts exactly the experts vLLM selected, on
the device, with one `index_add_` per layer per forward pass.

What the probe reports from vLLM: tokens per expert and layer, balancedness per GPU,
allocator counters and OOMs. What it cannot do there: take a batch limit live (vLLM's
scheduler runs in the engine core process, not in the worker), so the probe says
`live_batch_limit: false` and Sentinel's `reduce_batch` restarts on a profile; nor
apply placements (vLLM rebalances itself with `--enable-eplb`: the `eplb` profile).
Under expert parallelism each worker reports the logical ids its rank routed, and its
experts' device is the rank's own GPU, so per-GPU balancedness across ranks is not
computed (yet): see docs/expert-balancing.md.

Logs: the plugin's and the probe's messages go to vLLM's own log handler (the `vllm`
logger's), so "Sentinel probe attached ..." appears in the worker's log.

The daemon never imports this module (it imports torch); only vLLM loads it.

CUDA graphs: vLLM captures decode steps into CUDA graphs unless `--enforce-eager`. The
capture callback runs while a graph is captured, so its `index_add_` is recorded into
the graph and replays every step, on the same count tensor: counts keep flowing.
Two things change: (1) a graph runs the padded batch size, so padded slots' routing is
counted too (vLLM's own EPLB masks them with `num_unpadded_tokens`; the probe does
not), which inflates the counts of whatever experts padding routes to; (2) the cache of
ones tensors must never be cleared while graphs reference them (`counters.py` bounds it
at 256 sizes, more than vLLM's default capture sizes). How to check on a GPU: serve the
tiny Qwen3-MoE once with `--enforce-eager` and once without, send the same requests,
and compare each layer's routed count with `top_k x (prompt + generated - 1)` tokens
per request: equal under eager (tests/test_vllm_engine.py asserts this on the CPU
engine), larger by the padding under graphs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from torch import nn

from sentinel.probe.routers import RouterSpec

__all__ = [
    "ENV_INTERVAL",
    "ENV_URL",
    "ENV_WORKER",
    "RUNNER_CLASSES",
    "attach_to_vllm_model",
    "register",
    "vllm_router_finder",
]

# A child of vLLM's logger: its handler and format, in the worker's log.
log = logging.getLogger("vllm.sentinel_probe")

ENV_URL = "SENTINEL_PROBE_URL"
ENV_WORKER = "SENTINEL_WORKER"
ENV_INTERVAL = "SENTINEL_PROBE_INTERVAL"
# module -> the model-runner classes in it whose `load_model` is wrapped (vLLM 0.32).
RUNNER_CLASSES: dict[str, tuple[str, ...]] = {
    "vllm.v1.worker.gpu_model_runner": ("GPUModelRunner",),
    "vllm.v1.worker.cpu_model_runner": ("CPUModelRunner",),
    "vllm.v1.worker.gpu.model_runner": ("GPUModelRunner",),
    "vllm.v1.worker.cpu.model_runner": ("CPUModelRunner",),
}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PATCHED = "_sentinel_probe_patched"
_ATTACHED = "_sentinel_probe"
_probes: list[Any] = []  # the probes attached in this process (kept alive for its lifetime)


def vllm_router_finder(model: nn.Module) -> list[RouterSpec]:
    """The fused-MoE layers of a vLLM model, counted through their router's capture callback."""
    found: list[RouterSpec] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if router is None or id(router) in seen or not callable(getattr(router, "set_capture_fn", None)):
            continue
        num_experts = getattr(router, "global_num_experts", None)
        top_k = getattr(router, "top_k", None)
        if not isinstance(num_experts, int) or not isinstance(top_k, int):
            continue
        seen.add(id(router))
        match = _LAYER.search(name + ".")
        layer = int(match.group(1)) if match else len(found)
        found.append(
            RouterSpec(
                layer=layer,
                module=module,
                num_experts=num_experts,
                top_k=top_k,
                extract_indices=lambda ids: ids,
                name=f"{name}.router",
                experts=module,
                experts_name=name,
                install=_capture_installer(router),
            )
        )
    return found


def _capture_installer(router: Any) -> Callable[[Callable[[Any], None]], Callable[[], None]]:
    def install(count: Callable[[Any], None]) -> Callable[[], None]:
        previous = getattr(router, "capture_fn", None)

        def capture(topk_ids: Any) -> None:
            if previous is not None:
                previous(topk_ids)
            count(topk_ids)

        router.set_capture_fn(capture)

        def uninstall() -> None:
            router.set_capture_fn(previous)

        return uninstall

    return install


def attach_to_vllm_model(model: nn.Module) -> Any | None:
    """Attach the probe to a loaded vLLM model, once (None when the environment does not ask for it)."""
    url = os.environ.get(ENV_URL, "").strip()
    if not url:
        return None
    attached = getattr(model, _ATTACHED, None)
    if attached is not None:
        return attached
    import sentinel.probe

    raw_interval = os.environ.get(ENV_INTERVAL, "").strip()
    try:
        interval = float(raw_interval) if raw_interval else 1.0
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL}={raw_interval!r} is not a number of seconds") from None
    worker = os.environ.get(ENV_WORKER, "").strip() or "vllm"
    probe = sentinel.probe.attach(
        model, worker, url, interval_s=interval, router_finder=vllm_router_finder, live_batch_limit=False
    )
    _probes.append(probe)
    # nn.Module.__setattr__ accepts a plain attribute; it marks the model as attached.
    object.__setattr__(model, _ATTACHED, probe)
    log.info(
        "Sentinel probe attached to %s (%d MoE layers) for worker %s, reporting to %s every %gs",
        type(model).__name__,
        len(probe.routers),
        worker,
        probe.target.describe(),
        interval,
    )
    return probe


def _wrap_load_model(cls: type) -> bool:
    """Wrap `cls.load_model` (defined on `cls` itself) to attach the probe; False when there is none."""
    original = cls.__dict__.get("load_model")
    if original is None:
        return False
    if getattr(original, _PATCHED, False):
        return True

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            get_model = getattr(self, "get_model", None)
            model = get_model() if callable(get_model) else getattr(self, "model", None)
            if isinstance(model, nn.Module):
                attach_to_vllm_model(model)
            else:
                log.warning("Sentinel probe: %s.load_model left no model to attach to", type(self).__name__)
        except Exception:  # the probe must never stop vLLM from serving
            log.exception("Sentinel probe: attaching to the vLLM model failed; serving without it")
        return result

    setattr(load_model, _PATCHED, True)
    load_model.__wrapped__ = original  # type: ignore[attr-defined]
    load_model.__doc__ = getattr(original, "__doc__", None)
    cls.load_model = load_model  # type: ignore[attr-defined]
    return True


def _patch_module(module: ModuleType) -> None:
    for name in RUNNER_CLASSES.get(module.__name__, ()):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and _wrap_load_model(cls):
            log.debug("Sentinel probe: wrapped %s.%s.load_model", module.__name__, name)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then wraps the runner classes the module defines."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        try:
            _patch_module(module)
        except Exception:  # never break vLLM's import
            log.exception("Sentinel probe: cannot wrap the model runners of %s", module.__name__)


class _RunnerImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; hands the runner modules' specs back with a patching loader."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._names:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _RunnerImportHook):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if isinstance(spec, importlib.machinery.ModuleSpec):
                if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def _route_probe_logs_to_vllm() -> None:
    """Send `sentinel.*` records to vLLM's handlers (else warnings only reach Python's last resort)."""
    ours, theirs = logging.getLogger("sentinel"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def register() -> None:
    """vLLM's plugin hook (see the module doc); a no-op without `SENTINEL_PROBE_URL`."""
    if not os.environ.get(ENV_URL, "").strip():
        return
    _route_probe_logs_to_vllm()
    waiting = [name for name in RUNNER_CLASSES if name not in sys.modules]
    for name in RUNNER_CLASSES:
        module = sys.modules.get(name)
        if module is not None:
            _patch_module(module)
    if waiting and not any(isinstance(f, _RunnerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RunnerImportHook(waiting))
