"""A bucketed CPU-offload optimizer for single-process GPU training: fp32 master params and the
optimizer states in host memory, one fused host step per bucket, grads copied to the host while
backward runs. See :class:`CPUOffloadOptimizer` and [Note: offload rounds]."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.optim import Optimizer

from dldna_fused._distributed import dtensor_type
from dldna_fused.clip import get_total_norm
from dldna_fused.optim._fused import FusedOptimizer
from dldna_fused.optim._group_lists import SUPPORTED_DTYPES

_NAME = "CPUOffloadOptimizer"


class _Slot:
    """One device param and its host side: the fp32 master (a view of its bucket's flat buffer),
    the host grad buffer, and what this round copied."""

    __slots__ = ("device_param", "host", "host_grad", "staging", "pending", "bucket", "copied", "copied_version",
                 "synced")

    def __init__(self, device_param, host, host_grad, staging, bucket):
        self.device_param = device_param
        self.host = host
        self.host_grad = host_grad
        # bf16/fp16 params: a host buffer of their dtype that grads and params cross the bus in
        # ([Note: offload staging]); None for fp32 params.
        self.staging = staging
        self.pending = False  # a grad sits in staging, not yet converted into host_grad
        self.bucket = bucket
        self.copied = None  # the device grad copied this round (kept so its identity can be checked)
        self.copied_version = -1
        # (version, data_ptr) of the device param when it last equalled the master, so a change
        # made outside the optimizer (a model load_state_dict) is noticed before the next step.
        self.synced = (device_param._version, device_param.data_ptr())


class _Bucket:
    """Params of one group whose masters, grads and states step together in one inner optimizer."""

    def __init__(self, group_index: int, slots: list, inner: Optimizer, flat: torch.Tensor, flat_grad: torch.Tensor):
        self.group_index = group_index
        self.slots = slots
        self.inner = inner
        self.flat = flat
        self.flat_grad = flat_grad
        self.expected = sum(1 for s in slots if s.device_param.requires_grad)
        self.arrived: set = set()  # params whose grads this backward copied
        self.task = None  # the backward (autograd graph task) they came from
        self.event = None  # the CUDA event after this round's last grad copy of the bucket
        self.future: Future | None = None  # the worker's task for this round
        self.norm: torch.Tensor | None = None  # the 2-norm of this round's host grads, when clipping
        self.stepped = False  # stepped during backward this round (overlap_step)


class _StateView(MutableMapping):
    """``optimizer.state``: each device param's state, which lives (in host memory) in the inner
    optimizer of its bucket. Reads and writes go through to that state."""

    def __init__(self, owner: CPUOffloadOptimizer):
        self._owner = weakref.proxy(owner)  # no cycle: the optimizer goes as soon as it is dropped

    def _locate(self, p):
        slot = self._owner._slots.get(p)
        if slot is None:
            raise KeyError(p)
        return slot.bucket.inner.state, slot.host

    def __getitem__(self, p):
        state, host = self._locate(p)
        return state[host]

    def __setitem__(self, p, value):
        state, host = self._locate(p)
        state[host] = value

    def __delitem__(self, p):
        state, host = self._locate(p)
        del state[host]

    def __iter__(self):
        for p, slot in self._owner._slots.items():
            if slot.host in slot.bucket.inner.state:
                yield p

    def __len__(self):
        return sum(1 for _ in self)

    def __repr__(self):
        return f"{type(self).__name__}({len(self)} params with state)"


# [Note: offload rounds]
# A round is what happens to the grads between two steps (or a zero_grad). Each device param's
# post-accumulate-grad hook copies its grad into the host grad buffer of its bucket (on CUDA, on a
# side stream, ordered after backward's kernels); when every param of a bucket that takes a grad
# has arrived, the worker thread waits for the copies and, with max_grad_norm, takes the bucket's
# norm while backward goes on. step() then
#   1. checks every group's options, params and GradScaler's tensors before anything changes;
#   2. waits for the worker, and copies again any grad that changed after its hook (the identity
#      and _version of each copied grad are kept: an in-place clip, a grad set by hand, a second
#      backward that accumulated into it); scaler.unscale_ changes the grads without a version
#      bump, so after it every grad is copied again (max_grad_norm avoids that second copy);
#   3. takes the global norm from the buckets' norms, and steps each bucket's inner optimizer with
#      it (one fused host call per bucket), then copies its masters back to the device.
# With overlap_step=True the bucket's step itself runs on the worker during backward, which is
# only right when the grads are final when their hooks fire: no gradient accumulation outside
# no_step(), no GradScaler, no max_grad_norm (which needs every bucket), no change to the grads
# after backward. The first three are refused by name; the last is caught in step() (its update
# was already applied to the host masters, so the error says so).
class CPUOffloadOptimizer(Optimizer):
    r"""Runs ``optimizer_class`` on the CPU for params that live on a GPU: fp32 master params and
    the optimizer states stay in host memory (8-bit or 4-bit states with ``AdamW8bit``,
    ``Lion8bit``, ``AdamW4bit``), so the GPU holds only the params and grads.

    Each param group is cut into buckets of about ``bucket_bytes`` of fp32 masters, in reverse
    param order (the order backward produces grads). Every bucket is one flat host buffer (pinned
    on CUDA) with one instance of ``optimizer_class``, so a bucket's step is one fused call. Per
    step, for each param :math:`p` with device grad :math:`g`:

    .. math::
        \begin{aligned}
        \hat g &\leftarrow \mathrm{fp32}(g) \ \text{on the host, copied in backward's hook} \\
        c &= \min\!\bigl(1, \text{max\_grad\_norm} / (\lVert \hat g_{\text{all buckets}} \rVert_2 + 10^{-6})\bigr)
            \ \text{if max\_grad\_norm, else } 1 \\
        \theta_{\text{host}} &\leftarrow \text{optimizer\_class step}(\theta_{\text{host}}, c\,\hat g) \\
        p &\leftarrow \theta_{\text{host}} \ \text{(cast to } p\text{'s dtype)}
        \end{aligned}

    Args:
        params: params or param groups, on one device (a CUDA device; CPU params stand in for
            it in tests). bf16/fp16 params get fp32 masters.
        optimizer_class: the host optimizer: a ``dldna_fused.optim`` class other than Sophia (its
            Hessian estimate needs the graph on the device), or any ``torch.optim`` optimizer
            (without ``max_grad_norm``).
        bucket_bytes: fp32 master bytes per bucket (32 MiB by default). Smaller buckets start
            copying and stepping sooner during backward; each costs one host call.
        overlap_step: run each bucket's step on the worker thread as soon as its grads have
            arrived, during backward (see [Note: offload rounds] for when that is right). Off by
            default: the host step then runs in :meth:`step`, after the grads were copied
            during backward.
        **kwargs: the optimizer's arguments (``lr``, ``betas``, ``max_grad_norm``, ...).
            ``max_grad_norm`` clips the global norm of every group's grads that sets it, as
            ``torch.nn.utils.clip_grad_norm_`` on the device grads would (the norm is taken of
            the fp32 host copies, so it is exact also for bf16 grads); it is kept in
            :attr:`last_grad_norm`.

    For one process (under DDP the hooks would copy grads before their all-reduce lands: use
    FSDP2's CPUOffloadPolicy or DeepSpeed there). ``param_groups``, ``state`` (each device param's
    host state), ``state_dict`` (the layout of
    ``optimizer_class`` on the same params, so checkpoints move between this wrapper and the
    plain optimizer both ways), lr schedulers, GradScaler and ``zero_grad`` work as with the
    plain optimizer. Changing a device param outside the optimizer (``model.load_state_dict``)
    is noticed at the next step, which reloads that param's master from it.
    """

    # GradScaler hands over grad_scale/found_inf (as attributes): the host step unscales and skips.
    _step_supports_amp_scaling = True
    last_grad_norm: torch.Tensor | None = None

    def __init__(self, params, optimizer_class: type[Optimizer] | None = None, *, bucket_bytes: int = 32 << 20,
                 overlap_step: bool = False, **kwargs):
        if optimizer_class is None:
            from dldna_fused.optim import AdamW
            optimizer_class = AdamW
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(f"{_NAME}: optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        from dldna_fused.optim import Sophia
        if issubclass(optimizer_class, Sophia):
            raise TypeError(f"{_NAME}: Sophia cannot be offloaded by this wrapper: its Hessian estimate needs the "
                            "grads' graph on the device. Use FSDP2's CPUOffloadPolicy, or step Sophia on the device")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 4:
            raise ValueError(f"{_NAME}: bucket_bytes must be an int >= 4, got {bucket_bytes!r}")
        if kwargs.get("max_grad_norm") is not None and not issubclass(optimizer_class, FusedOptimizer):
            raise ValueError(f"{_NAME}: max_grad_norm needs a dldna_fused.optim class, not {optimizer_class.__name__}")
        for option in ("bf16_stochastic_round", "kahan_sum"):
            if kwargs.get(option):
                # They shape how bf16 params are written; the host masters are fp32 and copied back
                # to the device rounded to nearest, so they would silently do nothing.
                raise ValueError(f"{_NAME}: {option}=True does nothing here: the host masters are fp32, so the "
                                 "params keep their full precision on the host; leave it out")
        self.optimizer_class = optimizer_class
        self.bucket_bytes = bucket_bytes
        self.overlap_step = bool(overlap_step)
        self._kwargs = dict(kwargs)
        # The class's defaults, and its own errors for bad arguments, from a one-element probe.
        probe = optimizer_class([torch.zeros(1)], **kwargs)
        self._fused_inner = isinstance(probe, FusedOptimizer)
        self._slots: dict = {}
        self._hooks: list = []
        self._buckets: list[_Bucket] = []
        self._device: torch.device | None = None
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dldna_offload")
        self._suspended = False
        self._streams = None  # (grad copy stream, param copy stream) on CUDA
        super().__init__(params, dict(probe.defaults))
        self.state = _StateView(self)

    # --- construction ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim's, and all or nothing: the group's params get their host masters,
        buckets and hooks, or the group is not added."""
        count = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        added_slots: list = []
        added_buckets: list = []
        try:
            params = group["params"]
            seen: set = set()
            for i, p in enumerate(params):
                self._check_param(count, i, p)
                if id(p) in seen:
                    raise ValueError(f"{_NAME}: param group {count}, params[{i}] appears twice in the group")
                seen.add(id(p))
            self._check_options(count, group)
            self._build_buckets(count, group, added_buckets, added_slots)
        except BaseException:
            for slot in added_slots:
                self._slots.pop(slot.device_param, None)
            del self._buckets[len(self._buckets) - len(added_buckets):]
            del self.param_groups[count:]
            if not self._slots:
                self._device = None  # the first group failed: the next one may pick the device
            raise
        owner = weakref.ref(self)  # the hooks must not keep a discarded optimizer alive

        def hook(p):
            optimizer = owner()
            if optimizer is not None:
                optimizer._grad_hook(p)

        for slot in added_slots:
            if slot.device_param.requires_grad:
                self._hooks.append(slot.device_param.register_post_accumulate_grad_hook(hook))

    def _check_param(self, group_index: int, i: int, p: torch.Tensor) -> None:
        where = f"{_NAME}: param group {group_index}, params[{i}]"
        DTensor = dtensor_type()
        if DTensor is not None and isinstance(p, DTensor):
            raise TypeError(f"{where} is a DTensor: for FSDP2 use fully_shard(..., offload_policy=CPUOffloadPolicy()) "
                            "with the optimizer itself")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{where}: params must be float32, bfloat16 or float16, got {p.dtype}")
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError(f"{where}: params must be dense (got layout {p.layout})")
        if p.device.type == "meta":
            raise ValueError(f"{where} is on the meta device: materialize the model (to_empty) first")
        if self._device is None:
            self._device = p.device
        elif p.device != self._device:
            raise ValueError(f"{where} is on {p.device}, but the other params are on {self._device}: "
                             "one optimizer offloads params of one device")

    def _check_options(self, group_index: int, group: dict) -> None:
        if group.get("max_grad_norm") is not None:
            if not self._fused_inner:
                raise ValueError(f"{_NAME}: param group {group_index}: max_grad_norm needs a dldna_fused.optim class, "
                                 f"not {self.optimizer_class.__name__}")
            if self.overlap_step:
                raise ValueError(f"{_NAME}: param group {group_index}: max_grad_norm needs the norm of every "
                                 "bucket before any steps, so it cannot be used with overlap_step=True")

    def _build_buckets(self, group_index: int, group: dict, buckets: list, slots: list) -> None:
        params = group["params"]
        options = {k: v for k, v in group.items() if k != "params"}
        limit = max(1, self.bucket_bytes // 4)
        cut: list = []
        pending: list = []
        size = 0
        for p in reversed(params):  # backward's order
            if pending and size + p.numel() > limit:
                cut.append(pending)
                pending, size = [], 0
            pending.append(p)
            size += p.numel()
        if pending:
            cut.append(pending)
        pin = self._device.type == "cuda"
        for members in cut:
            total = sum(p.numel() for p in members)
            flat = torch.empty(total, dtype=torch.float32, pin_memory=pin)
            flat_grad = torch.zeros(total, dtype=torch.float32, pin_memory=pin)
            staging_flat = {dtype: torch.empty(sum(p.numel() for p in members if p.dtype == dtype), dtype=dtype,
                                               pin_memory=pin)
                            for dtype in {p.dtype for p in members} if dtype != torch.float32}
            staging_offset = dict.fromkeys(staging_flat, 0)
            hosts, grads, stagings, offset = [], [], [], 0
            for p in members:
                n = p.numel()
                host = flat[offset:offset + n].view(p.shape)
                host.copy_(p.detach())  # blocking: the masters must hold the values before any step
                hosts.append(host)
                grads.append(flat_grad[offset:offset + n].view(p.shape))
                offset += n
                staging = None
                if p.dtype in staging_flat:
                    start = staging_offset[p.dtype]
                    staging = staging_flat[p.dtype][start:start + n].view(p.shape)
                    staging_offset[p.dtype] = start + n
                stagings.append(staging)
            inner = self.optimizer_class([{**options, "params": hosts}], **self._kwargs)
            bucket = _Bucket(group_index, [], inner, flat, flat_grad)
            for p, host, grad, staging in zip(members, hosts, grads, stagings):
                slot = _Slot(p, host, grad, staging, bucket)
                bucket.slots.append(slot)
                self._slots[p] = slot
                slots.append(slot)
            bucket.expected = sum(1 for s in bucket.slots if s.device_param.requires_grad)
            self._buckets.append(bucket)
            buckets.append(bucket)

    # --- backward ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_step(self):
        """Backward passes inside copy nothing and step nothing: the micro-batches of gradient
        accumulation (with ``overlap_step=True``, the last backward before :meth:`step` runs
        outside). Like DDP's ``no_sync``."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    def _copy_streams(self):
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self._device), torch.cuda.Stream(self._device))
        return self._streams

    # [Note: offload staging]
    # A bf16/fp16 param's grad crosses the bus in its own dtype, into a pinned host buffer of that
    # dtype, and is widened to fp32 on the host (_land_grads); its updated master is narrowed on
    # the host into the same buffer and crosses back in the param's dtype. Half the bytes of an
    # fp32 crossing each way, and no conversion on the GPU: torch's copy_ between devices and
    # dtypes converts on the GPU into a temporary (device to host) or on the CPU into pageable
    # memory, which makes a "non-blocking" copy a blocking one (host to device).
    def _copy_grad(self, slot: _Slot) -> None:
        """Copies the device grad into its host buffer (staging for bf16/fp16): on CUDA on the side
        stream, after backward's kernels so far, with an event for the worker; elsewhere at once."""
        grad = slot.device_param.grad
        target = slot.host_grad if slot.staging is None else slot.staging
        if self._device.type == "cuda":  # GPU-only lines, tested by benchmarks/gpu_check.sh
            d2h, _ = self._copy_streams()
            d2h.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(d2h):
                target.copy_(grad, non_blocking=True)
                slot.bucket.event = d2h.record_event()
        else:
            target.copy_(grad)
        slot.pending = slot.staging is not None
        slot.copied = grad
        slot.copied_version = grad._version

    @staticmethod
    def _land_grads(slots) -> None:
        """Widens the staged grads that have landed into the fp32 host grads."""
        for slot in slots:
            if slot.pending:
                slot.host_grad.copy_(slot.staging)
                slot.pending = False

    @torch.no_grad()
    def _grad_hook(self, p: torch.Tensor) -> None:
        if self._suspended or p.grad is None:
            return
        slot = self._slots[p]
        bucket = slot.bucket
        with self._lock:
            if bucket.future is not None and not bucket.future.done():
                bucket.future.result()  # the worker still reads this bucket's buffers (accumulation)
            if bucket.stepped:
                raise RuntimeError(
                    f"{_NAME}(overlap_step=True): a second backward reached a bucket that already stepped in this "
                    "round. Its step used the grads of the first backward. For gradient accumulation, run the "
                    "micro-batches before the last one inside `with optimizer.no_step():`")
            self._copy_grad(slot)
            task = torch._C._current_graph_task_id()
            if bucket.task != task:  # a new backward (accumulation): the bucket fills again
                bucket.arrived.clear()
                bucket.task = task
            bucket.arrived.add(p)
            if len(bucket.arrived) < bucket.expected:
                return
            clip = bucket.inner.param_groups[0].get("max_grad_norm") is not None
            if self.overlap_step:
                self._sync_options(bucket)
                for s in bucket.slots:
                    s.host.grad = s.host_grad if s.copied is not None else None
                bucket.stepped = True
            bucket.future = self._worker.submit(self._finish_bucket, bucket, clip, self.overlap_step)

    def _finish_bucket(self, bucket: _Bucket, clip: bool, step: bool) -> None:
        """On the worker thread: waits for the bucket's copies, then takes its norm (clipping) or
        steps it (overlap_step)."""
        if bucket.event is not None:
            bucket.event.synchronize()
        self._land_grads(bucket.slots)
        if clip:
            bucket.norm = self._bucket_norm(bucket)
        if step:
            self._step_bucket(bucket)

    @staticmethod
    def _bucket_norm(bucket: _Bucket) -> torch.Tensor:
        grads = [s.host_grad for s in bucket.slots if s.copied is not None]
        return get_total_norm(grads) if grads else torch.zeros((), dtype=torch.float32)

    # --- step ----------------------------------------------------------------------------------

    def _sync_options(self, bucket: _Bucket) -> None:
        """The user's group options (what lr schedulers and users change) into the bucket's inner
        group; tensor options move to the host."""
        inner_group = bucket.inner.param_groups[0]
        for key, value in self.param_groups[bucket.group_index].items():
            if key == "params":
                continue
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                value = value.to("cpu")
            inner_group[key] = value

    def _check_all(self) -> None:
        """Every check of a step, before anything changes."""
        for index, group in enumerate(self.param_groups):
            self._check_options(index, group)
            # The host masters were built for these params: a param swapped into a group's list
            # has none, and would silently not be stepped.
            for i, p in enumerate(group["params"]):
                slot = self._slots.get(p)
                if slot is None or slot.bucket.group_index != index:
                    raise ValueError(f"{_NAME}: param group {index}, params[{i}] is not a param this optimizer "
                                     "built host masters for (was the group's list changed?); use add_param_group")
        for bucket in self._buckets:
            self._sync_options(bucket)
            inner = bucket.inner
            if isinstance(inner, FusedOptimizer):
                try:
                    inner._check_group(inner.param_groups[0])
                except (TypeError, ValueError) as error:
                    raise type(error)(f"{_NAME}: param group {bucket.group_index}: {error}") from None
        for p, slot in self._slots.items():
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{_NAME} does not support sparse gradients")
            if g.shape != p.shape or g.device != p.device:
                raise RuntimeError(f"{_NAME}: a grad of shape {tuple(g.shape)} on {g.device} does not match its "
                                   f"param of shape {tuple(p.shape)} on {p.device}")

    @staticmethod
    def _stale(slot: _Slot, unscaled: bool) -> bool:
        g = slot.device_param.grad
        if g is None:
            return slot.copied is not None
        return unscaled or slot.copied is not g or g._version != slot.copied_version

    def _wait_worker(self) -> None:
        error = None
        for bucket in self._buckets:
            if bucket.future is not None:
                try:
                    bucket.future.result()
                except BaseException as e:  # re-raised after every task finished
                    error = error or e
        if error is not None:
            self._end_round()
            raise error

    @torch.no_grad()
    def step(self, closure=None):
        """Steps every bucket on the host and copies the new params to the device (see
        [Note: offload rounds]). ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._wait_worker()  # before the checks: an overlap_step bucket may still be stepping
        self._check_all()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self.overlap_step and (grad_scale is not None or found_inf is not None):
            self._end_round()
            for name in ("grad_scale", "found_inf"):  # GradScaler deletes them only after a step returns
                self.__dict__.pop(name, None)
            raise RuntimeError(f"{_NAME}(overlap_step=True) cannot be used with GradScaler: the buckets stepped "
                               "during backward, before the scaler's inf check. Use overlap_step=False")
        # scaler.unscale_ (found_inf set, grad_scale None) divides the device grads in place without
        # bumping their version: every grad is copied again.
        unscaled = found_inf is not None and grad_scale is None
        for bucket in self._buckets:
            stale = [s for s in bucket.slots if self._stale(s, unscaled)]
            if bucket.stepped and stale:
                names = ", ".join(str(tuple(s.device_param.shape)) for s in stale[:3])
                self._end_round()
                raise RuntimeError(
                    f"{_NAME}(overlap_step=True): the grads of params of shapes {names} changed after their bucket "
                    "stepped during backward (an in-place change, a grad set by hand or a second backward); that "
                    "step used the grads as backward left them. Use overlap_step=False to change grads after "
                    "backward")
            for slot in stale:
                if slot.device_param.grad is None:
                    slot.copied = None
                else:
                    self._copy_grad(slot)
            if stale and bucket.inner.param_groups[0].get("max_grad_norm") is not None:
                bucket.norm = None  # recomputed below from the new copies
        if self._device is not None and self._device.type == "cuda":  # GPU-only: land the copies above
            self._copy_streams()[0].synchronize()
        self._land_grads(self._slots.values())
        self._reload_changed_params()
        amp = self._host_amp(grad_scale, found_inf)
        norm = self._global_norm(amp[0])
        try:
            for bucket in self._buckets:
                if not bucket.stepped:
                    for slot in bucket.slots:
                        slot.host.grad = slot.host_grad if slot.copied is not None else None
                    self._step_bucket(bucket, amp, norm)
            self._copy_back(skip=amp[1] is not None and bool(amp[1].item()))
        finally:
            self._end_round()
        return loss

    def _reload_changed_params(self) -> None:
        """Masters of device params changed outside the optimizer are loaded from them again."""
        for p, slot in self._slots.items():
            if (p._version, p.data_ptr()) != slot.synced:
                slot.host.copy_(p.detach())
                slot.synced = (p._version, p.data_ptr())

    @staticmethod
    def _host_amp(grad_scale, found_inf):
        """GradScaler's (grad_scale, found_inf) on the host, read once for every bucket."""
        return tuple(None if t is None else t.to("cpu", torch.float32) for t in (grad_scale, found_inf))

    def _global_norm(self, grad_scale):
        """The 2-norm of every clipped group's host grads, from the buckets' norms; None if no
        group clips."""
        clipping = [b for b in self._buckets if b.inner.param_groups[0].get("max_grad_norm") is not None]
        if not clipping:
            return None
        norms = []
        for bucket in clipping:
            if bucket.norm is None:
                bucket.norm = self._bucket_norm(bucket)
            norms.append(bucket.norm.float())
        norm = torch.linalg.vector_norm(torch.stack(norms))
        if grad_scale is not None:
            norm = norm / grad_scale.reshape(())
        self.last_grad_norm = norm
        return norm

    def _step_bucket(self, bucket: _Bucket, amp=(None, None), norm=None) -> None:
        """One host step of the bucket's inner optimizer, with GradScaler's tensors and the global
        norm handed over."""
        inner = bucket.inner
        grad_scale, found_inf = amp
        if grad_scale is not None or found_inf is not None:
            if getattr(inner, "_step_supports_amp_scaling", False):
                inner.grad_scale, inner.found_inf = grad_scale, found_inf
            else:  # a torch.optim class without it: unscale here and skip on inf, as GradScaler would
                if found_inf is not None and found_inf.item():
                    return
                if grad_scale is not None:
                    grads = [s.host.grad for s in bucket.slots if s.host.grad is not None]
                    if grads:
                        torch._foreach_div_(grads, grad_scale)
        if norm is not None:
            inner.__dict__["_given_grad_norm"] = norm
        try:
            inner.step()
        finally:
            inner.__dict__.pop("_given_grad_norm", None)
            for name in ("grad_scale", "found_inf"):
                inner.__dict__.pop(name, None)

    def _copy_back(self, skip: bool) -> None:
        """The updated masters to the device params (cast to their dtype); on CUDA on a side
        stream that the current stream then waits for."""
        if not skip:
            if self._device.type == "cuda":  # GPU-only lines, tested by benchmarks/gpu_check.sh
                _, h2d = self._copy_streams()
                current = torch.cuda.current_stream(self._device)
                h2d.wait_stream(current)
                with torch.cuda.stream(h2d):
                    for p, slot in self._slots.items():
                        if slot.copied is not None:
                            p.copy_(self._narrowed(slot), non_blocking=True)
                current.wait_stream(h2d)
            else:
                for p, slot in self._slots.items():
                    if slot.copied is not None:
                        p.copy_(self._narrowed(slot))
        for p, slot in self._slots.items():
            slot.synced = (p._version, p.data_ptr())

    @staticmethod
    def _narrowed(slot: _Slot) -> torch.Tensor:
        """The master in the param's dtype, in host memory (see [Note: offload staging])."""
        if slot.staging is None:
            return slot.host
        slot.staging.copy_(slot.host)
        return slot.staging

    def _end_round(self) -> None:
        for bucket in self._buckets:
            bucket.arrived.clear()
            bucket.task = None
            bucket.event = None
            bucket.future = None
            bucket.norm = None
            bucket.stepped = False
        for slot in self._slots.values():
            slot.copied = None
            slot.pending = False
            slot.host.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, on the device grads; also ends the round (grads copied since the
        last step are forgotten)."""
        self._wait_worker()
        super().zero_grad(set_to_none)
        self._end_round()

    # --- state_dict ----------------------------------------------------------------------------

    def _global_indices(self) -> list[list[int]]:
        """Per bucket, the index of each of its params in the state_dict's numbering (params in
        group order, as torch.optim numbers them)."""
        index = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(p, len(index))
        return [[index[s.device_param] for s in b.slots] for b in self._buckets]

    def state_dict(self) -> dict:
        """``optimizer_class``'s state_dict of the same params: states numbered as torch.optim
        numbers the device params, tensors in host memory."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._wait_worker()
        state: dict = {}
        for bucket, indices in zip(self._buckets, self._global_indices()):
            inner_sd = bucket.inner.state_dict()
            for local, saved in inner_sd["state"].items():
                state[indices[local]] = saved
        index = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                ids.append(index.setdefault(p, len(index)))
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state_dict = {"state": dict(sorted(state.items())), "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of this wrapper or of ``optimizer_class`` over the same params (on
        any device); all or nothing."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
        self._wait_worker()
        ids = {}
        for group, saved in zip(self.param_groups, saved_groups):
            for p, i in zip(group["params"], saved["params"]):
                ids[p] = i
        before = [bucket.inner.state_dict() for bucket in self._buckets]
        loaded = 0
        try:
            for bucket in self._buckets:
                saved_group = {k: v for k, v in saved_groups[bucket.group_index].items() if k != "params"}
                inner_state = {}
                for local, slot in enumerate(bucket.slots):
                    entry = state_dict["state"].get(ids[slot.device_param])
                    if entry is not None:
                        inner_state[local] = entry
                bucket.inner.load_state_dict({"state": inner_state,
                                              "param_groups": [{**saved_group, "params": list(range(len(bucket.slots)))}]})
                loaded += 1
        except BaseException:
            for bucket, old in zip(self._buckets[:loaded], before):
                bucket.inner.load_state_dict(old)
            raise
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self._end_round()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError(f"{_NAME} cannot be pickled (it holds a worker thread and hooks); save its state_dict()")

    def __del__(self):
        for handle in self.__dict__.get("_hooks", ()):
            handle.remove()
        worker = self.__dict__.get("_worker")
        if worker is not None:
            worker.shutdown(wait=False)
