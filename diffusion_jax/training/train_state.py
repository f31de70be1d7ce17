"""Train state, optimizer, EMA and the compiled train step.

The state is plain data (a pytree: step, params, EMA params, optimizer state), so it can be
sharded, donated and checkpointed as is; the model and optimizer are passed explicitly.
One train step is one `jax.jit` with explicit shardings over the mesh: the global batch is
split over the `data` axis, the state replicated, and the step's noise, timesteps and dropout
are drawn for the *global* batch from a key folded with the step, so the result does not
depend on how many devices share the batch (up to the order of float sums). On the CPU, without
dropout, the gradient is taken per device in a `shard_map` and averaged as one flat vector.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from diffusion_jax.nn import backbones
from diffusion_jax.training import ema as ema_lib
from diffusion_jax import objectives
from diffusion_jax.parallel import sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: `step` counts applied optimizer updates.

  `ema_params` is the primary EMA (`optim.ema_decay`); `extra_emas` the EMAs of
  `optim.ema_decays` / `optim.ema_sigma_rels` ({ema_lib.EmaSpec.key: float32 tree}, see ema.py),
  None when none is configured (the state and checkpoint layout are then those of before).
  """
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree
  extra_emas: Optional[Dict[str, PyTree]] = None


def learning_rate_schedule(optim_config, num_train_steps: int) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then constant or cosine decay to 0 at the last step."""
  warmup = max(int(optim_config.warmup_steps), 0)
  lr = optim_config.learning_rate
  if optim_config.lr_schedule == 'constant':
    after = optax.constant_schedule(lr)
  elif optim_config.lr_schedule == 'cosine':
    after = optax.cosine_decay_schedule(lr, max(num_train_steps - warmup, 1))
  else:
    raise ValueError(f'optim.lr_schedule={optim_config.lr_schedule!r} is unknown; '
                     'use constant or cosine.')
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def create_optimizer(optim_config, num_train_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> Adam/AdamW with the configured learning-rate schedule.

  The chain is always clip -> scale_by_adam -> add_decayed_weights -> -lr, so the optimizer
  state has the same tree whatever `grad_clip` and `optimizer` are and a run may switch them
  on resume. Off settings are exact no-ops: grad_clip <= 0 clips at max_norm=inf (optax keeps
  the update untouched when ||g|| < max_norm, true for every finite norm), and 'adam' decays
  with weight 0 (u + 0 * p == u for finite p).
  """
  if optim_config.optimizer not in ('adam', 'adamw'):
    raise ValueError(f'optim.optimizer={optim_config.optimizer!r} is unknown; use adam or adamw.')
  schedule = learning_rate_schedule(optim_config, num_train_steps)
  weight_decay = optim_config.weight_decay if optim_config.optimizer == 'adamw' else 0.0
  max_norm = optim_config.grad_clip if optim_config.grad_clip > 0 else float('inf')
  return optax.chain(
      optax.clip_by_global_norm(max_norm),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=weight_decay))


def applied_learning_rate(opt_state: PyTree, lr_schedule: optax.Schedule) -> jax.Array:
  """The learning rate the next update applies: the schedule at optax's update count.

  The count advances only with applied updates (a skipped non-finite step restores the old
  opt_state), so the schedule counts applied updates, not steps.
  """
  states = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  return lr_schedule(states[0].count)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay for update number `step` (0-based): `decay`, or min(decay, (1+n)/(10+n))."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params: PyTree, params: PyTree, decay: jax.Array) -> PyTree:
  """ema <- decay * ema + (1 - decay) * params, in float32."""
  return jax.tree.map(
      lambda e, p: (decay * e + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype),
      ema_params, params)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         image_shape: Tuple[int, int, int],
                         ema_keys: Sequence[str] = ()) -> TrainState:
  """Shapes and dtypes of the initial state (nothing is computed or allocated); `ema_keys`
  (`ema_lib.ema_keys(config.optim)`) are the extra EMAs."""
  return jax.eval_shape(
      lambda: _init_state(model, tx, jax.random.PRNGKey(0), image_shape, ema_keys))


def _init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                image_shape: Tuple[int, int, int], ema_keys: Sequence[str] = ()) -> TrainState:
  params = backbones.init_params(model, rng, image_shape)
  ema = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                    opt_state=tx.init(params),
                    extra_emas=ema_lib.init_emas(params, ema_keys) if ema_keys else None)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation,
                    image_shape: Tuple[int, int, int], mesh: Mesh,
                    fsdp_min_size: int = sharding.DEFAULT_FSDP_MIN_SIZE,
                    ema_keys: Sequence[str] = ()) -> TrainState:
  """The NamedSharding of every leaf of the train state (FSDP rule of `sharding.py`); the
  extra EMAs get the same shardings as the parameters (same shapes, same rule)."""
  return sharding.state_shardings(abstract_train_state(model, tx, image_shape, ema_keys), mesh,
                                  fsdp_min_size)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: Tuple[int, int, int], mesh: Mesh,
                       fsdp_min_size: int = sharding.DEFAULT_FSDP_MIN_SIZE,
                       ema_keys: Sequence[str] = ()) -> TrainState:
  """Initialises the state directly in its sharded layout; every EMA starts at the params.

  The init is one `jit` whose outputs carry the FSDP shardings, so no device ever holds
  a full copy of a sharded tensor (with mesh.fsdp = 1 everything is replicated).
  """
  shardings = state_shardings(model, tx, image_shape, mesh, fsdp_min_size, ema_keys)
  init = jax.jit(lambda key: _init_state(model, tx, key, image_shape, ema_keys),
                 out_shardings=shardings)
  # Under jax.eval_shape / jit it is only traced (and jax.jit's compiler_options are refused on
  # a nested jit, hence the explicit compile below rather than that argument).
  if isinstance(rng, jax.core.Tracer):
    return init(rng)
  # The init runs once and is mostly inlined threefry rounds: on XLA:CPU, LLVM's optimisation of
  # it took ~3x longer than without (11.4 s -> 4.3 s for the digits U-Net, whose run is
  # milliseconds either way); the values agree to float rounding (relative 2e-7).
  options = ({'xla_backend_optimization_level': 0}
             if mesh.devices.flat[0].platform == 'cpu' else None)
  return init.lower(rng).compile(options)(rng)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config, mesh: Mesh,
                    steps_per_call: Optional[int] = None
                    ) -> Callable[[TrainState, Dict[str, jax.Array]],
                                  Tuple[TrainState, Dict[str, jax.Array]]]:
  """Returns the jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

  batch: {'image': [B,H,W,C] in [-1,1], 'label': [B] (class-conditional models)}, B the global
  batch. With k = steps_per_call (default `training.steps_per_call`, 1) > 1, one call runs k
  optimizer steps in a `lax.scan`: batch arrays are [k, B, ...] and metrics [k].
  `training.grad_accum_steps` = a splits every B into a micro-batches of B / a whose gradients
  are averaged before one update; noise and timesteps are still drawn for the whole B, so the
  step equals one step on B up to float rounding (exactly so when model.unet.dropout = 0; dropout
  masks are drawn per micro-batch). The float32 gradient sum is kept in the parameters'
  shardings, so under FSDP a device holds only its shard of it.
  metrics: 'loss', 'grad_norm' (before clipping), 'learning_rate' (the one this update uses:
  the schedule counts applied updates, optax's count, which a skipped step does not advance),
  'nonfinite' (1 when the
  loss or gradients were NaN/Inf; the update is then not applied, only `step` advances).
  """
  ocfg, tcfg = config.optim, config.training
  objective = objectives.get(config.diffusion.objective)
  lr_schedule = learning_rate_schedule(ocfg, tcfg.num_train_steps)
  base_key = jax.random.PRNGKey(config.seed)
  num_classes = config.model.num_classes
  cond_drop_prob = tcfg.cond_drop_prob
  accum = int(tcfg.grad_accum_steps)
  k = int(tcfg.steps_per_call if steps_per_call is None else steps_per_call)
  batch_axes = sharding.batch_sharding(mesh).spec[0]
  micro_sharding = jax.sharding.NamedSharding(mesh, P(None, batch_axes))
  image_shape = (config.data.resolution, config.data.resolution, config.data.channels)
  extra_ema_specs = ema_lib.ema_specs(ocfg)
  state_sharding = state_shardings(model, tx, image_shape, mesh,
                                   sharding.fsdp_min_size(config.mesh),
                                   ema_lib.ema_keys(ocfg))
  # XLA:CPU runs a convolution's weight gradient inside a while loop tens of times slower than
  # outside one (benchmarks/scan_backward_cpu.py), so on the CPU the k steps and the
  # micro-batches are unrolled; other backends keep rolled loops (one copy of the body to
  # compile).
  on_cpu = mesh.devices.flat[0].platform == 'cpu'

  # XLA:CPU's in-process all-reduce of the gradients costs ~30 us per tensor, and the devices
  # wait on each other in it: a sixth of a digits step on two devices. So on the CPU, with
  # a replicated state, each device takes the gradient of its own rows (a shard_map) and the
  # devices average it as one flat vector: 1.15x the digits step (benchmarks/RESULTS.md). Only
  # without dropout: inside the shard_map each device would draw its own masks, which would then
  # depend on the device count.
  per_device_grads = (on_cpu and mesh.size > 1 and mesh.shape.get(sharding.FSDP_AXIS, 1) == 1
                      and config.model.unet.dropout == 0)

  def loss_and_grads(params, example, labels, drop_key):
    """Mean loss of one (micro-)batch and its gradient.

    `example` holds per-example arrays (leading axis B): the network input 'x_t' at network time
    't', and what the objective's loss needs (`objectives.training_example`).
    """

    def loss_fn(params, example, labels):
      out = model.apply({'params': params}, example['x_t'], example['t'], labels, train=True,
                        rngs={'dropout': drop_key})
      return jnp.mean(objective.per_example_loss(config, out, example))

    if not per_device_grads:
      return jax.value_and_grad(loss_fn)(params, example, labels)

    def device_mean(params, example, labels):  # On one device's rows of the batch.
      loss, grads = jax.value_and_grad(loss_fn)(params, example, labels)
      flat, unflatten = ravel_pytree(grads)
      return jax.lax.pmean(loss, batch_axes), unflatten(jax.lax.pmean(flat, batch_axes))

    # check_vma=False: the oneDNN convolutions' custom VJP does not annotate varying axes.
    return jax.shard_map(device_mean, mesh=mesh, in_specs=(P(), P(batch_axes), P(batch_axes)),
                         out_specs=P(), check_vma=False)(params, example, labels)

  def accumulated(params, example, labels, drop_key):
    """Mean loss and gradient over `accum` equal micro-batches of the global batch."""
    def split(x):  # [B, ...] -> [accum, B / accum, ...]; micro-batch i = rows i, i + a, ...
      if x is None:
        return None
      x = jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    micro = (jax.tree.map(split, example), split(labels), jnp.arange(accum))

    # The float32 gradient sum lives in the parameters' layout: under FSDP each device keeps
    # only its shard of the sum (the micro-batch gradients are reduce-scattered into it), not a
    # full replicated copy of every gradient.
    as_params = lambda tree: jax.lax.with_sharding_constraint(tree, state_sharding.params)

    def body(carry, m):
      loss_sum, grad_sum = carry
      mexample, mlabels, i = m
      loss, grads = loss_and_grads(params, mexample, mlabels, jax.random.fold_in(drop_key, i))
      grad_sum = as_params(jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads))
      return (loss_sum + loss, grad_sum), None

    zeros = as_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro,
                                           unroll=accum if on_cpu else 1)
    grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, params)
    return loss_sum / accum, grads

  def train_step(state: TrainState, batch: Dict[str, jax.Array]):
    x0 = batch['image'].astype(jnp.float32)
    step_key = jax.random.fold_in(jax.random.fold_in(base_key, 1), state.step)
    t_key, noise_key, drop_key, label_key = jax.random.split(step_key, 4)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    # The corrupted input, the network's time input and the loss targets of the objective.
    example = objective.training_example(config, x0, noise, t_key)
    labels = None
    if num_classes > 0:
      labels = batch['label'].astype(jnp.int32)
      if cond_drop_prob > 0:  # Classifier-free guidance: sometimes train the null class.
        drop = jax.random.bernoulli(label_key, cond_drop_prob, labels.shape)
        labels = jnp.where(drop, num_classes, labels)

    grad_fn = loss_and_grads if accum == 1 else accumulated
    loss, grads = grad_fn(state.params, example, labels, drop_key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def updated(state: TrainState) -> TrainState:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema = ema_update(state.ema_params, params,
                       ema_decay_at(state.step, ocfg.ema_decay, ocfg.ema_warmup))
      extra_emas = None
      if extra_ema_specs:  # optim.ema_decays / ema_sigma_rels, in float32 (ema.py).
        extra_emas = ema_lib.update_emas(
            state.extra_emas, params, state.step, extra_ema_specs,
            lambda d: ema_decay_at(state.step, d, ocfg.ema_warmup))
      return TrainState(step=state.step + 1, params=params, ema_params=ema,
                        opt_state=opt_state, extra_emas=extra_emas)

    def skipped(state: TrainState) -> TrainState:
      return state.replace(step=state.step + 1)

    # A non-finite step leaves the state untouched, so no NaN ever reaches params or EMA. On the
    # CPU a `lax.cond` does that in place; a `where(finite, new, old)` over the donated state
    # makes XLA copy the old parameters and Adam moments every step (3x the model's size, 429 MB
    # for cifar10_ddpm; benchmarks/RESULTS.md). Other backends keep the `where`: XLA's
    # conditional there reads the predicate back to the host before the update's kernels.
    if on_cpu:
      new_state = jax.lax.cond(finite, updated, skipped, state)
    else:
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated(state),
                               skipped(state))
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'learning_rate': applied_learning_rate(state.opt_state, lr_schedule),
               'nonfinite': 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics

  def multi_step(state: TrainState, batches: Dict[str, jax.Array]):
    return jax.lax.scan(train_step, state, batches, unroll=k if on_cpu else 1)

  replicated = sharding.replicated(mesh)
  if k == 1:
    fn, batch_sharding = train_step, sharding.batch_sharding(mesh)
  else:
    fn, batch_sharding = multi_step, sharding.stacked_batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)
