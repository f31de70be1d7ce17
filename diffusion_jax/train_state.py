"""Train state, optimizer, EMA and the compiled train step.

The state is plain data (a pytree: step, params, EMA params, optimizer state), so it can be
sharded, donated and checkpointed as is; the model and optimizer are passed explicitly.
One train step is one `jax.jit` with explicit shardings over the mesh: the global batch is
split over the `data` axis, the state replicated, and the step's noise, timesteps and dropout
are drawn for the *global* batch from a key folded with the step, so the result does not
depend on how many devices share the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from diffusion_jax import diffusion, sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: `step` counts applied optimizer updates."""
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree


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
  """clip_by_global_norm -> Adam/AdamW with the configured learning-rate schedule."""
  schedule = learning_rate_schedule(optim_config, num_train_steps)
  if optim_config.optimizer == 'adam':
    opt = optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps)
  elif optim_config.optimizer == 'adamw':
    opt = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                      weight_decay=optim_config.weight_decay)
  else:
    raise ValueError(f'optim.optimizer={optim_config.optimizer!r} is unknown; use adam or adamw.')
  if optim_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), opt)
  return opt


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


def init_params(model: nn.Module, rng: jax.Array, image_shape: Tuple[int, int, int]) -> PyTree:
  """Initial parameters of `model` for images [H, W, C]."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if getattr(model, 'num_classes', 0) else None
  return model.init({'params': rng}, x, t, y, train=False)['params']


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: Tuple[int, int, int], mesh: Mesh) -> TrainState:
  """Initialises the state directly with its (replicated) sharding; EMA starts at the params."""
  def init() -> TrainState:
    params = init_params(model, rng, image_shape)
    ema = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                      opt_state=tx.init(params))
  return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: diffusion.Schedule, config, mesh: Mesh
                    ) -> Callable[[TrainState, Dict[str, jax.Array]],
                                  Tuple[TrainState, Dict[str, jax.Array]]]:
  """Returns the jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

  batch: {'image': [B,H,W,C] in [-1,1], 'label': [B] (class-conditional models)}.
  metrics: scalars 'loss', 'grad_norm' (before clipping), 'learning_rate', 'nonfinite'
  (1 when the loss or gradients were NaN/Inf; the update is then not applied).
  """
  dcfg, ocfg = config.diffusion, config.optim
  lr_schedule = learning_rate_schedule(ocfg, config.training.num_train_steps)
  base_key = jax.random.PRNGKey(config.seed)
  num_classes = config.model.num_classes
  cond_drop_prob = config.training.get('cond_drop_prob', 0.0)

  def train_step(state: TrainState, batch: Dict[str, jax.Array]):
    x0 = batch['image'].astype(jnp.float32)
    step_key = jax.random.fold_in(jax.random.fold_in(base_key, 1), state.step)
    t_key, noise_key, drop_key, label_key = jax.random.split(step_key, 4)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    labels = None
    if num_classes > 0:
      labels = batch['label'].astype(jnp.int32)
      if cond_drop_prob > 0:  # Classifier-free guidance: sometimes train the null class.
        drop = jax.random.bernoulli(label_key, cond_drop_prob, labels.shape)
        labels = jnp.where(drop, num_classes, labels)

    def loss_fn(params):
      out = model.apply({'params': params}, x_t, t, labels, train=True,
                        rngs={'dropout': drop_key})
      per_example = diffusion.diffusion_loss(schedule, out, x0, noise, t, dcfg.prediction_type,
                                             dcfg.loss_weighting, dcfg.min_snr_gamma)
      return jnp.mean(per_example)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params,
                     ema_decay_at(state.step, ocfg.ema_decay, ocfg.ema_warmup))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema,
                           opt_state=opt_state)
    # A non-finite step leaves the state untouched, so no NaN ever reaches params or EMA.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': lr_schedule(state.step),
               'nonfinite': 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
