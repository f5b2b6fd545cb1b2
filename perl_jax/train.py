"""The training loop every stage shares; stages differ only in their loss and batches.

A stage hands `fit` a pure `loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`, the frozen
leaves (the backbone, unless fully fine-tuning), the initial trainable leaves, and `batch_at(step)`.
`fit` jits one optimizer step with explicit shardings and donated state, accumulates gradients over
micro-batches, logs progress, checkpoints, resumes from the latest checkpoint in the workdir, and
stops on a non-finite loss or gradient with the last good checkpoint kept.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import errors
from perl_jax import identity as identity_lib
from perl_jax import sharding as sharding_lib

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]
# (trainable, frozen, batch, rng) -> ((loss, metrics), grads): a step that accumulates its
# gradients its own way (perl_jax.reward.packed_reward_grads_fn) in place of a LossFn.
GradsFn = Callable[[Any, Any, dict, jax.Array], tuple[tuple[jax.Array, dict], Any]]


def make_optimizer(cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up, then cosine decay (or constant), and global-norm clipping."""
  if cfg.schedule == "cosine" and cfg.warmup_steps == 0:  # optax's warm-up needs >= 1 step
    lr = optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1), alpha=cfg.final_lr_fraction)
  elif cfg.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                            max(total_steps, cfg.warmup_steps + 1),
                                            end_value=cfg.lr * cfg.final_lr_fraction)
  elif cfg.schedule == "constant":
    lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)),
                               optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
  else:
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     in_float32(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2,
                                            weight_decay=cfg.weight_decay)))


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` with f32 state and arithmetic whatever the leaves' dtype: bf16 weights get f32 Adam
  moments (optax keeps them in the weights' dtype). No f32 master copy of the weights is kept:
  the f32 update is added to the bf16 weights by optax.apply_updates. A no-op for f32 leaves."""
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def update(updates, state, params=None):
    return inner.update(f32(updates), state, None if params is None else f32(params))

  return optax.GradientTransformation(lambda params: inner.init(f32(params)), update)


def make_train_step(loss_fn: LossFn | None, optimizer: optax.GradientTransformation,
                    accum_steps: int, updates_per_batch: int = 1,
                    grads_fn: GradsFn | None = None):
  """`updates_per_batch` optimizer updates (e.g. PPO epochs) on one batch, each over the batch
  split into `accum_steps` micro-batches (pure); with `grads_fn`, it gives each update's loss,
  metrics and gradients instead (loss_fn and accum_steps unused)."""

  def grads_of(trainable, frozen, batch, rng):
    if grads_fn is not None:
      return grads_fn(trainable, frozen, batch, rng)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
      return grad_fn(trainable, frozen, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, -1) + x.shape[1:]), batch)

    def body(carry, xs):
      micro_batch, i = xs
      out = grad_fn(trainable, frozen, micro_batch, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, out), None

    shapes = jax.eval_shape(grad_fn, trainable, frozen, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    return jax.tree.map(lambda x: x / accum_steps, total)

  def update(state, frozen, batch, rng):
    (loss, metrics), grads = grads_of(state["trainable"], frozen, batch, rng)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   update_norm=optax.tree.norm(updates))
    return {"step": state["step"], "trainable": trainable, "opt_state": opt_state}, metrics

  def train_step(state, frozen, batch, rng):
    if updates_per_batch == 1:
      state, metrics = update(state, frozen, batch, rng)
    else:
      def body(state, i):
        return update(state, frozen, batch, jax.random.fold_in(rng, i))
      state, metrics = jax.lax.scan(body, state, jnp.arange(updates_per_batch))
      metrics = jax.tree.map(lambda m: m[-1], metrics)  # report the last update's metrics
    return dict(state, step=state["step"] + 1), metrics

  return train_step


def step_key(base_rng, step: int, mesh):
  """The step's random key, fold_in(base_rng, step), replicated over `mesh`; the step and the
  key move explicitly (the train loop runs under jax.transfer_guard("disallow"))."""
  key = jax.random.fold_in(base_rng, jax.device_put(np.uint32(step)))
  return sharding_lib.put(key, sharding_lib.replicated(mesh))


def sharded_train_step(train_step, mesh, state, frozen):
  """jit of a train step with explicit shardings: state and frozen leaves by the parameter
  rules of perl_jax.sharding, batches over data x fsdp; the state is donated."""
  state_shardings = sharding_lib.tree_shardings(state, mesh)
  frozen_shardings = sharding_lib.tree_shardings(frozen, mesh)
  replicated = sharding_lib.replicated(mesh)
  step_fn = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings,
                                              sharding_lib.batch_sharding(mesh), replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  return step_fn, state_shardings, frozen_shardings


def compiled_memory(compiled) -> dict:
  """Bytes per device of a compiled step, from XLA's memory analysis (no run needed)."""
  stats = compiled.memory_analysis()
  out = {"argument_bytes": stats.argument_size_in_bytes,
         "output_bytes": stats.output_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes,
         "alias_bytes": stats.alias_size_in_bytes}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out


class Writer:
  """TensorBoard scalars (tensorboardX: no TensorFlow needed) plus a JSON-lines log.

  metrics.jsonl is the record: it is flushed at every write, and on resume the lines a killed run
  wrote after its last checkpoint are dropped and TensorBoard is rebuilt from it (`resume`), so
  both curves equal an uninterrupted run's. TensorBoard is flushed at every checkpoint. Only
  process 0 of a multi-process run writes; the others' writers do nothing.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self.tb_dir = os.path.join(workdir, "tb")
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._files = 0  # event files opened: each (re)open writes a fresh file
    self.tb = self._open_tb()
    self.jsonl = open(self.jsonl_path, "a")

  def _open_tb(self):
    from tensorboardX import SummaryWriter  # imported here: only runs that log need it
    self._files += 1
    return SummaryWriter(self.tb_dir, filename_suffix=f".{os.getpid()}.{self._files}")

  def scalars(self, step: int, metrics: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self.tb.add_scalar(prefix + name, float(value), step)
    self.jsonl.write(json.dumps({"step": step, **{prefix + k: float(v)
                                                  for k, v in metrics.items()}}) + "\n")
    self.jsonl.flush()

  def flush(self) -> None:
    """Everything logged so far is on disk (tensorboardX's flush() leaves its queue behind:
    closing is what writes it)."""
    if not self.enabled:
      return
    self.tb.close()
    self.tb = self._open_tb()

  def resume(self, prefix: str, step: int) -> int:
    """Drops the `prefix` lines after `step` (written after the last checkpoint by a run that
    was killed) and rebuilds TensorBoard from metrics.jsonl; returns how many lines went."""
    if not self.enabled:
      return 0
    self.jsonl.close()
    with open(self.jsonl_path) as f:
      lines = [line for line in f if line.strip()]
    records = []
    for line in lines:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut by the kill
        records.append(None)
    keep = [r for r in records if r is not None and not (
        r["step"] > step and any(k.startswith(prefix) for k in r if k != "step"))]
    dropped = len(records) - len(keep)
    if dropped:
      with open(self.jsonl_path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
      os.replace(self.jsonl_path + ".tmp", self.jsonl_path)
    self.jsonl = open(self.jsonl_path, "a")
    self.tb.close()
    for name in os.listdir(self.tb_dir):
      if name.startswith("events.out.tfevents"):
        os.remove(os.path.join(self.tb_dir, name))
    self.tb = self._open_tb()
    for record in keep:
      for name, value in record.items():
        if name != "step":
          self.tb.add_scalar(name, value, record["step"])
    self.tb.flush()
    return dropped

  def close(self):
    if not self.enabled:
      return
    self.tb.close()
    self.jsonl.close()


def read_history(workdir: str, name: str) -> list[dict]:
  """A stage's logged steps from WORKDIR/metrics.jsonl, one dict per step: train metrics under
  their names, eval metrics as eval_<name> (the whole run's, across resumes)."""
  path = os.path.join(workdir, "metrics.jsonl")
  steps: dict[int, dict] = {}
  for line in (open(path) if os.path.exists(path) else []):
    record = json.loads(line)
    for key, value in record.items():
      for kind, out in ((f"{name}/train/", ""), (f"{name}/eval/", "eval_")):
        if key.startswith(kind):
          steps.setdefault(record["step"], {"step": record["step"]})[out + key[len(kind):]] = value
  return [steps[k] for k in sorted(steps)]


def read_tensorboard(tb_dir: str) -> dict:
  """{(tag, step): value} of the scalars in tb_dir's event files (TFRecord framing of Event
  protos, read without TensorFlow), to compare curves."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for name in sorted(os.listdir(tb_dir)):
    if not name.startswith("events.out.tfevents"):
      continue
    data, pos = open(os.path.join(tb_dir, name), "rb").read(), 0
    while pos + 12 <= len(data):  # length (8 bytes), its CRC (4), the record, its CRC (4)
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out[(value.tag, event.step)] = value.simple_value
  return out


def _human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024


def _format(metrics: dict) -> str:
  return " ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))


def _restore(ckpt: checkpoint_lib.Checkpointer, state, workdir: str, identity: str | None,
             name: str):
  """The latest checkpoint's state if there is one (refusing one of another identity)."""
  if ckpt.latest_step() is None:
    return state, {}
  state, saved_meta = ckpt.restore(state)
  if not identity_lib.accepts(workdir, saved_meta.get("identity")):
    ckpt.close()
    raise errors.WorkdirMismatch(
        f"the checkpoints in {ckpt.directory} were written by a run of another config or data "
        f"(identity {str(saved_meta.get('identity'))[:12]}, this run {str(identity)[:12]}): "
        f"use a new --workdir")
  logging.info("%s: resumed from step %d in %s", name, int(state["step"]), ckpt.directory)
  print(f"[{name}] resumed from checkpoint at step {int(state['step'])}", flush=True)
  return state, saved_meta


class StopGuard:
  """Stops training on a non-finite loss or gradient at once, and after `patience` consecutive
  steps that are stuck (zero gradient norm, unchanged loss) or `collapsed(metrics)` (0 = off)."""

  def __init__(self, name: str, patience: int, collapsed: Callable[[dict], bool] | None):
    self.name, self.patience, self.collapsed = name, patience, collapsed
    self.stuck_steps, self.last_loss = 0, None

  def check(self, metrics: dict, done: int, last_saved: int | None,
            directory: str) -> errors.TrainingStopped | None:
    """The error to raise after step `done`, or None to go on."""
    bad = [k for k in ("loss", "grad_norm", "update_norm") if not np.isfinite(metrics[k])]
    loss, last = float(metrics["loss"]), self.last_loss
    stuck = (float(metrics["grad_norm"]) == 0.0 and last is not None
             and abs(loss - last) <= 1e-7 * max(1.0, abs(last)))
    collapsed = bool(self.collapsed and self.collapsed(metrics))
    self.stuck_steps = self.stuck_steps + 1 if stuck or collapsed else 0
    self.last_loss = loss
    if not bad and not (self.patience and self.stuck_steps >= self.patience):
      return None
    why = (f"non-finite {', '.join(bad)} at step {done}" if bad else
           f"training stuck for {self.stuck_steps} steps at step {done} (loss {loss:.6g}, "
           f"grad_norm {float(metrics['grad_norm']):.3g}{', collapsed' if collapsed else ''}): "
           f"the model has diverged or saturated; lower the learning rate")
    kept = (f"the last good checkpoint is step {last_saved} in {directory}"
            if last_saved is not None else "no checkpoint was saved yet")
    return errors.TrainingStopped(f"[{self.name}] {why}; training stopped, {kept} (no later "
                                  f"state was saved)")


def _compiled_step_memory(name: str, step_fn, *args) -> dict:
  """Compiles the step (jit reuses it for the calls that follow) and prints its memory."""
  memory = compiled_memory(step_fn.lower(*args).compile())
  size = {k: _human_bytes(v) for k, v in memory.items()}
  print(f"[{name}] compiled train step, per device: peak {size['peak_bytes']} (arguments "
        f"{size['argument_bytes']}, temporaries {size['temp_bytes']}, outputs "
        f"{size['output_bytes']}, donated {size['alias_bytes']})", flush=True)
  return memory


def _log_progress(name: str, tcfg, done: int, metrics: dict, t_last: float, writer) -> float:
  """The progress line and train scalars every log_every steps (and at the end)."""
  if done % tcfg.log_every and done != tcfg.steps:
    return t_last
  now = time.perf_counter()
  rate = tcfg.log_every / max(now - t_last, 1e-9) if done % tcfg.log_every == 0 else 0.0
  print(f"[{name}] step {done}/{tcfg.steps} {_format(metrics)} steps/s={rate:.2f} "
        f"eta={(tcfg.steps - done) / rate if rate else 0.0:.0f}s", flush=True)
  writer.scalars(done, metrics, f"{name}/train/")
  return now


def _evaluate(name: str, eval_fn, trainable, done: int, writer) -> dict:
  """Runs eval_fn, prints and logs its metrics; returns them as history entries (eval_*)."""
  eval_metrics = eval_fn(trainable)
  print(f"[{name}] eval at step {done}: {_format(eval_metrics)}", flush=True)
  writer.scalars(done, eval_metrics, f"{name}/eval/")
  return {f"eval_{k}": float(v) for k, v in eval_metrics.items()}


def _start(name, workdir, tcfg, optim_cfg, mesh, loss_fn, trainable, frozen, meta,
           grads_fn=None):
  """The jitted step, the state (restored from the latest checkpoint if any) and the frozen
  leaves on their shardings, the checkpointer, and the meta each checkpoint records."""
  os.makedirs(workdir, exist_ok=True)
  optimizer = make_optimizer(optim_cfg, tcfg.steps)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": optimizer.init(trainable)}
  step_fn, state_shardings, frozen_shardings = sharded_train_step(
      make_train_step(loss_fn, optimizer, tcfg.accum_steps, tcfg.get("updates_per_batch", 1),
                      grads_fn),
      mesh, state, frozen)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), tcfg.keep_checkpoints)
  recorded = identity_lib.read(workdir)
  meta = dict(meta or {}, identity=recorded["sha256"] if recorded else None)
  state, saved = _restore(ckpt, sharding_lib.put(state, state_shardings), workdir,
                          meta["identity"], name)
  if int(state["step"]) >= tcfg.steps:
    print(f"[{name}] WARNING: the checkpoint is at step {int(state['step'])} of "
          f"{tcfg.steps}: nothing left to train, the saved state is evaluated as it is", flush=True)
  return step_fn, state, sharding_lib.put(frozen, frozen_shardings), ckpt, meta, saved


def fit(*, name: str, workdir: str, train_cfg: ml_collections.ConfigDict,
        optim_cfg: ml_collections.ConfigDict, seed: int, mesh, loss_fn: LossFn,
        trainable: Any, frozen: Any, batch_at: Callable[..., dict],
        batch_uses_state: bool = False,
        eval_fn: Callable[[Any], dict] | None = None, meta: dict | None = None,
        writer: Writer | None = None,
        collapsed: Callable[[dict], bool] | None = None,
        grads_fn: GradsFn | None = None) -> dict:
  """Trains `trainable` (donated: use the returned state) for train.steps optimizer steps.

  `batch_at(step)` gives the step's batch (`batch_at(step, trainable)` with batch_uses_state: RL
  rollouts). Resumes from the latest checkpoint in `workdir/checkpoints` with the batches and
  random numbers of an uninterrupted run; stops with errors.TrainingStopped as StopGuard says.
  `grads_fn` (see make_train_step) replaces loss_fn where given."""
  tcfg = train_cfg
  step_fn, state, frozen, ckpt, meta, saved = _start(name, workdir, tcfg, optim_cfg, mesh,
                                                     loss_fn, trainable, frozen, meta, grads_fn)
  start, base_rng = int(state["step"]), jax.random.key(seed)
  own_writer, writer = writer is None, writer or Writer(workdir)
  if dropped := writer.resume(f"{name}/", start):
    print(f"[{name}] dropped {dropped} log lines written after step {start} by an interrupted "
          f"run", flush=True)
  guard = StopGuard(name, tcfg.get("stop_if_stuck", 0), collapsed)
  step_times, history, last_saved, step_memory = [], [], ckpt.latest_step(), None
  metrics = saved.get("final_metrics", {})  # what the last step logged, if none is left to run
  t_last = time.perf_counter()
  for step in range(start, tcfg.steps):
    # No implicit host<->device copy on the hot path: batches and metrics move explicitly
    # (device_put / device_get); anything else is an error here, not a silent slowdown.
    with jax.transfer_guard("disallow"):
      host_batch = batch_at(step, state["trainable"]) if batch_uses_state else batch_at(step)
      args = (frozen, sharding_lib.put_batch(host_batch, mesh), step_key(base_rng, step, mesh))
      step_memory = step_memory or _compiled_step_memory(name, step_fn, state, *args)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, *args)
      metrics = jax.device_get(metrics)
      step_times.append(time.perf_counter() - t0)
    done = step + 1
    if stop := guard.check(metrics, done, last_saved, ckpt.directory):
      ckpt.close()
      raise stop
    history.append({"step": done, **{k: float(v) for k, v in metrics.items()}})
    t_last = _log_progress(name, tcfg, done, metrics, t_last, writer)
    if eval_fn is not None and (done == tcfg.steps or (tcfg.eval_every
                                                       and done % tcfg.eval_every == 0)):
      history[-1].update(_evaluate(name, eval_fn, state["trainable"], done, writer))
    if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
      ckpt.save(done, state, {**meta, "step": done, "examples_seen": done * tcfg.batch_size,
                              "final_metrics": {k: float(v) for k, v in metrics.items()}})
      writer.flush()  # TensorBoard is never behind the last checkpoint
      last_saved = done
  ckpt.close()
  if own_writer:
    writer.close()
  timed = step_times[1:] if len(step_times) > 1 else step_times  # the first step compiles
  return {"state": state, "final_metrics": {k: float(v) for k, v in metrics.items()},
          "history": history,
          "train_step_compilations": step_fn._cache_size(),  # 1: no re-jit after the first step
          "step_memory": step_memory or {},  # bytes per device of the compiled step
          "step_time_s": statistics.median(timed) if timed else float("nan"),
          "steps": int(state["step"]), "resumed_from": start}
