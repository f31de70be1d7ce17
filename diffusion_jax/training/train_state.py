"""Train state, optimizer, EMA and the compiled train step.

The state is plain data (a pytree: step, params, EMA params, optimizer state), so it can be
sharded, donated and checkpointed as is; the model and optimizer are passed explicitly.
`abstract_train_state(config, mesh)` is the one description of a run's state (shapes, dtypes and
FSDP shardings); the init, the restore of a checkpoint and the readers of parameters all start
from it.

One train step is one `jax.jit` with explicit shardings over the mesh: the global batch is
split over the `data` axis, the state replicated or FSDP-sharded, and the step's noise,
timesteps and dropout are drawn for the *global* batch from a key folded with the step, so the
result does not depend on how many devices share the batch (up to the order of float sums).
How the program is laid out for the backend (per-device gradients, unrolled loops, the
non-finite guard) is `parallel.policy`'s choice, not the step's.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import objectives
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import policy as policy_lib
from diffusion_jax.parallel import sharding
from diffusion_jax.training import ema as ema_lib

PyTree = Any
ImageShape = Tuple[int, int, int]
TrainStep = Callable[[Any, Dict[str, jax.Array]], Tuple[Any, Dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue.

  `step` counts train steps taken (the data position: the batch and noise of step s are
  functions of (seed, s)); `num_updates` counts the optimizer updates applied, which is `step`
  less the non-finite steps skipped (training.on_nonfinite='skip'). The EMAs average the
  parameters after each applied update, so their update number (the power EMA's t, the
  warm-up's n) is `num_updates`. A checkpoint written before the field existed restores it as
  its `step` (checkpoints.py); None only in a state built by hand (then not saved).

  `ema_params` is the primary EMA (`optim.ema_decay`); `extra_emas` the EMAs of
  `optim.ema_decays` / `optim.ema_sigma_rels` ({ema_lib.EmaSpec.key: float32 tree}, see ema.py),
  None when none is configured (the state and checkpoint layout are then those of before).
  """
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree
  extra_emas: Optional[Dict[str, PyTree]] = None
  num_updates: Optional[jax.Array] = None


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


def ema_decay_at(update: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay for applied update number `update` (0-based): `decay`, or
  min(decay, (1+n)/(10+n))."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = update.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params: PyTree, params: PyTree, decay: jax.Array) -> PyTree:
  """ema <- decay * ema + (1 - decay) * params, in float32."""
  return jax.tree.map(
      lambda e, p: (decay * e + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype),
      ema_params, params)


# ------------------------------------------------------------------ the state of a config


def image_shape(config: ml_collections.ConfigDict) -> ImageShape:
  """(H, W, C) of the run's images: (data.resolution, data.resolution, data.channels)."""
  return (config.data.resolution, config.data.resolution, config.data.channels)


def _init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                shape: ImageShape, ema_keys: Sequence[str] = ()) -> TrainState:
  """The initial state: every EMA starts at the parameters, both counters at 0."""
  params = backbones.init_params(model, rng, shape)
  ema = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                    opt_state=tx.init(params),
                    extra_emas=ema_lib.init_emas(params, ema_keys) if ema_keys else None,
                    num_updates=jnp.zeros((), jnp.int32))


def _abstract_state(model: nn.Module, tx: optax.GradientTransformation, shape: ImageShape,
                    ema_keys: Sequence[str], mesh: Optional[Mesh],
                    fsdp_min_size: int) -> TrainState:
  """ShapeDtypeStructs of the initial state (nothing computed), with the FSDP shardings of
  `sharding.state_shardings` on `mesh` when given; the extra EMAs get the parameters' shardings
  (same shapes, same rule)."""
  shapes = jax.eval_shape(lambda: _init_state(model, tx, jax.random.PRNGKey(0), shape, ema_keys))
  if mesh is None:
    return shapes
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, sharding.state_shardings(shapes, mesh, fsdp_min_size))


def abstract_train_state(config: ml_collections.ConfigDict,
                         mesh: Optional[Mesh] = None) -> TrainState:
  """The train state of a run of `config`, as ShapeDtypeStructs (nothing is computed or
  allocated): model.* picks the parameters, optim.* the optimizer state and the extra EMAs
  (`ema_lib.ema_keys(config.optim)`); with `mesh`, each leaf carries its FSDP NamedSharding
  (mesh.fsdp_min_size). What a checkpoint is restored onto; `.params` / `.ema_params` are what
  a reader of parameters needs."""
  model = backbones.create_model(config.model, config.data.channels)
  tx = create_optimizer(config.optim, config.training.num_train_steps)
  return _abstract_state(model, tx, image_shape(config), ema_lib.ema_keys(config.optim), mesh,
                         sharding.fsdp_min_size(config.mesh))


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """The NamedSharding of every leaf of the train state of `config` on `mesh`."""
  return jax.tree.map(lambda a: a.sharding, abstract_train_state(config, mesh))


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh,
                       rng: Optional[jax.Array] = None) -> TrainState:
  """The initial train state of `config` (parameters from `rng`, default PRNGKey(config.seed)),
  built directly in its sharded layout on `mesh`.

  The init is one `jit` whose outputs carry the FSDP shardings, so no device ever holds a full
  copy of a sharded tensor (with mesh.fsdp = 1 everything is replicated).
  """
  model = backbones.create_model(config.model, config.data.channels)
  tx = create_optimizer(config.optim, config.training.num_train_steps)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  return _create_from_parts(model, tx, rng, image_shape(config), mesh,
                            sharding.fsdp_min_size(config.mesh), ema_lib.ema_keys(config.optim))


def _create_from_parts(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       shape: ImageShape, mesh: Mesh,
                       fsdp_min_size: int = sharding.DEFAULT_FSDP_MIN_SIZE,
                       ema_keys: Sequence[str] = ()) -> TrainState:
  """`create_train_state` of an explicit model and optimizer."""
  shardings = jax.tree.map(
      lambda a: a.sharding, _abstract_state(model, tx, shape, ema_keys, mesh, fsdp_min_size))
  init = jax.jit(lambda key: _init_state(model, tx, key, shape, ema_keys),
                 out_shardings=shardings)
  # Under jax.eval_shape / jit it is only traced (and jax.jit's compiler_options are refused on
  # a nested jit, hence the explicit compile below rather than that argument).
  if isinstance(rng, jax.core.Tracer):
    return init(rng)
  options = policy_lib.policy_for(mesh).compiler_options()
  return init.lower(rng).compile(options)(rng)


# ------------------------------------------------------------------ the train step


def _step_labels(config: ml_collections.ConfigDict, batch: Dict[str, jax.Array],
                 key: jax.Array) -> Optional[jax.Array]:
  """The step's class labels [B] (None for an unconditional model); with
  training.cond_drop_prob > 0 each is replaced by the null class with that probability
  (classifier-free guidance trains the unconditional model too)."""
  num_classes = config.model.num_classes
  if num_classes <= 0:
    return None
  labels = batch['label'].astype(jnp.int32)
  drop_prob = config.training.cond_drop_prob
  if drop_prob > 0:
    labels = jnp.where(jax.random.bernoulli(key, drop_prob, labels.shape), num_classes, labels)
  return labels


# Step metrics (an objective's `step_metrics`) travel in the train step's metrics as these two
# entries per name, so that every mean is over the examples it counts (hooks.mean_metrics).
SUM_SUFFIX, COUNT_SUFFIX = '/sum', '/count'
# {name: (sum over examples, count of examples)}, float32 scalars.
StepSums = Dict[str, Tuple[jax.Array, jax.Array]]
GradFn = Callable[..., Tuple[Tuple[jax.Array, StepSums], PyTree]]


def _step_sums(objective, config: ml_collections.ConfigDict, output: jax.Array,
               example: Dict[str, jax.Array]) -> StepSums:
  """The objective's optional `step_metrics` of one (micro-)batch as float32 (sum, count)
  pairs ({} for an objective without them)."""
  step_metrics = getattr(objective, 'step_metrics', None)
  if step_metrics is None:
    return {}
  return {name: (jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32))
          for name, (total, count) in step_metrics(config, output, example).items()}


def _with_true_labels(example: Dict[str, jax.Array],
                      batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """`example` with the batch's true labels as 'label' (int32 [B]) when the data has labels:
  what a loss on the labels reads (a noisy classifier's cross-entropy). Per-example like the
  rest of `example`, so it is split into micro-batches and over devices with it; the
  network's own labels input (`_step_labels`, possibly dropped to the null class) is apart."""
  if 'label' not in batch or 'label' in example:
    return example
  return {**example, 'label': batch['label'].astype(jnp.int32)}


def _gradient_fn(model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh,
                 policy: policy_lib.BackendPolicy) -> GradFn:
  """`grads(params, example, labels, drop_key) -> ((mean loss, step sums), its gradient)` of
  one (micro-)batch.

  `example` holds per-example arrays (leading axis B): the network input 'x_t' at network time
  't', what the objective's loss needs (`objectives.training_example`) and the true labels
  'label' of labelled data. The step sums are the objective's `step_metrics` ({name: (sum,
  count)}, `_step_sums`) over the (micro-)batch. With `policy.per_device_grads` each device
  differentiates its own rows inside a `shard_map` and the devices average the gradient as one
  flat vector (one all-reduce instead of one per tensor) and add the step sums.
  """
  objective = objectives.get(config.diffusion.objective)

  def loss_fn(params, example, labels, drop_key):
    out = model.apply({'params': params}, example['x_t'], example['t'], labels, train=True,
                      rngs={'dropout': drop_key})
    loss = jnp.mean(objective.per_example_loss(config, out, example))
    return loss, _step_sums(objective, config, jax.lax.stop_gradient(out), example)

  if not policy.per_device_grads:
    return jax.value_and_grad(loss_fn, has_aux=True)
  axes = sharding.batch_sharding(mesh).spec[0]

  def device_mean(params, example, labels, drop_key):  # On one device's rows of the batch.
    if policy.check_vma:  # Per-device gradients: the flat pmean below is the one reduction.
      params = jax.lax.pcast(params, axes, to='varying')
    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, example, labels,
                                                                     drop_key)
    flat, unflatten = ravel_pytree(grads)
    # Sums over each device's rows add up to the sums over the batch (psum, not pmean).
    return ((jax.lax.pmean(loss, axes), jax.lax.psum(sums, axes)),
            unflatten(jax.lax.pmean(flat, axes)))

  return jax.shard_map(device_mean, mesh=mesh, in_specs=(P(), P(axes), P(axes), P()),
                       out_specs=P(), check_vma=policy.check_vma)


def _accumulated_fn(grad_fn: GradFn, accum: int, mesh: Mesh, params_sharding: PyTree,
                    unroll: bool) -> GradFn:
  """`grad_fn` averaged over `accum` equal micro-batches of the global batch (micro-batch i =
  rows i, i + accum, ...; dropout key folded with i); the step sums are added over them.

  The float32 gradient sum lives in the parameters' layout `params_sharding`: under FSDP each
  device keeps only its shard of the sum (the micro-batch gradients are reduce-scattered into
  it), not a full replicated copy of every gradient.
  """
  micro_sharding = NamedSharding(mesh, P(None, sharding.batch_sharding(mesh).spec[0]))
  as_params = lambda tree: jax.lax.with_sharding_constraint(tree, params_sharding)

  def split(x):  # [B, ...] -> [accum, B / accum, ...].
    if x is None:
      return None
    x = jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def accumulated(params, example, labels, drop_key):
    def body(carry, micro):
      loss_sum, grad_sum = carry
      mexample, mlabels, i = micro
      (loss, sums), grads = grad_fn(params, mexample, mlabels, jax.random.fold_in(drop_key, i))
      grad_sum = as_params(jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads))
      return (loss_sum + loss, grad_sum), sums  # Each micro-batch's step sums: [accum] each.

    zeros = as_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    micro = (jax.tree.map(split, example), split(labels), jnp.arange(accum))
    (loss_sum, grad_sum), micro_sums = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), micro, unroll=accum if unroll else 1)
    grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, params)
    return (loss_sum / accum, jax.tree.map(lambda x: jnp.sum(x, axis=0), micro_sums)), grads

  return accumulated


def _apply_update(tx: optax.GradientTransformation, optim_config, state: TrainState,
                  grads: PyTree) -> TrainState:
  """The state after one applied update with `grads`: optimizer step, then every EMA of the new
  parameters at update number `state.num_updates` (ema.py: the power EMAs' t is it + 1)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  n = state.num_updates
  decay_at = lambda d: ema_decay_at(n, d, optim_config.ema_warmup)
  ema = ema_update(state.ema_params, params, decay_at(optim_config.ema_decay))
  extra_emas = None
  specs = ema_lib.ema_specs(optim_config)
  if specs:  # optim.ema_decays / ema_sigma_rels, in float32 (ema.py).
    extra_emas = ema_lib.update_emas(state.extra_emas, params, n, specs, decay_at)
  return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                    extra_emas=extra_emas, num_updates=n + 1)


def _unless_nonfinite(finite: jax.Array, update: Callable[[TrainState], TrainState],
                      state: TrainState, policy: policy_lib.BackendPolicy) -> TrainState:
  """`update(state)` when `finite`, else `state` with only `step` advanced: no NaN ever reaches
  the parameters, the EMAs or the optimizer, and `num_updates` counts applied updates only.
  (`policy.skip_with_cond`: a `lax.cond`, which updates the donated state in place, or a
  `where` over both results.)"""
  skipped = lambda s: s.replace(step=s.step + 1)
  if policy.skip_with_cond:
    return jax.lax.cond(finite, update, skipped, state)
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), update(state),
                      skipped(state))


def _train_step_fn(model: nn.Module, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh: Mesh,
                   policy: policy_lib.BackendPolicy, params_sharding: PyTree) -> TrainStep:
  """One optimizer step `(state, batch) -> (state, metrics)`, not yet compiled."""
  objective = objectives.get(config.diffusion.objective)
  lr_schedule = learning_rate_schedule(config.optim, config.training.num_train_steps)
  base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  accum = int(config.training.grad_accum_steps)
  grad_fn = _gradient_fn(model, config, mesh, policy)
  if accum > 1:
    grad_fn = _accumulated_fn(grad_fn, accum, mesh, params_sharding, policy.unroll_loops)

  def train_step(state: TrainState, batch: Dict[str, jax.Array]):
    x0 = batch['image'].astype(jnp.float32)
    t_key, noise_key, drop_key, label_key = jax.random.split(
        jax.random.fold_in(base_key, state.step), 4)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    # The corrupted input, the network's time input and the loss targets of the objective.
    example = _with_true_labels(objective.training_example(config, x0, noise, t_key), batch)
    labels = _step_labels(config, batch, label_key)
    (loss, step_sums), grads = grad_fn(state.params, example, labels, drop_key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = _unless_nonfinite(
        finite, lambda s: _apply_update(tx, config.optim, s, grads), state, policy)
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'learning_rate': applied_learning_rate(state.opt_state, lr_schedule),
               'nonfinite': 1.0 - finite.astype(jnp.float32)}
    for name, (total, count) in step_sums.items():
      metrics[name + SUM_SUFFIX], metrics[name + COUNT_SUFFIX] = total, count
    return new_state, metrics

  return train_step


def step_metric_means(metrics: Dict[str, Any]) -> Dict[str, Any]:
  """`metrics` of the train step with each 'name/sum', 'name/count' pair replaced by 'name' =
  sum / count (NaN where the count is 0), elementwise (per step of a steps_per_call > 1 call).
  Host or device arrays; the step's other metrics are passed through."""
  out = {k: v for k, v in metrics.items()
         if not (k.endswith(SUM_SUFFIX) or k.endswith(COUNT_SUFFIX))}
  for key in metrics:
    if key.endswith(SUM_SUFFIX):
      name = key[:-len(SUM_SUFFIX)]
      count = jnp.asarray(metrics[name + COUNT_SUFFIX], jnp.float32)
      out[name] = jnp.where(count > 0, metrics[key] / jnp.maximum(count, 1.0), jnp.nan)
  return out


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh,
                    steps_per_call: Optional[int] = None,
                    policy: Optional[policy_lib.BackendPolicy] = None) -> TrainStep:
  """Returns the jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

  batch: {'image': [B,H,W,C] in [-1,1], 'label': [B] (class-conditional models)}, B the global
  batch. With k = steps_per_call (default `training.steps_per_call`, 1) > 1, one call runs k
  optimizer steps in a `lax.scan`: batch arrays are [k, B, ...] and metrics [k].
  `training.grad_accum_steps` = a splits every B into a micro-batches of B / a whose gradients
  are averaged before one update; noise and timesteps are still drawn for the whole B, so the
  step equals one step on B up to float rounding (exactly so without dropout; dropout masks are
  drawn per micro-batch).
  metrics: 'loss', 'grad_norm' (before clipping), 'learning_rate' (the one this update uses:
  the schedule counts applied updates, optax's count, which a skipped step does not advance),
  'nonfinite' (1 when the loss or gradients were NaN/Inf; the update is then not applied, only
  `step` advances), and for each metric `name` of the objective's optional `step_metrics` (a
  noisy classifier's accuracy per t quarter) 'name/sum' and 'name/count' over the whole batch
  (`step_metric_means` or hooks.mean_metrics turn them into means). Labelled batches' true
  labels reach the loss as example['label'] (`_with_true_labels`).
  `policy` (default `policy_for(mesh, config)`) shapes the program, never its result (up to the
  order of float sums).
  """
  policy = policy_lib.policy_for(mesh, config) if policy is None else policy
  k = int(config.training.steps_per_call if steps_per_call is None else steps_per_call)
  state_sharding = jax.tree.map(lambda a: a.sharding, _abstract_state(
      model, tx, image_shape(config), ema_lib.ema_keys(config.optim), mesh,
      sharding.fsdp_min_size(config.mesh)))
  step = _train_step_fn(model, tx, config, mesh, policy, state_sharding.params)
  if k == 1:
    fn, batch_sharding = step, sharding.batch_sharding(mesh)
  else:
    fn = lambda state, batches: jax.lax.scan(step, state, batches,
                                             unroll=k if policy.unroll_loops else 1)
    batch_sharding = sharding.stacked_batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
